"""The built-in tools and the registry that runs them."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import PipelineConfig, ToolsSection
from pipeline.io.images import describe_image
from pipeline.tools.builtins import build_registry, builtin_definitions, calculate
from pipeline.tools.parser import ToolCall
from pipeline.tools.registry import Tool, ToolContext, ToolFailure, ToolRegistry


@pytest.mark.parametrize("expression, result, decimal, exact", [
    pytest.param("0.1 + 0.2", "3/10", "0.3", True, id="decimals-are-exact"),
    pytest.param("1/3 + 1/6", "1/2", "0.5", True, id="fractions"),
    pytest.param("2/3", "2/3", "0.666666666666666666666666666667", False, id="repeating"),
    pytest.param("2**100 - 1", "1267650600228229401496703205375", "1267650600228229401496703205375", True,
                 id="big-integer"),
    pytest.param("-(7 // 2) * 3 % 5", "1", "1", True, id="floor-division-and-modulo"),
    pytest.param("10**-3", "1/1000", "0.001", True, id="negative-power"),
])
def test_calculate_is_exact(expression, result, decimal, exact):
    answer = calculate({"expression": expression}, ToolContext())
    assert (answer["result"], answer["decimal"], answer["decimal_is_exact"]) == (result, decimal, exact)


@pytest.mark.parametrize("expression, message", [
    pytest.param("1/0", "division by zero", id="zero-division"),
    pytest.param("9**9**9", "would exceed 4096 bits", id="too-big"),
    pytest.param("2^8", "write **", id="caret"),
    pytest.param("__import__('os').system('x')", "only numbers", id="no-calls"),
    pytest.param("x + 1", "only numbers", id="no-names"),
    pytest.param("2 ** 0.5", "integer exponent", id="irrational"),
    pytest.param("1 +", "cannot read", id="syntax"),
])
def test_calculate_refuses_what_it_cannot_do_exactly(expression, message):
    with pytest.raises(ToolFailure) as caught:
        calculate({"expression": expression}, ToolContext())
    assert message in str(caught.value)


def _config(**tools):
    return PipelineConfig.load(environ={}).model_copy(update={"tools": ToolsSection.model_validate(tools)})


def test_lookup_reads_parquet_and_csv_tables(tmp_path):
    pq.write_table(pa.table({"sku": ["A1", "B2", "A1"], "price": [1.5, 2.0, 9.0]}), tmp_path / "prices.parquet")
    (tmp_path / "cities.csv").write_text("code,name\n75,Paris\n69,Lyon\n")
    config = _config(builtins=["lookup"], tables={
        "prices": {"path": str(tmp_path / "prices.parquet"), "key_column": "sku", "description": "prices by SKU"},
        "cities": {"path": str(tmp_path / "cities.csv"), "key_column": "code"}})
    registry = build_registry(config)
    found = json.loads(registry.execute(ToolCall("lookup", {"table": "prices", "key": "A1"}), ToolContext()).content)
    assert found == {"table": "prices", "key": "A1", "found": True,
                     "rows": [{"sku": "A1", "price": 1.5}, {"sku": "A1", "price": 9.0}]}
    city = json.loads(registry.execute(ToolCall("lookup", {"table": "cities", "key": "69"}), ToolContext()).content)
    assert city["rows"] == [{"code": 69, "name": "Lyon"}], "keys compare as text, values keep their types"
    missing = json.loads(registry.execute(ToolCall("lookup", {"table": "cities", "key": "1"}), ToolContext()).content)
    assert missing["found"] is False and missing["rows"] == []
    refused = registry.execute(ToolCall("lookup", {"table": "nope", "key": "1"}), ToolContext())
    assert not refused.ok and "'nope' is not one of ['cities', 'prices']" in refused.content
    definition = builtin_definitions(config.tools)[0]["function"]
    assert definition["parameters"]["properties"]["table"]["enum"] == ["cities", "prices"]
    assert "prices: prices by SKU" in definition["parameters"]["properties"]["table"]["description"]


def test_a_missing_table_fails_the_registry(tmp_path):
    config = _config(builtins=["lookup"], tables={"t": {"path": str(tmp_path / "none.parquet"),
                                                                 "key_column": "k"}})
    with pytest.raises(OSError):
        build_registry(config)
    pq.write_table(pa.table({"a": [1]}), tmp_path / "t.parquet")
    config = _config(builtins=["lookup"], tables={"t": {"path": str(tmp_path / "t.parquet"),
                                                                 "key_column": "k"}})
    with pytest.raises(ValueError, match="has no key column 'k'"):
        build_registry(config)


def test_image_metadata_describes_the_stored_file():
    image = Image.new("RGB", (640, 480))
    exif = image.getexif()
    exif[0x010F] = "Canon"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    info = describe_image(buffer.getvalue())
    assert info["width"] == 640 and info["height"] == 480 and info["format"] == "JPEG"
    assert info["exif"] == {"Make": "Canon"} and info["size_bytes"] == len(buffer.getvalue())
    registry = build_registry(PipelineConfig.load(overrides=["tools.builtins=[image_metadata]"], environ={}))
    result = registry.execute(ToolCall("image_metadata", {}), ToolContext(image_info=info))
    assert result.ok and json.loads(result.content) == info
    assert "has no metadata" in registry.execute(ToolCall("image_metadata", {}), ToolContext()).content


def test_registry_turns_every_outcome_into_a_result():
    def broken(arguments, context):
        raise KeyError("bug")

    def chatty(arguments, context):
        return "x" * 500

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    registry = ToolRegistry([Tool("broken", "", schema, broken), Tool("chatty", "", schema, chatty)],
                            max_result_chars=100)
    assert registry.execute(ToolCall("broken", {}), ToolContext()).content == '{"error": "KeyError: \'bug\'"}'
    assert "is not of type 'integer'" in registry.execute(ToolCall("broken", {"n": "1"}), ToolContext()).content
    assert registry.execute(ToolCall("chatty", {}), ToolContext()).content.endswith("[cut at 100 characters]")
    assert registry.can_run([ToolCall("chatty", {})]) and not registry.can_run([ToolCall("other", {})])
    with pytest.raises(ValueError, match="registered twice"):
        ToolRegistry([Tool("a", "", schema, broken), Tool("a", "", schema, broken)])
