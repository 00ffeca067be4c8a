"""OpenAI Batch request lines, output lines, the line reader and the format choice (pure logic, no Ray)."""
import gzip
import json

import pyarrow as pa
import pytest
from openai.types import BatchError, ErrorObject
from openai.types.chat import ChatCompletion

from pipeline.batch.job import input_format, run_batch_job
from pipeline.config import ConfigError, PipelineConfig
from pipeline.stages.engine_rows import finish_reason
from pipeline.openai.batch_requests import LineError, RequestLimits, parse_request_line
from pipeline.openai.batch_output import (
    LineIds,
    completion_body,
    engine_error,
    error_line,
    invalid_tool_call,
    success_line,
    tool_finish_reason,
)
from pipeline.stages.openai_batch import LINE, SOURCE, TEXT, URI, _numbered_lines, custom_ids, read_request_lines
from pipeline.io.records import Stage
from tests.conftest import TINY_CPU_CONFIG

CONFIG = PipelineConfig.load(TINY_CPU_CONFIG, ["openai_batch.accepted_model_names=[gpt-4o-mini]"], environ={})
LIMITS = RequestLimits.from_config(CONFIG)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "hi"}]


def line(body=None, **envelope) -> str:
    request = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "gpt-4o-mini", "messages": USER, **(body or {})}}
    request.update(envelope)
    return json.dumps(request)


# ------------------------------------------------------------------------------------------- requests
def test_a_full_request_maps_onto_conversation_images_sampling_and_format():
    request = parse_request_line(line({
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": " s3://b/k.jpg ", "detail": "high"}}]}],
        "max_completion_tokens": 30, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "END",
        "presence_penalty": 0.1, "frequency_penalty": -0.2, "n": 1, "logprobs": False, "stream": False, "user": "u",
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object"}}},
    }), LIMITS)
    assert request.custom_id == "r1" and request.tool_request is None and not request.tool_template
    assert request.conversation == [
        {"role": "system", "content": "Be\nbrief."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}]
    assert request.images == [("messages[1].content[1].image_url.url", "s3://b/k.jpg")]
    assert request.sampling == {"max_tokens": 30, "temperature": 0.5, "top_p": 0.9, "top_k": 0,
                                "repetition_penalty": 1.0, "presence_penalty": 0.1, "frequency_penalty": -0.2,
                                "seed": 3, "stop": ["END"], "ignore_eos": False,
                                "structured_outputs": {"json": '{"type": "object"}'}}


def test_defaults_come_from_the_config_and_every_request_has_the_same_keys():
    plain = parse_request_line(line(), LIMITS).sampling
    assert plain["max_tokens"] == CONFIG.sampling.max_tokens and plain["temperature"] == CONFIG.sampling.temperature
    assert plain["structured_outputs"] is None and plain["seed"] is None
    json_object = parse_request_line(line({"response_format": {"type": "json_object"}}), LIMITS).sampling
    assert set(plain) == set(json_object) and json_object["structured_outputs"] == {"json": '{"type": "object"}'}


def test_tools_and_tool_turns_go_through_the_tool_request_and_template():
    request = parse_request_line(line({
        "messages": USER + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "4C"}]}],
        "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}), LIMITS)
    assert request.tool_template and request.tool_request.forced_name == "get_weather"
    assert request.conversation[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}, "as a mapping"
    assert request.conversation[2] == {"role": "tool", "tool_call_id": "c1", "content": "4C"}
    auto = parse_request_line(line({"tools": [WEATHER]}), LIMITS)
    assert auto.tool_request.tool_choice == "auto"
    history_only = parse_request_line(line({"messages": USER + [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]}]}), LIMITS)
    assert history_only.tool_request is None and history_only.tool_template


@pytest.mark.parametrize("text, code, status, param", [
    pytest.param(b"{oops", "invalid_json_line", None, None, id="not-json"),
    pytest.param(b"\xff\xfe", "invalid_json_line", None, None, id="not-utf8"),
    pytest.param(json.dumps([1, 2]), "invalid_json_line", None, None, id="not-an-object"),
    pytest.param(line(custom_id=None), "missing_custom_id", None, None, id="no-custom-id"),
    pytest.param(line(custom_id=7), "missing_custom_id", None, None, id="custom-id-not-a-string"),
    pytest.param(line(method="GET"), "invalid_method", None, None, id="get"),
    pytest.param(line(url="/v1/embeddings"), "unsupported_url", None, None, id="embeddings"),
    pytest.param(json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": "x"}),
                 "invalid_body", None, None, id="body-not-object"),
    pytest.param(line({"model": "gpt-4o"}), "model_not_found", 400, "model", id="unknown-model"),
    pytest.param(line({"model": None}), "missing_required_parameter", 400, "model", id="no-model"),
    pytest.param(line({"n": 2}), "unsupported_parameter", 400, "n", id="n-2"),
    pytest.param(line({"n": True}), "unsupported_parameter", 400, "n", id="n-true"),
    pytest.param(line({"logprobs": True}), "unsupported_parameter", 400, "logprobs", id="logprobs"),
    pytest.param(line({"stream": True}), "unsupported_parameter", 400, "stream", id="stream"),
    pytest.param(line({"logit_bias": {"1": 5}}), "unsupported_parameter", 400, "logit_bias", id="logit-bias"),
    pytest.param(line({"modalities": ["text", "audio"]}), "unsupported_parameter", 400, "modalities", id="audio-out"),
    pytest.param(line({"reasoning_effort": "high"}), "unsupported_parameter", 400, "reasoning_effort", id="reasoning"),
    pytest.param(line({"frobnicate": 1}), "unsupported_parameter", 400, "frobnicate", id="unknown-field"),
    pytest.param(line({"max_tokens": 10_000}), "max_tokens_exceeded", 400, "max_tokens", id="max-tokens-cap"),
    pytest.param(line({"max_completion_tokens": 0}), "invalid_value", 400, "max_completion_tokens", id="max-tokens-0"),
    pytest.param(line({"temperature": 3}), "invalid_value", 400, "temperature", id="temperature"),
    pytest.param(line({"top_p": 0}), "invalid_value", 400, "top_p", id="top-p-0"),
    pytest.param(line({"seed": 1.5}), "invalid_value", 400, "seed", id="seed-float"),
    pytest.param(line({"stop": ["a", "b", "c", "d", "e"]}), "invalid_value", 400, "stop", id="five-stops"),
    pytest.param(line({"messages": []}), "invalid_type", 400, "messages", id="no-messages"),
    pytest.param(line({"messages": [{"role": "function", "content": "x"}]}), "invalid_value", 400,
                 "messages[0].role", id="function-role"),
    pytest.param(line({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
                 "unsupported_content_type", 400, "messages[0].content[0].type", id="audio-part"),
    pytest.param(line({"messages": [{"role": "system",
                                     "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
                 "unsupported_content_type", 400, "messages[0].content[0]", id="system-image"),
    pytest.param(line({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                 "invalid_image_url", 400, "messages[0].content[0].image_url.url", id="image-without-url"),
    pytest.param(line({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}},
                                                                 {"type": "image_url", "image_url": {"url": "b"}}]}]}),
                 "too_many_images", 400, "messages[0].content[1].image_url.url", id="two-images"),
    pytest.param(line({"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{cut"}}]}]}),
                 "invalid_value", 400, "messages[1].tool_calls[0].function.arguments", id="bad-arguments"),
    pytest.param(line({"messages": USER + [{"role": "tool", "content": "x"}]}), "missing_required_parameter", 400,
                 "messages[1].tool_call_id", id="tool-without-id"),
    pytest.param(line({"tool_choice": "required"}), "invalid_value", 400, "tool_choice", id="choice-without-tools"),
    pytest.param(line({"tools": [WEATHER], "tool_choice": "get_time"}), "invalid_value", 400, "tool_choice",
                 id="choice-a-bare-name"),
    pytest.param(line({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
                 "invalid_tools", 400, "tools", id="choice-names-no-tool"),
    pytest.param(line({"tools": [{"type": "custom", "custom": {"name": "x"}}]}), "invalid_tools", 400, "tools",
                 id="custom-tool"),
    pytest.param(line({"tools": [WEATHER], "parallel_tool_calls": False}), "unsupported_parameter", 400,
                 "parallel_tool_calls", id="no-parallel-calls-with-auto"),
    pytest.param(line({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}),
                 "invalid_request", 400, "response_format", id="forced-call-and-json"),
    pytest.param(line({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                 "missing_required_parameter", 400, "response_format.json_schema.schema", id="schema-missing"),
    pytest.param(line({"response_format": {"type": "json_schema",
                                           "json_schema": {"name": "x", "schema": {"type": 5}}}}),
                 "invalid_value", 400, "response_format.json_schema.schema", id="schema-invalid"),
    pytest.param(line({"response_format": {"type": "yaml"}}), "invalid_value", 400, "response_format.type", id="yaml"),
])
def test_refused_lines(text, code, status, param):
    with pytest.raises(LineError) as caught:
        parse_request_line(text, LIMITS)
    assert (caught.value.code, caught.value.status, caught.value.param) == (code, status, param)
    assert len(caught.value.message) > 10


def test_size_and_duplicate_ids_are_file_level_errors():
    small = RequestLimits(("gpt-4o-mini",), max_request_bytes=2048, max_images=1, max_tokens_cap=10,
                          sampling_defaults=LIMITS.sampling_defaults)
    with pytest.raises(LineError) as caught:
        parse_request_line(line({"messages": [{"role": "user", "content": "x" * 4000}]}), small)
    assert caught.value.code == "request_too_large" and caught.value.status is None
    with pytest.raises(LineError) as caught:
        parse_request_line(line(), LIMITS, duplicate_ids=frozenset({"r1"}))
    assert caught.value.code == "duplicate_custom_id" and caught.value.status is None


def test_line_errors_survive_their_json_round_trip():
    error = LineError("too_many_images", "two images", param="messages[0]", stage=Stage.IMAGE)
    again = LineError.from_json(error.to_json())
    assert vars(again) == vars(error)


# --------------------------------------------------------------------------------------------- output
IDS = LineIds.of("s3://b/requests.jsonl", 7)


def test_ids_are_stable_per_line_and_distinct_across_lines():
    assert LineIds.of("s3://b/requests.jsonl", 7) == IDS
    assert LineIds.of("s3://b/requests.jsonl", 8).batch_request != IDS.batch_request
    assert IDS.batch_request.startswith("batch_req_") and IDS.completion.startswith("chatcmpl-")
    assert len(IDS.request) == 32 and IDS.tool_call_id(0) != IDS.tool_call_id(1)


def test_success_line_holds_a_chat_completion_with_tool_calls():
    body = completion_body(IDS, model="gemma-3-12b-it", created=1700000000, content=None,
                           tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}],
                           finish_reason="tool_calls",
                           prompt_tokens=300, completion_tokens=12)
    output = success_line(IDS, "r1", body)
    assert output["error"] is None and output["response"]["status_code"] == 200
    completion = ChatCompletion.model_validate(output["response"]["body"])
    call = completion.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Oslo"} and call.id == IDS.tool_call_id(0)
    assert completion.usage.total_tokens == 312 and completion.choices[0].finish_reason == "tool_calls"
    text = completion_body(IDS, model="m", created=1, content="hello", tool_calls=[], finish_reason="stop",
                           prompt_tokens=1, completion_tokens=1)
    assert "tool_calls" not in text["choices"][0]["message"]


def test_error_lines_mirror_the_api():
    refused = error_line(IDS, "r1", LineError("model_not_found", "no such model", param="model"), 7)
    assert refused["error"] is None and refused["response"]["status_code"] == 400
    assert ErrorObject.model_validate(refused["response"]["body"]["error"]).code == "model_not_found"
    malformed = error_line(IDS, None, LineError("invalid_json_line", "not JSON", status=None), 7)
    assert malformed["response"] is None
    assert BatchError.model_validate(malformed["error"]).line == 7


@pytest.mark.parametrize("inference_error, code, status", [
    pytest.param("VLLMValidationError: The decoder prompt (length 1500) is longer than the maximum model length of "
                 "1024. Make sure...", "context_length_exceeded", 400, id="too-long-processor"),
    pytest.param("VLLMValidationError: This model's maximum context length is 1024 tokens. However, you requested 0 "
                 "output tokens and your prompt contains 9400 input tokens", "context_length_exceeded", 400,
                 id="too-long-renderer"),
    pytest.param("ValueError: structured outputs schema not supported", "invalid_request", 400, id="value-error"),
    pytest.param("RuntimeError: CUDA error: an illegal memory access", "engine_error", 500, id="runtime-error"),
    pytest.param("something without a type", "engine_error", 500, id="untyped"),
])
def test_engine_errors_map_by_type(inference_error, code, status):
    error = engine_error(inference_error)
    assert (error.code, error.status, error.stage) == (code, status, Stage.ENGINE)
    assert invalid_tool_call(1, "cut").status == 500 and invalid_tool_call(1, "cut").type == "model_error"


def test_finish_reasons():
    stops = frozenset({1, 106})
    assert finish_reason([5, 6, 106], 10, stops) == "stop"
    assert finish_reason([5] * 10, 10, stops) == "length"
    assert finish_reason([5, 6], 10, stops) == "stop", "a stop string ends the text early"
    assert tool_finish_reason("auto", True, "stop") == "tool_calls"
    assert tool_finish_reason("required", True, "stop") == "tool_calls"
    assert tool_finish_reason({"type": "function", "function": {"name": "f"}}, True, "stop") == "stop"
    assert tool_finish_reason("auto", False, "length") == "length"


# ---------------------------------------------------------------------------------------------- read
class _Chunks:
    """A stream that returns at most `size` bytes per read, to cross chunk boundaries."""

    def __init__(self, data: bytes, size: int):
        self.data, self.size = data, size

    def read(self, _n):
        chunk, self.data = self.data[: self.size], self.data[self.size:]
        return chunk


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_numbered_lines_keep_positions_and_cut_long_lines(chunk):
    data = b'{"a": 1}\r\n\n   \n' + b"x" * 50 + b'\n{"b": 2}'
    lines = list(_numbered_lines(_Chunks(data, chunk), keep_bytes=20))
    assert lines == [(1, b'{"a": 1}'), (4, b"x" * 20), (5, b'{"b": 2}')]


def test_read_request_lines_from_a_gzipped_file(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join([line().encode(), b"", b"{bad", line(custom_id="r2").encode()]) + b"\n"))
    tables = list(read_request_lines(pa.table({URI: [str(path)]}), CONFIG.storage, max_line_bytes=1 << 20,
                                     rows_per_block=2))
    assert [t.num_rows for t in tables] == [2, 1]
    rows = pa.concat_tables(tables).to_pylist()
    assert [(r[SOURCE], r[LINE]) for r in rows] == [(str(path), 1), (str(path), 3), (str(path), 4)]
    ids = custom_ids(pa.concat_tables(tables), max_line_bytes=1 << 20).column(0).to_pylist()
    assert ids == ["r1", None, "r2"] and rows[1][TEXT] == b"{bad"


# --------------------------------------------------------------------------------------------- format
def test_input_format_from_names_prefixes_and_config(tmp_path):
    requests = tmp_path / "requests"
    requests.mkdir()
    (requests / "a.jsonl").write_text("")
    (requests / "b.jsonl.gz").write_bytes(gzip.compress(b""))
    (requests / "_manifest.json").write_text("{}")
    records = tmp_path / "records"
    records.mkdir()
    (records / "part-0.parquet").write_bytes(b"")
    assert input_format(CONFIG, [str(requests)]) == "openai-batch"
    assert input_format(CONFIG, [str(requests / "a.jsonl"), "s3://bucket/more.jsonl.gz"]) == "openai-batch"
    assert input_format(CONFIG, [str(records)]) == "parquet"
    assert input_format(CONFIG, [str(tmp_path / "missing")]) == "parquet"
    forced = PipelineConfig.load(TINY_CPU_CONFIG, ["openai_batch.input_format=openai-batch"], environ={})
    assert input_format(forced, [str(records)]) == "openai-batch"


def test_the_output_format_follows_the_input(tmp_path):
    config = PipelineConfig.load(TINY_CPU_CONFIG, ["openai_batch.output_format=parquet"], environ={})
    with pytest.raises(ConfigError, match="output_format=parquet with openai-batch input is not supported"):
        run_batch_job(config, [str(tmp_path / "requests.jsonl")], str(tmp_path / "out"))


def test_max_tokens_cap_defaults_to_half_the_context_and_stays_below_it():
    assert CONFIG.openai_batch.max_tokens_cap == CONFIG.engine.max_model_len // 2
    with pytest.raises(ConfigError, match="openai_batch.max_tokens_cap"):
        PipelineConfig.load(TINY_CPU_CONFIG, ["openai_batch.max_tokens_cap=1024"], environ={})


# ------------------------------------------------------------------------------------- resume, manifest, report
def test_mark_lines_drops_written_lines_and_keys_the_rest():
    from pipeline.stages.openai_batch import mark_lines
    from pipeline.openai.batch_written import line_row_hash
    from pipeline.io.records import ROW_HASH

    batch = pa.table({SOURCE: ["s3://b/in.jsonl"] * 3, LINE: [1, 2, 4], TEXT: [b"a", b"b", b"c"]})
    done = frozenset({LineIds.of("s3://b/in.jsonl", 2).batch_request})
    marked = mark_lines(batch, done)
    assert marked[LINE].to_pylist() == [1, 4]
    assert marked[ROW_HASH].to_pylist() == [line_row_hash(LineIds.of("s3://b/in.jsonl", n).batch_request)
                                            for n in (1, 4)]
    assert len(set(mark_lines(batch, frozenset())[ROW_HASH].to_pylist())) == 3


def test_rolling_file_commits_named_parts_only_when_closed(tmp_path):
    import pyarrow.fs as pafs

    from pipeline.batch.openai_batch_sink import _RollingFile
    from pipeline.openai.batch_written import delete_partial_files, line_files, read_written

    fs = pafs.LocalFileSystem()
    out = _RollingFile(fs, str(tmp_path), str(tmp_path), "output", attempt=2, task=7, rows_per_file=2)
    ids = [LineIds.of("in.jsonl", n) for n in range(3)]
    body = completion_body(ids[0], model="m", created=1_700_000_000, content="hi", tool_calls=[],
                           finish_reason="stop", prompt_tokens=3, completion_tokens=2)
    for n, line_ids in enumerate(ids):
        out.write(json.dumps(success_line(line_ids, f"c{n}", body)))
    assert [p.rsplit("/", 1)[-1] for p in line_files(fs, str(tmp_path))] == ["output-002-00007-000.jsonl"], \
        "the open part is not visible under its name"
    # A killed writer leaves its open part hidden; the rerun deletes it.
    assert delete_partial_files(fs, str(tmp_path)) == 1
    out.stream = None
    errors = _RollingFile(fs, str(tmp_path), str(tmp_path), "errors", attempt=2, task=7, rows_per_file=2)
    errors.write(json.dumps(error_line(ids[2], None, LineError("invalid_json_line", "bad", status=None), 3)))
    errors.close()
    written = read_written(fs, str(tmp_path))
    assert written["custom_id"].to_pylist() == [None, "c0", "c1"]
    assert written["failed"].to_pylist() == [True, False, False]
    assert written["code"].to_pylist() == ["invalid_json_line", None, None]
    assert written["completion_tokens"].to_pylist() == [None, 2, 2]
    assert sorted(written["id"].to_pylist()) == sorted(i.batch_request for i in ids)


def test_report_table_feeds_the_run_report():
    from pipeline.openai.batch_written import WRITTEN_SCHEMA, report_table
    from pipeline.report.build import build_report

    written = pa.Table.from_pylist([
        {"file": "output-001-00000-000.jsonl", "id": "batch_req_a", "custom_id": "a", "failed": False,
         "text": "hello", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2, "created": 1_700_000_000},
        {"file": "errors-001-00000-000.jsonl", "id": "batch_req_b", "custom_id": "b", "failed": True,
         "code": "model_not_found", "message": "no such model"},
    ], schema=WRITTEN_SCHEMA)
    manifest = {"status": "complete", "started": "2023-11-14T22:13:00+00:00", "wall_s": 30.0,
                "counts": {"rows_in": 2, "rows_out": 2, "ok": 1, "errors": 1, "errors_by_kind": {"model_not_found": 1},
                           "errors_by_stage": {}},
                "tokens": {"prompt": 5, "completion": 2},
                "throughput": {"rows_per_s": 0.1, "completion_tokens_per_s": 0.1, "total_tokens_per_s": 0.2}}
    report = build_report(PipelineConfig(), manifest, report_table(written), charts=False)
    assert report.errors[0]["kind"] == "model_not_found" and report.errors[0]["examples"][0]["id"] == "b"
    assert [entry["text"] for entry in report.gallery] == ["hello"]


def test_a_poison_line_becomes_a_server_error_line():
    """The engine stage's crash isolation (pipeline.stages.crash_isolation) marks a line that killed the engine every time;
    its line says so, as a 500, rather than as a generic engine error."""
    from pipeline.stages.engine_rows import INFERENCE_ERROR
    from pipeline.stages.openai_batch import LineBuilder
    from pipeline.io.records import ROW_ERROR, ROW_ERROR_KIND

    row = {SOURCE: "in.jsonl", LINE: 3, "_custom_id": "c3", INFERENCE_ERROR: "poison_record: crashed 3 times",
           ROW_ERROR: "poison_record: crashed 3 times", ROW_ERROR_KIND: "poison_record"}
    built = LineBuilder("m", frozenset({1}))(row)
    line = json.loads(built["line"])
    assert built["failed"] and built["code"] == "poison_record" and built["stage"] == "engine"
    assert line["custom_id"] == "c3" and line["response"]["status_code"] == 500
    assert line["response"]["body"]["error"]["type"] == "server_error"
