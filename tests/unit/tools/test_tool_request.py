"""A record's tools and tool choice: checked before any engine time; forced calls read as vLLM does."""
import json

import pytest

from pipeline.tools.parser import CallProblem
from pipeline.stages.tools import structured_outputs
from pipeline.tools.request import ToolRequest, ToolRequestError, build_tool_request, interpret_turn

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALC = {"type": "function", "function": {"name": "calculate", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def test_record_tools_join_the_builtins():
    request = build_tool_request(json.dumps([WEATHER]), None, [CALC], "auto")
    assert [t["function"]["name"] for t in request.tools] == ["calculate", "get_weather"]
    assert request.tool_choice == "auto"
    named = build_tool_request(json.dumps([WEATHER]), "get_weather", [], "auto")
    assert named.forced_name == "get_weather" and named.after_first_round().tool_choice == "auto"
    assert build_tool_request(None, None, [], "auto") is None, "no tools: a plain record"
    assert ToolRequest.from_json(named.to_json()) == named


@pytest.mark.parametrize("tools, choice, message", [
    pytest.param("[{", None, "'tools' is not valid JSON", id="bad-json"),
    pytest.param('{"name": "x"}', None, "must be a JSON list of tool definitions, got dict", id="not-a-list"),
    pytest.param('[{"type": "retrieval"}]', None, "tools[0]: expected", id="not-a-function"),
    pytest.param('[{"type": "function", "function": {"name": "get weather"}}]', None,
                 "function name 'get weather' must be a Python identifier", id="bad-name"),
    pytest.param('[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]', None,
                 "tools[0] (f): parameters is not a valid JSON schema", id="bad-schema"),
    pytest.param(json.dumps([CALC]), None, "tool 'calculate' is defined twice", id="collides-with-builtin"),
    pytest.param(json.dumps([WEATHER]), "get_time", "tool_choice 'get_time' is none of auto, none, required "
                 "and names no offered tool (tools: calculate, get_weather)", id="unknown-choice"),
])
def test_unusable_tools_are_refused_with_the_reason(tools, choice, message):
    with pytest.raises(ToolRequestError) as caught:
        build_tool_request(tools, choice, [CALC], "auto")
    assert message in str(caught.value)


def test_forcing_uses_vllms_own_schemas():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    tools = (WEATHER, CALC)
    assert structured_outputs(ToolRequest(tools, "auto")) is None
    assert structured_outputs(ToolRequest(tools, "none")) is None
    named = structured_outputs(ToolRequest(tools, {"type": "function", "function": {"name": "get_weather"}}))
    assert json.loads(named["json"]) == WEATHER["function"]["parameters"]
    required = json.loads(structured_outputs(ToolRequest(tools, "required"))["json"])
    expected = get_json_schema_from_tools("required", [ChatCompletionToolsParam.model_validate(t) for t in tools])
    assert required == expected and required["type"] == "array"


def test_forced_outputs_are_read_like_vllm_reads_them():
    named = ToolRequest((WEATHER,), {"type": "function", "function": {"name": "get_weather"}})
    assert interpret_turn('{"city": "Paris"}', named).calls[0].as_dict() == \
        {"name": "get_weather", "arguments": {"city": "Paris"}}
    cut = interpret_turn('{"city": "Par', named)
    assert cut.errors[0].problem == CallProblem.MALFORMED and "cut by max_tokens?" in str(cut.errors[0])
    wrong = interpret_turn('{"city": 3}', named)
    assert "argument 'city': 3 is not of type 'string'" in wrong.describe_errors()
    required = ToolRequest((WEATHER, CALC), "required")
    parsed = interpret_turn('[{"name": "calculate", "parameters": {"expression": "1+1"}}]', required)
    assert parsed.ok and parsed.calls[0].name == "calculate" and parsed.content is None
    assert interpret_turn("[get_weather(city='x')]", ToolRequest((WEATHER,), "none")).content == \
        "[get_weather(city='x')]", "tool_choice none: the text is returned as written"
    assert interpret_turn("[get_weather(city='x')]", ToolRequest((WEATHER,), "auto")).calls[0].name == "get_weather"
