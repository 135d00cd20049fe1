"""The server's pieces that need no server: tool-call parsing, grammars, metrics text, memory estimates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmdesk.formats.gguf import read_gguf
from llmdesk.runtime.templates import BUILTIN_TEMPLATES, resolve_template
from llmdesk.runtime import toolcalls as tools
from llmdesk.runtime.grammars import JSON_OBJECT_GRAMMAR, response_format_grammar, schema_grammar
from llmdesk.runtime.limits import InvalidRequest
from llmdesk.serve.memory import estimate_load_bytes
from llmdesk.serve.metrics import Metrics

NAMES = ["get_weather", "add"]


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>', "Let me check.",
     [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}', "", [("add", {"a": 1})]),  # cut off at the end
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),
    ('{"name": "add", "parameters": {"a": 5, "b": 6}}', "", [("add", {"a": 5, "b": 6})]),  # Llama 3 without the tag
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 1}}]', "", [("add", {"a": 1, "b": 1})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "", [("get_weather", {"city": "Oslo"})]),
    ('[{"name": "add", "arguments": {"a": 2, "b": 2}}, {"name": "get_weather", "arguments": {}}]', "",
     [("add", {"a": 2, "b": 2}), ("get_weather", {})]),
    # not calls: plain text, JSON that is not a call, a function that was not offered
    ("The answer is 42.", "The answer is 42.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got = tools.parse(text, NAMES)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got)


def _spec(choice="auto", template="chatml"):
    t = resolve_template(None, template)
    fn = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
    wx = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    return tools.tool_spec([fn, wx], choice, t)


def test_stream_filter_passes_text_and_holds_calls():
    f = tools.StreamFilter(_spec())
    out = "".join(f.feed(p) for p in ["Sure", ", let me", " add. <tool", "_call>{\"name\": \"add\", ",
                                      "\"arguments\": {\"a\": 1, \"b\": 2}}</tool_call>"])
    tail, calls = f.finish()
    assert out + tail == "Sure, let me add. "
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    # a '<' that turns out not to start a marker is released
    f = tools.StreamFilter(_spec())
    out = "".join(f.feed(p) for p in ["a <", "b> c"])
    tail, calls = f.finish()
    assert out + tail == "a <b> c" and calls == []
    # JSON at the very start is held until the end, then released when it is not a call
    f = tools.StreamFilter(_spec())
    assert f.feed('{"x": 1}') == ""
    assert f.finish() == ('{"x": 1}', [])


def test_tool_spec_checks_and_prompt():
    spec = _spec()
    assert spec.native is False and spec.style == "hermes" and spec.names == ["add", "get_weather"]
    msgs = tools.prepare_messages([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                             "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"}, {"role": "tool", "content": "also 3"}], spec)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.\n\nYou can call functions")
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>\n<tool_response>\nalso 3\n</tool_response>"}
    assert tools.tool_spec([], "none", resolve_template(None, "chatml")) is None
    for bad, choice in (([{"type": "retrieval"}], "auto"), ([{"function": {"name": "a b"}}], "auto"),
                        (_spec().tools + _spec().tools, "auto"), (_spec().tools, "sometimes"),
                        (_spec().tools, {"type": "function", "function": {"name": "nope"}})):
        with pytest.raises(InvalidRequest):
            tools.tool_spec(bad, choice, resolve_template(None, "chatml"))
    # a template that renders tools itself gets them natively, in its own format
    native = resolve_template("{% if tools %}{{ tools | tojson }}{% endif %}[TOOL_CALLS]{{ messages[0].content }}")
    assert tools.tool_spec(spec.tools, "required", native).style == "mistral"


def test_forced_call_grammar_is_accepted_by_llama_cpp(tiny_gguf):
    import llama_cpp as C

    from llmdesk.runtime.llama import LlamaModel

    model = LlamaModel(tiny_gguf)
    try:
        for spec in (_spec("required"), _spec({"type": "function", "function": {"name": "add"}})):
            grammar = tools.grammar(spec)
            assert grammar.startswith('root ::= "<tool_call>\\n" tool-call "\\n</tool_call>"')
            sampler = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            assert sampler
            C.llama_sampler_free(sampler)
        for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}}}}}):
            sampler = C.llama_sampler_init_grammar(model.vocab, response_format_grammar(fmt).encode(), b"root")
            assert sampler
            C.llama_sampler_free(sampler)
    finally:
        model.close()
    assert tools.grammar(_spec("auto")) is None
    assert response_format_grammar({"type": "json_object"}) == JSON_OBJECT_GRAMMAR
    assert "enum" not in schema_grammar({"type": "integer", "minimum": 0, "maximum": 2})  # an enum rule of 0|1|2
    assert '"0"' in schema_grammar({"type": "integer", "minimum": 0, "maximum": 2})


def test_metrics_text():
    m = Metrics()
    m.counter("x_total", "Things.")
    m.histogram("t_seconds", "Times.", (0.1, 1.0))
    m.inc("x_total", model='a"b')
    m.observe("t_seconds", 0.5, model="a")
    m.observe("t_seconds", 5, model="a")
    text = m.render([("g", "A gauge.", {"model": "a"}, 2.5)])
    assert 'x_total{model="a\\"b"} 1' in text
    assert 't_seconds_bucket{model="a",le="0.1"} 0' in text and 't_seconds_bucket{model="a",le="1"} 1' in text
    assert 't_seconds_bucket{model="a",le="+Inf"} 2' in text and 't_seconds_count{model="a"} 2' in text
    assert 't_seconds_sum{model="a"} 5.5' in text and "# TYPE g gauge" in text and 'g{model="a"} 2.5' in text


def test_memory_estimate_is_fits(tiny_gguf):
    """The server asks llmdesk fit (whose numbers docs/fit.md checks against measured memory),
    less the process baseline it has already paid."""
    from llmdesk.fit.memory import PROCESS_BASELINE_BYTES, estimate_memory
    from llmdesk.fit.presets import from_gguf

    info = read_gguf(tiny_gguf)
    one = estimate_load_bytes(info, tiny_gguf, n_ctx=1024, n_slots=1)
    four = estimate_load_bytes(info, tiny_gguf, n_ctx=1024, n_slots=4)
    # n_layer * n_ctx * n_kv_heads * head_dim * (K + V) * 2 bytes
    assert one.kv_cache == 2 * 1024 * 2 * 16 * 2 * 2
    assert four.kv_cache == 4 * one.kv_cache and four.weights == one.weights
    shape, _ = from_gguf(tiny_gguf)
    fit = estimate_memory(shape, quant=None, ctx=1024, parallel=4, gguf_info=info)
    # and the embeddings context the Engine makes on the first embedding request: one sequence
    one_seq = estimate_memory(shape, quant=None, ctx=1024, parallel=1, gguf_info=info)
    assert four.embeddings == one_seq.kv_cache_bytes + one_seq.compute_bytes == one.embeddings
    assert four.total == fit.required_bytes - PROCESS_BASELINE_BYTES + four.embeddings
    assert "KV cache" in four.describe() and "4096 tokens" in four.describe() and "embeddings" in four.describe()


def test_memory_estimate_of_a_file_fit_cannot_read(tmp_path):
    """Not a decoder-only transformer (no block count): the file's size and a margin, no crash."""
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "odd")
    w.add_tensor("x", np.zeros((4, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_gguf(path)
    est = estimate_load_bytes(info, path, n_ctx=512, n_slots=2)
    assert est.weights == info.file_size and est.total > info.file_size and est.n_ctx_total == 1024


def test_builtin_templates_have_no_native_tools():
    for name in BUILTIN_TEMPLATES:
        spec = tools.tool_spec(_spec().tools, "auto", resolve_template(None, name))
        assert spec.native is False and json.loads(json.dumps(spec.tools)) == spec.tools
