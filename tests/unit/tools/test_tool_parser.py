"""The Gemma 3 tool-call parser on hand-written model outputs, complete and streamed.

Every case runs three ways: `parse_tool_calls` (what the batch job uses), the vLLM plugin's
`extract_tool_calls` (the endpoint, complete) and its `extract_tool_calls_streaming` fed in chunks (the
endpoint, streamed): all three must give the same calls and content.
"""
import json

import pytest

from pipeline.tools.parser import CallProblem, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
        "required": ["amount", "to"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"filters": {"type": "object"}, "exact": {"type": "boolean"},
                                         "limit": {"type": ["integer", "null"]}}}}},
    {"type": "function", "function": {"name": "now"}},
]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}

VALID = [
    pytest.param('[get_weather(city="Paris")]', [PARIS], None, id="calls-alone"),
    pytest.param('  [get_weather(city="Paris")]\n', [PARIS], None, id="calls-alone-whitespace"),
    pytest.param("Let me look that up.\n[get_weather(city='Paris')]", [PARIS], "Let me look that up.",
                 id="text-then-calls"),
    pytest.param('[get_weather(city="Paris")]\nI asked for the weather.', [PARIS], "I asked for the weather.",
                 id="calls-then-text"),
    pytest.param('```tool_code\nget_weather(city="Paris")\n```', [PARIS], None, id="tool-code-fence-bare-call"),
    pytest.param('Checking.\n```tool_code\n[get_weather(city="Paris")]\n```', [PARIS], "Checking.",
                 id="tool-code-fence-list"),
    pytest.param('```python\nget_weather(city="Paris")\nconvert(amount=3.5, to="EUR")\n```',
                 [PARIS, {"name": "convert", "arguments": {"amount": 3.5, "to": "EUR"}}], None,
                 id="python-fence-two-lines"),
    pytest.param('```tool_code\nget_weather(city="Paris")', [PARIS], None, id="fence-cut-before-closing"),
    pytest.param('[get_weather(city="Paris", unit="c"), convert(amount=-12, to="USD"), now()]',
                 [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
                  {"name": "convert", "arguments": {"amount": -12, "to": "USD"}},
                  {"name": "now", "arguments": {}}], None, id="several-calls"),
    pytest.param('[search(filters={"tags": ["a", "b"], "range": {"min": 1, "max": [2, 3]}}, exact=true, limit=null)]',
                 [{"name": "search", "arguments": {"filters": {"tags": ["a", "b"], "range": {"min": 1, "max": [2, 3]}},
                                                   "exact": True, "limit": None}}], None, id="nested-json-literals"),
    pytest.param("[search(filters={'k': (1, 2)}, exact=False, limit=None)]",
                 [{"name": "search", "arguments": {"filters": {"k": [1, 2]}, "exact": False, "limit": None}}], None,
                 id="python-literals"),
    pytest.param('[get_weather(city="Saint-\\"É\\", it\'s [x] (y)")]',
                 [{"name": "get_weather", "arguments": {"city": 'Saint-"É", it\'s [x] (y)'}}], None,
                 id="quotes-and-brackets-inside-string"),
    pytest.param("[get_weather(city='''New\nYork''')]", [{"name": "get_weather", "arguments": {"city": "New\nYork"}}],
                 None, id="triple-quoted"),
    pytest.param('[get_weather(city="New\nYork")]', [{"name": "get_weather", "arguments": {"city": "New\nYork"}}],
                 None, id="raw-newline-in-string"),
    pytest.param("A sunny day in Paris [1], with clouds.", [], "A sunny day in Paris [1], with clouds.",
                 id="no-calls-brackets-in-prose"),
    pytest.param("Use `x` and ``y``.", [], "Use `x` and ``y``.", id="no-calls-backticks"),
    pytest.param("Code:\n```python\nprint(sorted([3, 1]))\n```", [], "Code:\n```python\nprint(sorted([3, 1]))\n```",
                 id="python-fence-with-code-is-text"),
    pytest.param('```json\n[get_weather(city="Paris")]\n```', [], '```json\n[get_weather(city="Paris")]\n```',
                 id="other-fence-is-text"),
    pytest.param("", [], None, id="empty"),
    pytest.param('First [get_weather(city="Paris")], then [convert(amount=1, to="EUR"), now()] and done.',
                 [PARIS, {"name": "convert", "arguments": {"amount": 1, "to": "EUR"}}, {"name": "now", "arguments": {}}],
                 "First , then  and done.", id="two-lists"),
    pytest.param('[get_weather(city="Paris")]\nAlso:\n```tool_code\nnow()\n```\n[convert(amount=2, to="USD")]',
                 [PARIS, {"name": "now", "arguments": {}}, {"name": "convert", "arguments": {"amount": 2, "to": "USD"}}],
                 "Also:", id="list-fence-list"),
]

MALFORMED = [
    pytest.param('[get_weather(city="Paris"', CallProblem.MALFORMED, "was never closed", id="unclosed-bracket"),
    pytest.param('[get_weather(city="Paris"]', CallProblem.MALFORMED, "does not match", id="mismatched-bracket"),
    pytest.param('[get_weather(city="Paris)]', CallProblem.MALFORMED, "cannot read the tool call block",
                 id="unterminated-string"),
    pytest.param('[get_weather(city="Paris") convert(amount=1, to="x")]', CallProblem.MALFORMED,
                 "cannot read the tool call block", id="missing-comma"),
    pytest.param('[get_time(zone="UTC")]', CallProblem.UNKNOWN_TOOL,
                 "call 1 (get_time): unknown tool 'get_time' (available: convert, get_weather, now, search)",
                 id="unknown-tool"),
    pytest.param('[get_weather(city="Paris"), get_weather(city=75001)]', CallProblem.INVALID_ARGUMENTS,
                 "call 2 (get_weather): argument 'city': 75001 is not of type 'string'", id="wrong-type"),
    pytest.param('[convert(amount="3", to="EUR")]', CallProblem.INVALID_ARGUMENTS,
                 "argument 'amount': '3' is not of type 'number'", id="number-as-string"),
    pytest.param('[get_weather(unit="k")]', CallProblem.INVALID_ARGUMENTS, "'city' is a required property",
                 id="missing-required"),
    pytest.param('[get_weather(city="Paris", unit="k")]', CallProblem.INVALID_ARGUMENTS,
                 "argument 'unit': 'k' is not one of ['c', 'f']", id="enum"),
    pytest.param('[get_weather("Paris")]', CallProblem.MALFORMED, "positional arguments are not allowed",
                 id="positional"),
    pytest.param('[get_weather(city=input("city?"))]', CallProblem.MALFORMED,
                 "argument 'city' must be a literal", id="not-a-literal"),
    pytest.param('[get_weather(**{"city": "Paris"})]', CallProblem.MALFORMED, "**arguments are not allowed",
                 id="double-star"),
    pytest.param('[get_weather(city="Paris"), 3]', CallProblem.MALFORMED, "must contain only calls",
                 id="not-only-calls"),
    pytest.param('```tool_code\nx = get_weather(city="Paris")\n```', CallProblem.MALFORMED,
                 "got other Python statements", id="fence-with-assignment"),
]


@pytest.mark.parametrize("text, calls, content", VALID)
def test_reads_calls_and_content(text, calls, content):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.ok, parsed.describe_errors()
    assert [c.as_dict() for c in parsed.calls] == calls
    assert parsed.content == content


@pytest.mark.parametrize("text, problem, message", MALFORMED)
def test_malformed_calls_give_clear_errors(text, problem, message):
    parsed = parse_tool_calls(text, TOOLS)
    assert not parsed.ok
    assert parsed.errors[0].problem == problem
    assert message in parsed.describe_errors(), parsed.describe_errors()


MIXED = 'Look: [get_weather(city="Paris")] and [get_time(zone="UTC")] then [convert(amount=1, to="EUR")]'


def test_every_block_is_read_and_a_bad_one_still_reports_its_error():
    parsed = parse_tool_calls(MIXED, TOOLS)
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time", "convert"]
    assert [e.problem for e in parsed.errors] == [CallProblem.UNKNOWN_TOOL]
    assert parsed.describe_errors().startswith("call 2 (get_time): unknown tool 'get_time'")
    assert len(parsed.blocks) == 3 and parsed.content == "Look:  and  then"


def test_error_indexes_count_calls_across_blocks():
    parsed = parse_tool_calls('[now(), now()] [get_weather(city=input())]', TOOLS)
    assert parsed.describe_errors().startswith("call 3 (get_weather): argument 'city' must be a literal")


# ----------------------------------------------------------------------------- through the vLLM plugin
@pytest.fixture(scope="module")
def plugin(tiny_model):
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from pipeline.engine.tool_parser import Gemma3ToolParser

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                    max_tokens=4096)
    return Gemma3ToolParser, tokenizer, request


def run_plugin(plugin, text, mode, chunk_sizes=(1, 3, 2, 5, 4)):
    """(content, [{"name", "arguments"}]) from the plugin, complete or streamed in uneven chunks."""
    parser_class, tokenizer, request = plugin
    parser = parser_class(tokenizer, request.tools)
    if mode == "complete":
        info = parser.extract_tool_calls(text, request)
        calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in info.tool_calls]
        assert info.tools_called == bool(calls)
        return info.content, calls
    eos = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    content, calls, position, chunk, token_ids = "", [], 0, 0, []
    while position < len(text) or chunk == 0:
        size = chunk_sizes[chunk % len(chunk_sizes)]
        delta_text = text[position:position + size]
        position += size
        last = position >= len(text)
        delta_ids = [100 + chunk] + ([eos] if last else [])
        previous_ids = list(token_ids)
        token_ids += delta_ids
        delta = parser.extract_tool_calls_streaming(text[:position - size], text[:position], delta_text,
                                                    previous_ids, list(token_ids), delta_ids, request)
        chunk += 1
        if delta is None:
            continue
        content += delta.content or ""
        for call in delta.tool_calls:
            assert call.index == len(calls) and call.id and call.type == "function"
            calls.append({"name": call.function.name, "arguments": json.loads(call.function.arguments)})
    return content or None, calls


@pytest.mark.parametrize("mode", ["complete", "streamed"])
@pytest.mark.parametrize("text, calls, content", VALID)
def test_plugin_gives_the_same_calls(plugin, mode, text, calls, content):
    assert run_plugin(plugin, text, mode) == (content, calls)


@pytest.mark.parametrize("mode", ["complete", "streamed"])
@pytest.mark.parametrize("text, problem, message", MALFORMED)
def test_plugin_returns_invalid_calls_as_content(plugin, mode, text, problem, message):
    assert run_plugin(plugin, text, mode) == (text.strip(), [])


@pytest.mark.parametrize("mode", ["complete", "streamed"])
def test_plugin_keeps_valid_blocks_and_returns_a_bad_one_as_content(plugin, mode):
    content, calls = run_plugin(plugin, MIXED, mode)
    assert [c["name"] for c in calls] == ["get_weather", "convert"]
    assert content == 'Look:  and [get_time(zone="UTC")] then'


def test_streaming_sends_text_before_the_calls_are_complete(plugin):
    parser_class, tokenizer, request = plugin
    parser = parser_class(tokenizer, request.tools)
    sent = []
    text = 'The weather:\n[get_weather(city="Paris")]'
    for end in range(1, len(text) + 1):
        delta = parser.extract_tool_calls_streaming(text[:end - 1], text[:end], text[end - 1], [], [100] * end,
                                                    [100], request)
        sent.append(delta)
    first_content = next(i for i, d in enumerate(sent) if d and d.content)
    first_call = next(i for i, d in enumerate(sent) if d and d.tool_calls)
    assert first_content < text.index("[") and first_call == len(text) - 1, "text streams; the call when closed"
    assert "".join(d.content or "" for d in sent if d) == "The weather:"


def test_streaming_ends_at_max_tokens(plugin):
    """Without a stop token the last chunk is known from the token count: held-back text is flushed."""
    parser_class, tokenizer, request = plugin
    request = request.model_copy(update={"max_tokens": 2})
    parser = parser_class(tokenizer, request.tools)
    first = parser.extract_tool_calls_streaming("", "Hi [get", "Hi [get", [], [7], [7], request)
    last = parser.extract_tool_calls_streaming("Hi [get", "Hi [get_we", "_we", [7], [7, 8], [8], request)
    assert first.content == "Hi" and last.content == " [get_we" and not last.tool_calls


def test_vllm_finds_the_parser_through_the_plugin_entry_point():
    """A fresh process, as a Ray Serve replica is: vLLM's general-plugin loading registers `gemma3`."""
    import subprocess
    import sys

    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.tool_parsers.abstract_tool_parser import ToolParserManager; "
            "print(ToolParserManager.get_tool_parser('gemma3').__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "Gemma3ToolParser", result.stderr[-2000:]


# ------------------------------------------------------------------ the argument rules, against vLLM's own
LITERAL_SOURCES = [
    '"Paris"', "'x'", "3", "-2.5", "+4", "1e3", "True", "False", "None", "null", "true", "false",
    '{"a": [1, 2, {"b": null}], "c": (1, 2)}', "[1, 'two', -3.0]", "(1, 2)", "{'a'}", "f'plain'", "f'{x}'",
    "-True", "-'x'", "not True", "~1", "x", "a.b", "f(1)", "b'raw'", "...", "1j", "{x: 1}", "[1, y]", "1 + 2",
]
ESCAPE_SOURCES = [
    'f(a="line1\nline2")', "f(a='t\tb\rc\x00d')", 'f(a="q\\"uote\nx", b=\'\n\')', "f(\n a=1)\n",
    'f(a="ends with backslash\\', "f(a='unterminated\n", 'f(a="x\\\\", b="\ny")',
]


@pytest.mark.parametrize("source", LITERAL_SOURCES)
def test_argument_literals_follow_vllms_rules(source):
    """pipeline.tools.literals keeps vLLM out of pipeline.tools; it must accept and refuse exactly what
    vLLM's get_parameter_value does, with the same values."""
    import ast

    from vllm.tool_parsers.utils import UnexpectedAstError, get_parameter_value

    from pipeline.tools.literals import NotALiteral, literal_value

    node = ast.parse(source, mode="eval").body
    try:
        expected = ("value", get_parameter_value(node))
    except UnexpectedAstError:
        expected = ("refused",)
    try:
        ours = ("value", literal_value(node))
    except NotALiteral:
        ours = ("refused",)
    assert ours == expected and type(ours[-1]) is type(expected[-1])


@pytest.mark.parametrize("source", ESCAPE_SOURCES)
def test_control_characters_are_escaped_as_vllm_escapes_them(source):
    from vllm.tool_parsers.utils import escape_ctrl_chars_in_strings

    from pipeline.tools.literals import escape_control_chars_in_strings

    assert escape_control_chars_in_strings(source) == escape_ctrl_chars_in_strings(source)
