"""The packaged Gemma 3 tool template: Gemma's own rendering without tools, and calls that round-trip."""
import re

import pytest

from pipeline.testing.tiny_gemma3 import CHAT_TEMPLATE as GEMMA3_TEMPLATE
from pipeline.tools.parser import parse_tool_calls
from pipeline.tools.template import load_tool_template, render_prompt

TOOLS = [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("messages", [
    pytest.param([{"role": "user", "content": "Hello"}], id="user"),
    pytest.param([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is it? "}]}],
                 id="system-parts-image"),
    pytest.param([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], id="multi-turn"),
])
def test_without_tools_it_renders_what_gemma3_renders(tokenizer, messages):
    ours = render_prompt(tokenizer, load_tool_template(), messages, None)
    assert ours == render_prompt(tokenizer, GEMMA3_TEMPLATE, messages, None)


def test_tools_go_into_the_first_user_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather?"}]}]
    prompt = render_prompt(tokenizer, load_tool_template(), messages, TOOLS)
    first_turn = prompt.split("<end_of_turn>")[0]
    assert first_turn.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou can use these tools")
    assert '{"name": "get_weather", "description": "Weather now", "parameters":' in first_turn
    assert "[tool_name(" in first_turn and first_turn.endswith("<start_of_image>Weather?")
    assert prompt.endswith("<start_of_turn>model\n")


ARGUMENTS = [
    {"city": 'Saint-"É"\nline two', "n": 3, "x": -1.5, "ok": True, "no": False, "none": None},
    {"nested": {"a": [1, {"b": None, "c": [True, "]"]}], "q": "it's"}, "empty": {}},
]


def test_calls_rendered_by_the_template_read_back_the_same(tokenizer):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
             for i, (name, arguments) in enumerate([("get_weather", ARGUMENTS[0]), ("search", ARGUMENTS[1])])]
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "On it.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c0", "content": '{"temp": 20}'},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "found"}]}]
    prompt = render_prompt(tokenizer, load_tool_template(), messages, TOOLS)
    model_turn = re.search(r"<start_of_turn>model\n(.*?)<end_of_turn>", prompt, re.S).group(1)
    parsed = parse_tool_calls(model_turn, None)
    assert parsed.ok and parsed.content == "On it."
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", ARGUMENTS[0]), ("search", ARGUMENTS[1])]
    results_turn = prompt.split("<start_of_turn>user\n")[-1]
    assert results_turn == '```tool_output\n{"temp": 20}\n```\n```tool_output\nfound\n```<end_of_turn>\n' \
                           "<start_of_turn>model\n", "all results in one user turn, in call order"


@pytest.mark.parametrize("messages, message", [
    pytest.param([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate",
                 id="two-user-turns"),
    pytest.param([{"role": "assistant", "content": "a"}], "must alternate", id="starts-with-model"),
    pytest.param([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": 1}'}}]}], "must be a mapping", id="string-arguments"),
    pytest.param([{"role": "developer", "content": "a"}], "Unsupported role developer", id="unknown-role"),
])
def test_bad_conversations_are_refused(tokenizer, messages, message):
    with pytest.raises(Exception, match=message):
        render_prompt(tokenizer, load_tool_template(), messages, TOOLS)
