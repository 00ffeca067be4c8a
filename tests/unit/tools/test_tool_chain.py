"""The rounds of one record's tool chain, driven by a scripted engine.

FakeEngine stands in for vLLM here because a real engine with random weights cannot be made to write a
chosen call; the real engine runs the same chain in tests/integration/test_tools_e2e.py.
"""
import asyncio
import json

import pytest

from pipeline.config import ToolsSection
from pipeline.tools.builtins import build_registry
from pipeline.tools.chain import Generation, run_tool_chain
from pipeline.tools.registry import Tool, ToolContext, ToolRegistry
from pipeline.tools.builtins import builtin_definitions
from pipeline.tools.request import ToolRequest, build_tool_request

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How big is it?"}]}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class FakeEngine:
    """Answers each round with the next scripted text and records what it was asked."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    async def __call__(self, round_index, messages, request):
        self.calls.append({"round": round_index, "messages": json.loads(json.dumps(messages)),
                           "request": request})
        return Generation(text=self.answers[round_index], prompt_tokens=100 + round_index, completion_tokens=5)


def _registry():
    from pipeline.config import PipelineConfig

    config = PipelineConfig.load(overrides=["tools.builtins=[calculate,image_metadata]"], environ={})
    return config, build_registry(config)


def _run(request, engine, max_rounds=3, registry=None, timeout_s=5.0):
    registry = registry or _registry()[1]
    context = ToolContext(record_id="r1", image_info={"width": 640, "height": 480})
    return asyncio.run(run_tool_chain(USER, request, registry, context, engine, max_rounds=max_rounds,
                                      tool_timeout_s=timeout_s))


def _request(choice="auto", record_tools=None):
    config, _ = _registry()
    return build_tool_request(json.dumps(record_tools) if record_tools else None, choice,
                              builtin_definitions(config.tools), "auto")


def test_forced_call_runs_the_tool_and_the_model_answers():
    engine = FakeEngine("{}", "It is 640 by 480 pixels.")
    outcome = _run(_request("image_metadata"), engine)
    assert outcome.error is None and outcome.rounds == 2 and outcome.content == "It is 640 by 480 pixels."
    assert outcome.pending_calls == () and (outcome.prompt_tokens, outcome.completion_tokens) == (201, 10)
    assert engine.calls[0]["request"].forced_name == "image_metadata", "round 1 forced"
    assert engine.calls[1]["request"].tool_choice == "auto", "later rounds are auto"
    row = json.loads(outcome.to_json())
    assistant, tool, answer = row["messages"][1:]
    assert assistant["tool_calls"][0]["function"] == {"name": "image_metadata", "arguments": "{}"}
    assert tool == {"role": "tool", "tool_call_id": "call_0_0", "name": "image_metadata",
                    "content": '{"width": 640, "height": 480}'}
    assert answer == {"role": "assistant", "content": "It is 640 by 480 pixels."}
    assert engine.calls[1]["messages"][2]["role"] == "tool", "round 2 sees the tool result"


def test_pythonic_calls_in_auto_mode_and_several_rounds():
    engine = FakeEngine('Let me compute.\n[calculate(expression="1/3 + 1/6")]',
                        '```tool_code\ncalculate(expression="2**10")\n```', "Done: 1/2 and 1024.")
    outcome = _run(_request(), engine)
    results = [json.loads(m["content"])["result"] for m in outcome.messages if m["role"] == "tool"]
    assert results == ["1/2", "1024"] and outcome.rounds == 3 and outcome.content == "Done: 1/2 and 1024."
    assert outcome.messages[1]["content"] == "Let me compute."


def test_calls_to_the_records_own_tools_are_returned_not_run():
    engine = FakeEngine('[get_weather(city="Paris")]', "unused")
    outcome = _run(_request(record_tools=[WEATHER]), engine)
    assert [c.as_dict() for c in outcome.pending_calls] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert outcome.rounds == 1 and len(engine.calls) == 1


def test_the_last_round_returns_its_calls():
    outcome = _run(_request(), FakeEngine('[calculate(expression="1+1")]'), max_rounds=1)
    assert outcome.pending_calls[0].name == "calculate" and not any(m["role"] == "tool" for m in outcome.messages)


def test_an_invalid_call_ends_the_chain_with_the_reason_and_the_raw_turn():
    outcome = _run(_request(), FakeEngine("[calculate(expression=42)]", "unused"))
    assert outcome.error == "call 1 (calculate): argument 'expression': 42 is not of type 'string'"
    assert outcome.messages[-1] == {"role": "assistant", "content": "[calculate(expression=42)]"}


def test_a_tool_failure_goes_back_to_the_model():
    outcome = _run(_request(), FakeEngine('[calculate(expression="1/0")]', "Sorry."))
    assert json.loads(outcome.messages[2]["content"]) == {"error": "division by zero"}
    assert outcome.content == "Sorry." and outcome.error is None


def test_a_slow_tool_times_out():
    import time

    slow = ToolRegistry([Tool("calculate", "", {"type": "object"}, lambda a, c: time.sleep(1))])
    outcome = _run(_request(), FakeEngine('[calculate(expression="1")]', "ok"), registry=slow, timeout_s=0.1)
    assert json.loads(outcome.messages[2]["content"]) == {"error": "the tool did not answer within 0.1s"}


def test_an_engine_error_stops_the_chain():
    class FailingEngine(FakeEngine):
        async def __call__(self, round_index, messages, request):
            return Generation(text="", error="ValueError: prompt too long")

    outcome = _run(_request(), FailingEngine())
    assert outcome.last.error == "ValueError: prompt too long" and outcome.final is None


def test_tool_choice_none_leaves_the_text_alone():
    outcome = _run(ToolRequest((WEATHER,), "none"), FakeEngine(' [get_weather(city="x")] '))
    assert outcome.content == ' [get_weather(city="x")] ' and outcome.pending_calls == ()


def test_max_rounds_is_bounded():
    with pytest.raises(ValueError):
        ToolsSection(max_rounds=0)
