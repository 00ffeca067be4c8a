"""Tool calling end to end on the real vLLM CPU engine: the batch job on local Ray, and our Ray Serve
endpoint (`jobs.serve`: the `gemma3` parser plugin and the packaged template), called with the `openai`
client.

The model has random weights, so calls come from guided decoding: a forced tool choice (JSON, as vLLM's
server forces it) in batch and online, and in the online "auto" tests a `structured_outputs` regex that
makes the model write Gemma-style pythonic calls for the plugin to read. Second-round text is noise;
the tests assert that it exists and that the transcript holds the tool's result.
"""
import base64
import io
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.io.images import describe_image
from tests.conftest import TINY_CPU_CONFIG, run_job
from tests.integration.conftest import TOOLS_KEY

pytestmark = pytest.mark.integration

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
# A tool whose forced arguments cannot fit in max_tokens: the guided JSON is cut, the call is invalid.
ESSAY = {"type": "function", "function": {
    "name": "write_essay", "parameters": {"type": "object", "required": ["text"],
                                          "properties": {"text": {"type": "string", "minLength": 400}}}}}
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
                    ("tools", pa.string()), ("tool_choice", pa.string())])
MAX_TOKENS = 40
# The tiny model's small BPE vocabulary spends ~900 tokens on the tool definitions and the image.


def _jpeg(size, make=None) -> bytes:
    image = Image.new("RGB", size, (200, 120, 40))
    exif = image.getexif()
    if make:
        exif[0x010F] = make
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def _png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


RECORDS = [
    # tool_choice comes from the job's default (image_metadata): forced, run, second round.
    {"id": "meta-jpeg", "image": _jpeg((640, 480), make="Canon"), "tools": None, "tool_choice": None},
    {"id": "meta-png", "image": _png((300, 200)), "tools": None, "tool_choice": None},
    # The record's own tool: the forced call is returned, not run.
    {"id": "own-tool", "image": _jpeg((320, 240)), "tools": json.dumps([WEATHER]), "tool_choice": "get_weather"},
    {"id": "none", "image": _png((64, 64)), "tools": None, "tool_choice": "none"},
    {"id": "cut-call", "image": _png((64, 64)), "tools": json.dumps([ESSAY]), "tool_choice": "write_essay"},
    {"id": "bad-tools", "image": _png((64, 64)), "tools": "[{not json", "tool_choice": None},
    {"id": "bad-choice", "image": _png((64, 64)), "tools": None, "tool_choice": "get_time"},
]
PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def batch_rows(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("tools-batch")
    pq.write_table(pa.Table.from_pylist([{**r, "prompt": PROMPT} for r in RECORDS], schema=SCHEMA),
                   work / "records.parquet")
    pq.write_table(pa.table({"sku": ["A1", "B2"], "price": [1.5, 2.0]}), work / "prices.parquet")
    result = run_job(
        "jobs.caption", "--input", str(work / "records.parquet"), "--output", str(work / "out"),
        "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model),
        "--set", "tools.builtins=[image_metadata, calculate, lookup]",
        "--set", f"tools.tables={{prices: {{path: {work / 'prices.parquet'}, key_column: sku}}}}",
        "--set", "tools.tool_choice=image_metadata", "--set", "tools.max_rounds=2",
        "--set", f"sampling.max_tokens={MAX_TOKENS}", "--set", "engine.max_model_len=2048")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = pads.dataset(work / "out", format="parquet").to_table().to_pylist()
    return {row["id"]: row for row in rows}


def test_batch_forced_call_runs_the_tool_and_a_second_round_answers(batch_rows):
    assert len(batch_rows) == len(RECORDS)
    for record in RECORDS[:2]:
        row = batch_rows[record["id"]]
        assert row["error"] is None, row
        transcript = json.loads(row["transcript"])
        assert [m["role"] for m in transcript] == ["user", "assistant", "tool", "assistant"]
        call = transcript[1]["tool_calls"][0]
        assert call["function"] == {"name": "image_metadata", "arguments": "{}"}
        # The registered tool ran on this record's own image: the stored file's size, format and EXIF.
        assert json.loads(transcript[2]["content"]) == describe_image(record["image"])
        assert transcript[2]["tool_call_id"] == call["id"]
        assert row["text"] and transcript[3]["content"] == row["text"], "the second round produced text"
        assert row["tool_calls"] == "[]" and row["finish_reason"] in ("stop", "length")
        assert row["prompt_tokens"] > 2 * 256, "two rounds, each with the image's 256 tokens"
        assert transcript[0]["content"][0] == {"type": "image"} and PROMPT in json.dumps(transcript[0])


def test_batch_tool_choice_none_returns_the_text(batch_rows):
    # calculate and lookup are offered too (their definitions in every prompt, the table loaded by each
    # engine replica); forcing them here would leave random weights writing a free-text argument until
    # max_tokens, so they run in tests/unit/tools/test_tool_chain.py instead.
    none = batch_rows["none"]
    assert none["error"] is None and none["text"] and none["tool_calls"] == "[]"
    assert [m["role"] for m in json.loads(none["transcript"])] == ["user", "assistant"]


def test_batch_returns_calls_to_the_records_own_tools(batch_rows):
    row = batch_rows["own-tool"]
    assert row["error"] is None and row["text"] is None and row["finish_reason"] == "tool_calls"
    calls = json.loads(row["tool_calls"])
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert isinstance(calls[0]["arguments"]["city"], str) and len(calls[0]["arguments"]["city"]) <= 12
    assert [m["role"] for m in json.loads(row["transcript"])] == ["user", "assistant"]


def test_batch_invalid_calls_and_tools_are_error_rows(batch_rows):
    cut = batch_rows["cut-call"]
    assert cut["error_kind"] == "invalid_tool_call" and cut["error_stage"] == "tools"
    assert cut["error"].startswith("invalid_tool_call: round 1: forced tool call is not valid JSON")
    assert "cut by max_tokens?" in cut["error"] and cut["text"] is None
    assert json.loads(cut["transcript"])[-1]["content"].startswith('{"text"'), "the raw turn is kept"
    bad = batch_rows["bad-tools"]
    assert (bad["error_kind"], bad["error_stage"]) == ("invalid_tools", "validate")
    assert bad["error"].startswith("invalid_tools: 'tools' is not valid JSON")
    choice = batch_rows["bad-choice"]
    assert choice["error_kind"] == "invalid_tools" and "tool_choice 'get_time'" in choice["error"]


# ------------------------------------------------------------------------------------------- online
SERVED = "gemma-3-12b-it"


@pytest.fixture(scope="module")
def openai_client(shared_endpoint):
    """Our endpoint (`python -m jobs.serve`, shared with test_serve_e2e.py: tests/integration/conftest.py):
    the same template, parser and engine settings as the batch job, read from the same config."""
    from openai import OpenAI

    return OpenAI(base_url=f"{shared_endpoint}/v1", api_key=TOOLS_KEY, max_retries=0, timeout=120)


def _job_config():
    """The batch job's config (as its --set overrides make it), for what the endpoint must match."""
    from pipeline.config import PipelineConfig

    return PipelineConfig.load(TINY_CPU_CONFIG, ["tools.builtins=[image_metadata, calculate, lookup]",
                                                 "tools.tables={prices: {path: p.parquet, key_column: sku}}"],
                               environ={})


def _user_message(image_bytes: bytes, tiny_model) -> dict:
    """The record as an OpenAI message, its image exactly as the batch job prepares it (PNG, lossless)."""
    from pipeline.io.images import image_target, prepare_image

    config = _job_config()
    target = image_target(json.loads((tiny_model / "preprocessor_config.json").read_text()))
    image = prepare_image(image_bytes, config.images, target)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": PROMPT}]}


def test_online_forced_call_matches_the_batch_call(openai_client, batch_rows, tiny_model):
    from pipeline.tools.builtins import builtin_definitions

    record = next(r for r in RECORDS if r["id"] == "own-tool")
    tools = builtin_definitions(_job_config().tools) + [WEATHER]  # what the batch job offered the record
    response = openai_client.chat.completions.create(
        model=SERVED, messages=[_user_message(record["image"], tiny_model)], tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=MAX_TOKENS,
        temperature=0)
    message = response.choices[0].message
    assert len(message.tool_calls) == 1 and message.tool_calls[0].function.name == "get_weather"
    online = json.loads(message.tool_calls[0].function.arguments)
    batch = json.loads(batch_rows["own-tool"]["tool_calls"])[0]["arguments"]
    assert isinstance(online["city"], str)
    assert response.usage.prompt_tokens == batch_rows["own-tool"]["prompt_tokens"], "the same prompt"
    assert online == batch, "same record, same template, greedy: the endpoint and the batch job agree"


GEMMA_STYLE = 'Let me check.\n```tool_code\nget_weather(city="Paris")\n```'


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_online_auto_mode_reads_gemma_style_calls(openai_client, stream):
    """The model is made to write a fenced pythonic call after some text; the plugin reads it."""
    import re

    request = dict(model=SERVED, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                   tool_choice="auto", max_tokens=200, temperature=0,
                   extra_body={"structured_outputs": {"regex": re.escape(GEMMA_STYLE)}})
    if not stream:
        response = openai_client.chat.completions.create(**request)
        message, finish = response.choices[0].message, response.choices[0].finish_reason
        assert message.tool_calls, message.content
        content, calls = message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls]
    else:
        content, calls, finish = "", [], None
        for chunk in openai_client.chat.completions.create(**request, stream=True):
            choice = chunk.choices[0] if chunk.choices else None
            if choice is None:
                continue
            content += choice.delta.content or ""
            calls += [(c.function.name, c.function.arguments) for c in choice.delta.tool_calls or []]
            finish = choice.finish_reason or finish
    assert content == "Let me check."
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [("get_weather", {"city": "Paris"})]
    assert finish == "tool_calls"


def test_online_second_round_reads_the_tool_result(openai_client, tiny_model):
    record = next(r for r in RECORDS if r["id"] == "meta-jpeg")
    messages = [_user_message(record["image"], tiny_model),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_0_0", "type": "function", "function": {"name": "get_weather",
                                                                        "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_0_0", "content": '{"temp_c": 21}'}]
    response = openai_client.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER],
                                                     max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].message.content, "a second round produces text"
    # The prompt grew by the rendered call and the tool_output block (the image's 256 tokens included).
    assert response.usage.prompt_tokens > 256 + 20
