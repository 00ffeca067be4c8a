"""The request checks and error shape the endpoint and OpenAI Batch share (pipeline.openai.checks, .errors): one request refused
by both front ends gets the same code, param and message, apart from the config field each names; and
the two max_tokens caps default from one formula."""
import json

import pytest

from pipeline.config import PipelineConfig
from pipeline.openai.batch_requests import LineError, RequestLimits, parse_request_line
from pipeline.serve.guard import ApiError, RequestPolicy, check_body

CHAT = "/v1/chat/completions"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def config(**engine):
    return PipelineConfig.load(environ={}, overrides=[f"engine.{k}={v}" for k, v in engine.items()] +
                               ["serve.max_images_per_request=1", "engine.max_images_per_prompt=1"])


def both(body, cfg):
    """(endpoint error, batch error) for one chat completion body."""
    with pytest.raises(ApiError) as online:
        check_body(CHAT, json.loads(json.dumps(body)), RequestPolicy.from_config(cfg), 100)
    line = json.dumps({"custom_id": "r1", "method": "POST", "url": CHAT, "body": body})
    with pytest.raises(LineError) as batch:
        parse_request_line(line, RequestLimits.from_config(cfg))
    return online.value, batch.value


@pytest.mark.parametrize("body, code, param, online_says, batch_says", [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model_not_found", "model",
     "model 'gpt-4o' does not exist; this endpoint serves gemma-3-12b-it",
     "model 'gpt-4o' does not exist; this job serves gemma-3-12b-it (openai_batch.accepted_model_names adds names)"),
    ({"model": "gemma-3-12b-it", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]},
     "max_tokens_exceeded", "max_tokens",
     "max_tokens 5000 exceeds the cap of 4096 (serve.max_tokens_cap)",
     "max_tokens 5000 exceeds the cap of 4096 (openai_batch.max_tokens_cap)"),
])
def test_one_refusal_two_front_ends(body, code, param, online_says, batch_says):
    online, batch = both(body, config())
    assert (online.status, online.code, online.param, online.message) == (400, code, param, online_says)
    assert (batch.status, batch.code, batch.param, batch.message) == (400, code, param, batch_says)
    # One error shape: the endpoint's response body and the batch error line's body.
    assert online.body() == {"error": {"message": online_says, "type": "invalid_request_error", "param": param,
                                       "code": code}}
    assert batch.body() == {"error": {**online.body()["error"], "message": batch_says}}


def test_too_many_images_names_the_first_image_over_the_limit():
    online, batch = both({"model": "gemma-3-12b-it", "messages": [
        {"role": "user", "content": [IMAGE, IMAGE, {"type": "text", "text": "two"}]}]}, config())
    assert online.code == batch.code == "too_many_images"
    assert online.message == "the request has 2 images; at most 1 per request (serve.max_images_per_request)"
    assert batch.message == "the request has 2 images; at most 1 per request (engine.max_images_per_prompt)"
    assert online.param == "messages[0].content[1]" and batch.param == "messages[0].content[1].image_url.url"


@pytest.mark.parametrize("max_model_len, sampling_max_tokens, serve_cap, batch_cap", [
    (8192, 256, 4096, 4096),
    (2048, 1500, 1024, 1500),  # a batch line without max_tokens gets sampling.max_tokens: never refused
])
def test_caps_default_from_one_formula(max_model_len, sampling_max_tokens, serve_cap, batch_cap):
    cfg = PipelineConfig.load(environ={}, overrides=[f"engine.max_model_len={max_model_len}",
                                                     f"sampling.max_tokens={sampling_max_tokens}"])
    assert (cfg.serve.max_tokens_cap, cfg.openai_batch.max_tokens_cap) == (serve_cap, batch_cap)
    assert RequestPolicy.from_config(cfg).max_tokens_cap == serve_cap
    assert RequestLimits.from_config(cfg).max_tokens_cap == batch_cap
