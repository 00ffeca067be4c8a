"""OpenAI Batch files through `jobs.caption` on the real vLLM CPU engine, local Ray and a real S3 server.

The request bodies are built from the `openai` package's own request types and checked against its
`CompletionCreateParamsNonStreaming` before they are written; every line that comes back is read with the
package's response models (`ChatCompletion` for bodies, `ErrorObject` and `BatchError` for errors). The
input is an S3 prefix holding a plain and a gzipped request file; images come as a data: URL and from S3.
The model has random weights: the tool call and the JSON come from guided decoding, the texts are noise.
"""
import base64
import gzip
import io
import json
from collections import Counter

import jsonschema
import pytest
from openai.types import BatchError, ErrorObject
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from openai.types.shared_params import ResponseFormatJSONSchema
from PIL import Image
from pydantic import TypeAdapter

from tests.conftest import TINY_CPU_CONFIG, BackgroundJob

pytestmark = pytest.mark.integration

SERVED = "gemma-3-12b-it"
ALIAS = "gpt-4o-mini"  # accepted through openai_batch.accepted_model_names, as a migrated file names it
WEATHER: ChatCompletionFunctionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
VERDICT_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
ROWS_PER_FILE = 4
BODY = TypeAdapter(CompletionCreateParamsNonStreaming)


def _image(fmt: str, size=(320, 240), color=(200, 120, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def _user(text: str, image_url: str | None = None) -> ChatCompletionUserMessageParam:
    parts: list = [ChatCompletionContentPartTextParam(type="text", text=text)]
    if image_url:
        parts.append(ChatCompletionContentPartImageParam(type="image_url",
                                                         image_url={"url": image_url, "detail": "low"}))
    return ChatCompletionUserMessageParam(role="user", content=parts)


def _line(custom_id, model=ALIAS, url="/v1/chat/completions", **body) -> str:
    """One request line; its body must be a valid request for the openai package's types."""
    request = {"model": model, **body}
    BODY.validate_python(request)
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": request})


def build_requests():
    """(file name -> lines, {custom_id: what the good ones must give}, {marker: expected error})."""
    png_url = "data:image/png;base64," + base64.b64encode(_image("PNG")).decode()
    multiturn: list[ChatCompletionMessageParam] = [
        ChatCompletionSystemMessageParam(role="system", content="You answer in one sentence."),
        ChatCompletionUserMessageParam(role="user", content="Name a colour."),
        ChatCompletionAssistantMessageParam(role="assistant", content="Blue."),
        ChatCompletionUserMessageParam(role="user", content="Another one?"),
    ]
    tool_turns: list[ChatCompletionMessageParam] = [
        _user("What is the weather in Oslo?"),
        ChatCompletionAssistantMessageParam(role="assistant", tool_calls=[{
            "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]),
        ChatCompletionToolMessageParam(role="tool", tool_call_id="call_1", content='{"temperature_c": 4}'),
    ]
    forced = ChatCompletionNamedToolChoiceParam(type="function", function={"name": "get_weather"})
    verdict = ResponseFormatJSONSchema(type="json_schema", json_schema={"name": "verdict", "schema": VERDICT_SCHEMA,
                                                                         "strict": True})
    good = {
        "caption-data-url": _line("caption-data-url", max_completion_tokens=8, messages=[
            ChatCompletionDeveloperMessageParam(role="developer", content="Be brief."),
            _user("What is in this image?", png_url)]),
        "caption-s3": _line("caption-s3", model=SERVED, max_tokens=8,
                            messages=[_user("Describe it.", "s3://data/openai/images/photo.jpg")]),
        "multiturn": _line("multiturn", messages=multiturn, max_tokens=6, temperature=0.7, seed=7, stop=["\n\n\n"],
                           top_p=0.9, user="team-a", metadata={"job": "test"}),
        "tool-forced": _line("tool-forced", messages=[_user("Weather in Paris?")], tools=[WEATHER], tool_choice=forced,
                             max_tokens=40, parallel_tool_calls=False),
        "tool-result": _line("tool-result", messages=tool_turns, tools=[WEATHER], tool_choice="none", max_tokens=6),
        "json-schema": _line("json-schema", messages=[_user("Is the sky blue? Answer in JSON.")],
                             response_format=verdict, max_tokens=20),
    }
    long_prompt = " ".join(f"word{i}" for i in range(1500))
    bad = [  # (line, marker, expected code, status or None for a file-level error)
        ("{this is not json", "line:not-json", "invalid_json_line", None),
        (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"model": ALIAS}}), "line:no-custom-id",
         "missing_custom_id", None),
        (_line("wrong-url", url="/v1/embeddings", messages=[_user("x")]), "wrong-url", "unsupported_url", None),
        (_line("dup", messages=[_user("first")]), "dup", "duplicate_custom_id", None),
        (_line("dup", messages=[_user("second")]), "dup", "duplicate_custom_id", None),
        (_line("bad-base64", messages=[_user("x", "data:image/png;base64,%%%not-base64%%%")]), "bad-base64",
         "invalid_record", 400),
        (_line("metadata-service", messages=[_user("x", "http://169.254.169.254/latest/meta-data/")]),
         "metadata-service", "uri_not_allowed", 400),
        (_line("n-two", messages=[_user("x")], n=2), "n-two", "unsupported_parameter", 400),
        (_line("unknown-model", model="gpt-4o", messages=[_user("x")]), "unknown-model", "model_not_found", 400),
        (_line("too-many-tokens", messages=[_user("x")], max_tokens=100_000), "too-many-tokens",
         "max_tokens_exceeded", 400),
        (_line("too-long", messages=[_user(long_prompt)], max_tokens=4), "too-long", "context_length_exceeded", 400),
        (_line("roles", messages=[_user("a"), _user("b")]), "roles", "invalid_messages", 400),
    ]
    lines = list(good.values()) + [line for line, *_ in bad]
    # Two files (one gzipped), good and bad lines interleaved, a blank line in the first.
    files = {"requests-1.jsonl": lines[0::2], "requests-2.jsonl.gz": lines[1::2]}
    files["requests-1.jsonl"].insert(2, "")
    expected = Counter((marker, code, status) for _, marker, code, status in bad)
    return files, set(good), expected


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory, tiny_model, s3_server):
    """The job over build_requests()' files, started when the module's first test (the resume test, which
    runs its own jobs meanwhile on other prefixes) asks for it: each job spends most of its time starting
    processes, which leaves CPU to spare."""
    client = s3_server.client()
    client.put_object(Bucket="data", Key="openai/images/photo.jpg", Body=_image("JPEG", (640, 480), (30, 90, 200)))
    files, good, expected = build_requests()
    for name, lines in files.items():
        data = ("\n".join(lines) + "\n").encode()
        body = gzip.compress(data) if name.endswith(".gz") else data
        client.put_object(Bucket="data", Key=f"openai/in/{name}", Body=body)
    job = BackgroundJob("jobs.caption", "--input", "s3://data/openai/in/", "--output", "s3://data/openai/out",
                        "--config", str(TINY_CPU_CONFIG), "--model", str(tiny_model),
                        "--set", f"openai_batch.accepted_model_names=[{ALIAS}]",
                        "--set", f"batch.rows_per_file={ROWS_PER_FILE}", env=s3_server.env(),
                        log_dir=tmp_path_factory.mktemp("openai-batch"))
    yield job, files, good, expected
    job.stop()


@pytest.fixture(scope="module")
def batch_output(batch_job, s3_server):
    job, files, good, expected = batch_job
    result = job.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    client = s3_server.client()
    written = {}
    for entry in client.list_objects_v2(Bucket="data", Prefix="openai/out/")["Contents"]:
        name = entry["Key"].rsplit("/", 1)[-1]
        if name.endswith(".png"):  # the report's charts (_report/)
            continue
        written[name] = client.get_object(Bucket="data", Key=entry["Key"])["Body"].read().decode()
    return written, files, good, expected


def _lines(written, prefix):
    return [(name, json.loads(text)) for name, body in sorted(written.items()) if name.startswith(prefix)
            for text in body.splitlines()]


# ------------------------------------------------------------------------------------------------ resume
KILL_LINES = 32


def test_driver_killed_mid_run_and_rerun_gives_every_custom_id_once(tiny_model, s3_server, tmp_path, monkeypatch,
                                                                    batch_job):
    """The driver (its whole process tree) is SIGKILLed once a quarter of the lines are committed, and the same
    command is rerun: every custom_id comes back exactly once across output and error files, the rerun
    resumes (attempts: interrupted, then complete), prints the status line and writes the report. Timed on
    what the output holds, as tests/integration/test_faults.py's parquet test is (its Job class runs both)."""
    from tests.integration.test_faults import BUSY_ENGINE, Job

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    lines = [_line(f"req-{i:02d}", messages=[_user(f"Count to {i}.")]) for i in range(KILL_LINES - 1)]
    lines.insert(7, "{not json")  # an error line, resumed like any other
    for part in range(3):
        client.put_object(Bucket="data", Key=f"openai-kill/in/requests-{part}.jsonl",
                          Body=("\n".join(lines[part::3]) + "\n").encode())
    prefix = "openai-kill/out/"

    def committed() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket="data", Prefix=prefix).get("Contents", [])
        return {e["Key"][len(prefix):]: client.get_object(Bucket="data", Key=e["Key"])["Body"].read().decode()
                for e in listed if e["Key"].endswith(".jsonl")}

    def committed_lines() -> int:
        return sum(len(body.splitlines()) for body in committed().values())

    args = ("s3://data/openai-kill/in/", "s3://data/" + prefix.rstrip("/"))
    # 480 tokens a line (BUSY_ENGINE's 160 took a fast machine ~0.5 s a batch): several seconds of batches are
    # left when a quarter of the lines is seen.
    extra = (*BUSY_ENGINE, "--set", "sampling.max_tokens=480", "--set", f"openai_batch.accepted_model_names=[{ALIAS}]")
    first = Job(s3_server, tiny_model, *args, tmp_path / "run1.log", *extra)
    first.wait_for(lambda: committed_lines() >= KILL_LINES // 4, "a quarter of the lines written")
    first.kill()
    written_when_killed = committed_lines()
    assert written_when_killed < KILL_LINES, "killed before it finished"
    attempts = json.loads(client.get_object(Bucket="data", Key=prefix + "_attempts.json")["Body"].read())
    assert [a["status"] for a in attempts["attempts"]] == ["running"]

    second = Job(s3_server, tiny_model, *args, tmp_path / "run2.log", *extra)
    assert second.wait() == 0, second.log()
    written = committed()
    found = Counter(json.loads(text)["custom_id"] for body in written.values() for text in body.splitlines())
    assert found == Counter([f"req-{i:02d}" for i in range(KILL_LINES - 1)] + [None]), found
    assert len(_lines(written, "errors-")) == 1 and _lines(written, "errors-")[0][1]["error"]["code"] == \
        "invalid_json_line"
    names = sorted(written)
    assert any(n.split("-")[1] == "001" for n in names) and any(n.split("-")[1] == "002" for n in names), \
        "the killed attempt's files are kept, the rerun writes its own"
    manifest = json.loads(client.get_object(Bucket="data", Key=prefix + "_manifest.json")["Body"].read())
    assert manifest["status"] == "complete" and manifest["resume"]["exactly_once"]
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == KILL_LINES
    assert sorted(f.rsplit("/", 1)[-1] for f in manifest["files"]) == names
    first_attempt, second_attempt = manifest["attempts"]
    assert first_attempt["status"] == "interrupted" and second_attempt["status"] == "complete"
    assert second_attempt["mode"] == "resume" and second_attempt["rows_done_before"] >= written_when_killed
    # Lines committed before the kill were not run again; only the rest reached the engine.
    assert second_attempt["rows_written"] == KILL_LINES - second_attempt["rows_done_before"]
    assert second_attempt["engine_requests"] <= KILL_LINES - second_attempt["rows_done_before"]
    log = second.log(200_000)
    remaining = KILL_LINES - second_attempt["rows_done_before"]
    assert f"done: {remaining:,}/{remaining:,} rows" in log, "the status line's final count"
    report = client.get_object(Bucket="data", Key=prefix + "_report/report.html")["Body"].read().decode()
    assert f'data-metric="rows_out" data-value="{KILL_LINES}"' in report and "invalid_json_line" in report


# ------------------------------------------------------------------------------------------------ batch_job's output
def test_every_request_comes_back_once_in_the_right_file(batch_output):
    written, files, good, expected = batch_output
    outputs, errors = _lines(written, "output-"), _lines(written, "errors-")
    assert sorted(line["custom_id"] for _, line in outputs) == sorted(good)
    assert len(errors) == sum(expected.values())
    assert len(outputs) + len(errors) == sum(1 for lines in files.values() for line in lines if line)
    for name, body in written.items():
        if name.endswith(".jsonl"):
            assert len(body.splitlines()) <= ROWS_PER_FILE, f"{name} is not sharded"
    assert all(set(line) == {"id", "custom_id", "response", "error"} for _, line in outputs + errors)
    ids = [line["id"] for _, line in outputs + errors]
    assert len(set(ids)) == len(ids) and all(i.startswith("batch_req_") for i in ids)


def test_output_bodies_are_chat_completions(batch_output):
    written, _, _, _ = batch_output
    bodies = {}
    for _, line in _lines(written, "output-"):
        assert line["error"] is None and line["response"]["status_code"] == 200 and line["response"]["request_id"]
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.object == "chat.completion" and completion.model == SERVED
        assert len(completion.choices) == 1 and completion.choices[0].message.role == "assistant"
        usage = completion.usage
        assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        bodies[line["custom_id"]] = completion

    for custom_id in ("caption-data-url", "caption-s3"):
        choice = bodies[custom_id].choices[0]
        assert choice.message.content and choice.message.tool_calls is None
        assert bodies[custom_id].usage.prompt_tokens > 256, "the image's 256 soft tokens are in the prompt"
        assert bodies[custom_id].usage.completion_tokens <= 8 and choice.finish_reason in ("stop", "length")
    assert bodies["multiturn"].usage.prompt_tokens < 256 and bodies["multiturn"].choices[0].message.content

    forced = bodies["tool-forced"].choices[0]
    assert forced.finish_reason == "stop", "a call forced by name finishes with 'stop', as the OpenAI API's"
    assert forced.message.content is None and len(forced.message.tool_calls) == 1
    call = forced.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 12

    answered = bodies["tool-result"].choices[0]
    assert answered.message.tool_calls is None and answered.message.content
    assert bodies["tool-result"].usage.prompt_tokens > bodies["multiturn"].usage.prompt_tokens, "tools listed"

    verdict = json.loads(bodies["json-schema"].choices[0].message.content)
    jsonschema.validate(verdict, VERDICT_SCHEMA)


def test_broken_lines_come_back_as_errors(batch_output):
    written, _, _, expected = batch_output
    found = Counter()
    for _, line in _lines(written, "errors-"):
        if line["response"] is None:
            error = BatchError.model_validate(line["error"])
            assert error.message and error.line >= 1
            marker = line["custom_id"] or f"line:{'not-json' if error.code == 'invalid_json_line' else 'no-custom-id'}"
            found[(marker, error.code, None)] += 1
        else:
            assert line["error"] is None and line["response"]["request_id"]
            error = ErrorObject.model_validate(line["response"]["body"]["error"])
            assert error.type == "invalid_request_error" and len(error.message) > 10
            found[(line["custom_id"], error.code, line["response"]["status_code"])] += 1
    assert found == expected


def test_manifest_counts_what_was_written(batch_output):
    written, _, good, expected = batch_output
    manifest = json.loads(written["_manifest.json"])
    counts = manifest["counts"]
    assert manifest["status"] == "complete" and manifest["format"] == "openai-batch"
    assert counts["rows_in"] == counts["rows_out"] == len(good) + sum(expected.values())
    assert counts["ok"] == len(good) and counts["errors"] == sum(expected.values())
    by_code = Counter()
    for (_, code, _), count in expected.items():
        by_code[code] += count
    assert counts["errors_by_kind"] == dict(by_code)
    assert sorted(f.rsplit("/", 1)[-1] for f in manifest["files"]) == sorted(n for n in written if n.endswith(".jsonl"))
    assert len(manifest["input_files"]) == 2 and manifest["tokens"]["completion"] > 0
