import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.stages.engine_rows import INFERENCE_ERROR, PASSTHROUGH, FinalizeRows, OutputBuilder, RequestBuilder

CONFIG = PipelineConfig.load(overrides=["sampling.max_tokens=4", "batch.default_prompt=Caption it.",
                                        "batch.default_system=Be brief."], environ={})
SCHEMA = R.output_schema(pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
                                    ("label", pa.int64())]))


def test_request_carries_the_image_prompt_and_sampling():
    pixels = Image.new("RGB", (8, 8), (1, 2, 3)).tobytes()
    request = RequestBuilder(CONFIG, 8, SCHEMA)({"id": "a", R.PIXELS: pixels, "prompt": None, "label": 5})
    system, user = request["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    image, text = user["content"]
    assert np.asarray(image["image_pil"]).reshape(-1, 3)[0].tolist() == [1, 2, 3]
    assert text == {"type": "text", "text": "Caption it."}
    assert request["sampling_params"]["max_tokens"] == 4 and request[R.PIXELS] is None
    # pass-through values travel under one key Ray's stages never write; the prompt is the effective one
    assert request[PASSTHROUGH] == {"prompt": "Caption it.", "label": 5, R.THUMBNAIL: None}


def test_failed_records_are_marked_for_ray_to_pass_through():
    request = RequestBuilder(CONFIG, 8, SCHEMA)({"id": "a", R.ROW_ERROR: "not_found: gone", "label": 2})
    assert request == {INFERENCE_ERROR: "not_found: gone", PASSTHROUGH: {"prompt": "Caption it.", "label": 2,
                                                                           R.THUMBNAIL: None}}


def test_outputs_for_success_prepare_error_and_engine_error():
    build = OutputBuilder(CONFIG, SCHEMA, stop_token_ids=[1, 6])
    ok = build({"id": "a", PASSTHROUGH: {"label": 7, "prompt": "Caption it."}, "prompt": "<bos>rendered",
                "generated_text": "a cat", "num_input_tokens": 280, "num_generated_tokens": 2,
                "generated_tokens": [44, 6]})
    assert ok[R.TEXT] == "a cat" and ok[R.FINISH_REASON] == "stop" and ok[R.PROMPT_TOKENS] == 280
    assert ok["label"] == 7 and ok[R.PROMPT] == "Caption it." and ok[R.ERROR] is None
    assert ok[R.MODEL] == "gemma-3-12b-it"
    cut = build({"id": "b", "generated_text": "x", "num_input_tokens": 280, "num_generated_tokens": 4,
                 "generated_tokens": [5, 5, 5, 5]})
    assert cut[R.FINISH_REASON] == "length"
    bad = build({"id": "c", INFERENCE_ERROR: "x", R.ROW_ERROR: "not_an_image: ...", R.ROW_ERROR_KIND: "not_an_image",
                 R.ROW_ERROR_STAGE: "image"})
    assert (bad[R.ERROR_KIND], bad[R.ERROR_STAGE], bad[R.TEXT]) == ("not_an_image", "image", None)
    engine = build({"id": "d", INFERENCE_ERROR: "ValueError: prompt too long"})
    assert engine[R.ERROR] == "engine_error: ValueError: prompt too long" and engine[R.ERROR_STAGE] == "engine"


def test_finalize_gives_one_schema_to_mixed_rows():
    build = OutputBuilder(CONFIG, SCHEMA, stop_token_ids=[1])
    done = {**build({"id": "a", "generated_text": "t", "num_input_tokens": 3, "num_generated_tokens": 1,
                     "generated_tokens": [1]}), INFERENCE_ERROR: ""}
    passed = {"id": "b", INFERENCE_ERROR: "m", R.ROW_ERROR: "empty_image: image is empty",
              R.ROW_ERROR_KIND: "empty_image", R.ROW_ERROR_STAGE: "image", PASSTHROUGH: {"label": 3},
              "messages": None}
    keys = list(dict.fromkeys([*done, *passed]))  # Ray's blocks hold the union of the rows' columns
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in (done, passed)])
    out = FinalizeRows(build)(table)
    assert out.schema == SCHEMA
    assert out.column(R.ERROR_KIND).to_pylist() == [None, "empty_image"]
    assert out.column("label").to_pylist() == [None, 3]


# ------------------------------------------------------------------------------------- jobs with tools
TOOL_CONFIG = PipelineConfig.load(overrides=["tools.builtins=[calculate]", "sampling.max_tokens=4"], environ={})
TOOL_SCHEMA = R.output_schema(pa.schema([("id", pa.string()), ("image", pa.binary()), ("tools", pa.string()),
                                         ("tool_choice", pa.string())]), tools=True)
WEATHER = ('[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
           '"properties": {"city": {"type": "string"}}}}}]')


def test_tool_columns_only_in_jobs_with_tools():
    assert R.TOOL_CALLS not in SCHEMA.names and R.TRANSCRIPT not in SCHEMA.names
    assert TOOL_SCHEMA.names[-4:] == ["tool_calls", "transcript", "tools", "tool_choice"]


def test_request_carries_the_records_tools():
    import json

    pixels = Image.new("RGB", (8, 8)).tobytes()
    build = RequestBuilder(TOOL_CONFIG, 8, TOOL_SCHEMA)
    request = build({"id": "a", R.PIXELS: pixels, "tools": WEATHER, "tool_choice": "get_weather"})
    tools = json.loads(request[R.TOOL_REQUEST])
    assert [t["function"]["name"] for t in tools["tools"]] == ["calculate", "get_weather"]
    assert tools["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert request[PASSTHROUGH] == {"tools": WEATHER, "tool_choice": "get_weather", R.THUMBNAIL: None}
    bad = build({"id": "b", R.PIXELS: pixels, "tools": "[{", "tool_choice": None})
    assert bad[INFERENCE_ERROR].startswith("invalid_tools: 'tools' is not valid JSON")
    assert (bad[R.ROW_ERROR_KIND], bad[R.ROW_ERROR_STAGE], bad[R.PIXELS]) == ("invalid_tools", "validate", None)
    plain = RequestBuilder(CONFIG, 8, SCHEMA)({"id": "c", R.PIXELS: pixels})
    assert R.TOOL_REQUEST not in plain, "a job without tools builds exactly the requests it built before"


def _outcome(**fields):
    import json

    return json.dumps({"content": None, "tool_calls": [], "error": None, "rounds": 1,
                       "messages": [{"role": "user", "content": "q"}], **fields})


def test_outputs_of_tool_chains():
    import json

    build = OutputBuilder(TOOL_CONFIG, TOOL_SCHEMA, stop_token_ids=[1])
    engine = {"generated_text": '[get_weather(city="x")]', "num_input_tokens": 300, "num_generated_tokens": 9,
              "generated_tokens": [5, 1]}
    pending = build({"id": "a", **engine, R.TOOL_OUTCOME: _outcome(
        tool_calls=[{"name": "get_weather", "arguments": {"city": "x"}}])})
    assert pending[R.TEXT] is None and pending[R.FINISH_REASON] == "tool_calls" and pending[R.ERROR] is None
    assert json.loads(pending[R.TOOL_CALLS]) == [{"name": "get_weather", "arguments": {"city": "x"}}]
    assert json.loads(pending[R.TRANSCRIPT]) == [{"role": "user", "content": "q"}]
    answered = build({"id": "b", **engine, R.TOOL_OUTCOME: _outcome(content="It is 4.", rounds=2)})
    assert (answered[R.TEXT], answered[R.TOOL_CALLS], answered[R.FINISH_REASON]) == ("It is 4.", "[]", "stop")
    invalid = build({"id": "c", **engine, R.TOOL_OUTCOME: _outcome(error="call 1 (f): unknown tool 'f'")})
    assert invalid[R.ERROR] == "invalid_tool_call: round 1: call 1 (f): unknown tool 'f'"
    assert (invalid[R.ERROR_KIND], invalid[R.ERROR_STAGE], invalid[R.TEXT]) == ("invalid_tool_call", "tools", None)
    assert invalid[R.TRANSCRIPT] is not None, "the transcript shows what the model wrote"
    failed = build({"id": "d", INFERENCE_ERROR: "ValueError: too long", R.TOOL_OUTCOME: _outcome(rounds=2)})
    assert failed[R.ERROR_KIND] == "engine_error" and failed[R.TRANSCRIPT] is not None
    plain = build({"id": "e", "generated_text": "a cat", "num_input_tokens": 3, "num_generated_tokens": 1,
                   "generated_tokens": [1]})
    assert (plain[R.TEXT], plain[R.TOOL_CALLS], plain[R.TRANSCRIPT]) == ("a cat", None, None)


def test_rows_carry_finish_time_and_engine_latency():
    from datetime import datetime, timezone

    build = OutputBuilder(CONFIG, SCHEMA, stop_token_ids=[1])
    before = datetime.now(timezone.utc)
    ok = build({"id": "a", "generated_text": "t", "num_input_tokens": 3, "num_generated_tokens": 1,
                "generated_tokens": [1], "time_taken_llm": 1.25})
    assert ok[R.ENGINE_LATENCY_S] == 1.25 and before <= ok[R.FINISHED_AT] <= datetime.now(timezone.utc)
    # Ray writes time_taken_llm = -1 for a request the engine failed; rows that never reached it have none.
    failed = build({"id": "b", INFERENCE_ERROR: "ValueError: x", "time_taken_llm": -1})
    prepared = build({"id": "c", INFERENCE_ERROR: "m", R.ROW_ERROR: "empty_image: e", R.ROW_ERROR_KIND: "empty_image",
                      R.ROW_ERROR_STAGE: "image"})
    assert failed[R.ENGINE_LATENCY_S] is None and prepared[R.ENGINE_LATENCY_S] is None
    assert prepared[R.FINISHED_AT] is not None
    table = pa.Table.from_pylist([ok, failed, prepared], schema=SCHEMA)
    assert table.schema.field(R.FINISHED_AT).type == pa.timestamp("ms", tz="UTC")
