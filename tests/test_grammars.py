"""Grammars from JSON schemas: the shapes that would make llama.cpp's grammar sampler slow are
refused with one line naming the place, typical schemas are accepted and compile in llama.cpp,
patterns and enums are enforced, conversion runs off the event loop, and the runtime probe
measures a grammar on the model's own vocabulary. Costs are measured in
benchmarks/grammar_cost.py, never asserted here."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time

import llama_cpp as C
import pytest

from llmdesk.errors import LlmdeskError
from llmdesk.runtime.engine import Engine, Request, SamplingParams
from llmdesk.runtime.grammar_probe import GrammarTooSlow, check_grammar_cost
from llmdesk.runtime.llama import LlamaModel
from llmdesk.runtime import toolcalls as tools
from llmdesk.runtime.grammars import (
    MAX_LIVE_PARSES,
    live_parses,
    ollama_format_grammar,
    response_format_grammar,
    schema_grammar,
)
from llmdesk.runtime.limits import InvalidRequest
from llmdesk.serve import chat
from llmdesk.serve.errors import APIError
from llmdesk.runtime.templates import resolve_template


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    model = LlamaModel(tiny_gguf)
    yield model
    model.close()


def refused(schema, where="format") -> str:
    with pytest.raises(InvalidRequest) as e:
        schema_grammar(schema, where=where)
    assert e.value.param == where
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(where), msg
    return msg


def pattern(p: str) -> dict:
    return {"type": "string", "pattern": p}


def words(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(out)


def optional_props(n: int, **extra) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)},
            "additionalProperties": False, **extra}


# ---------------------------------------------------------------------------------------------
# refused: one class of slow shape per test, several variants each


@pytest.mark.parametrize("p", [
    "^([a-z]*){0,1000}$", "^([a-z]*){0,5}$", "^(a?)+$", "^(a*)*$", "^((a|b)*c?){0,20}$", "^(x|)*$",
    r"^(\d*-?)+$", "^(a?b?){2,}$", "^([a-z]*|[0-9]+){3}$",
])
def test_repeating_what_can_be_empty_is_refused(p):
    msg = refused({"type": "object", "properties": {"code": pattern(p)}})
    assert msg.startswith("format.properties.code.pattern") and "can match nothing" in msg


@pytest.mark.parametrize("p", [
    "^(a+)+$", "^([a-z]+)*$", r"^(\w+\s?)+$", "^([a-z]{1,3}){0,5}$", "^(a{1,2}){2,8}$", r"^(\d+,?)+$",
    "^([a-z]+[0-9]?)+$",
])
def test_nested_repetition_is_refused(p):
    msg = refused(pattern(p))
    assert "is inside another one" in msg and "ways" in msg


@pytest.mark.parametrize("p", [
    "^(a|aa){0,20}$", "^(a|ab|b)+$", "^(ab|a|b)*$", "^(x|xy|y){0,50}$", "^(a|a)*$", "^(0|00|000)*1$",
])
def test_overlapping_alternatives_under_repetition_are_refused(p):
    assert "more than" in refused(pattern(p))


@pytest.mark.parametrize("p", [
    "^[a-z]*[a-z]*$", "^[a-z]+[a-z0-9]*$", "^" + "[a-z]*" * 16 + "$", "^[a-z]{0,8}[a-z]{0,8}$",
    "^.*x.*x.*$",
])
def test_overlapping_parts_in_sequence_are_refused(p):
    assert "overlap" in refused(pattern(p))


def test_wide_alternatives_in_a_pattern_are_refused():
    refused(pattern("^(" + "|".join(words(40)) + ")$"))
    # an enum of the same words is a trie: accepted
    assert live_parses({"enum": words(40)}) <= 26


@pytest.mark.parametrize("p", [
    "^((a{10}){10}){30}$",  # 3000 characters written out
    "^([a-z]{0,50}-){0,50}$",
    "^(((ab){0,20}){0,20}){0,20}$",
])
def test_products_of_counts_are_refused(p):
    assert "written out" in refused(pattern(p))


def test_the_schema_wide_pattern_budget():
    one = "^[a-z]{0,900}$"
    schema_grammar(pattern(one))
    msg = refused({"type": "object", "properties": {k: pattern(one) for k in "abc"}})
    assert "in all" in msg and ".properties.c.pattern" in msg


@pytest.mark.parametrize("n", [MAX_LIVE_PARSES, 100, 900])
def test_many_optional_properties_are_refused(n):
    msg = refused({"type": "object", "properties": {"inner": optional_props(n)}})
    assert msg.startswith("format.properties.inner:") and f"{n} optional properties" in msg


def test_optional_properties_up_to_the_limit_convert():
    # (their conversion time is measured by benchmarks/grammar_cost.py, not here)
    grammar = schema_grammar(optional_props(MAX_LIVE_PARSES - 2))
    assert all(f"p{i}-kv ::=" in grammar for i in range(MAX_LIVE_PARSES - 2))
    # required ones cost nothing at the commas
    schema_grammar({**optional_props(200), "required": [f"p{i}" for i in range(200)]})


@pytest.mark.parametrize("schema", [
    {"anyOf": [{"type": "object", "properties": {"name": {"type": "string"}, f"k{i}": {"type": "integer"}},
                "required": ["name", f"k{i}"]} for i in range(12)]},
    {"oneOf": [{"enum": words(30, seed=i)} for i in range(8)]},
    {"anyOf": [pattern("^(" + "|".join(words(12, seed=i)) + ")$") for i in range(4)]},
    {"type": ["string", "number", "integer", "boolean", "null", "array", "object"],
     "anyOf": [{"type": "string"}] * 40},
])
def test_many_alike_branches_are_refused(schema):
    assert "branches start alike" in refused(schema)


def test_a_recursive_union_that_multiplies_is_refused():
    twin = {"type": "object", "properties": {"a": {"$ref": "#/$defs/T"}}, "required": ["a"]}
    schema = {"$defs": {"T": {"anyOf": [twin, {**twin, "properties": {**twin["properties"], "b": {"type": "integer"}}},
                                        {"type": "string"}]}}, "$ref": "#/$defs/T"}
    refused(schema)
    # a plain recursive tree is fine: its alternatives start differently
    tree = {"$defs": {"Node": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["value"]}]}}, "$ref": "#/$defs/Node"}
    schema_grammar(tree)


@pytest.mark.parametrize("p, what", [
    ("abc", "must start with '^'"), ("^(?=a)b$", "lookarounds"), (r"^(a)\1$", "backreferences"),
    (r"^\p{L}+$", "unicode property"), (r"^\bword$", "word boundaries"), ("^a{2,1}$", "out of order"),
    ("^a{99999}$", "over 1000"), ("^(ab$", "not closed"), ("^ab)$", "without '('"), ('^"$', "must escape"),
    ("^a**$", "follows a repetition"), ("^a{x}$", "must start a repetition"), ("^[z-a]$", "out of order"),
])
def test_unsupported_or_broken_patterns_say_why(p, what):
    assert what in refused(pattern(p))


def test_long_ref_chains_are_refused_in_one_line():
    defs = {f"D{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/D{i + 1}"}}} for i in range(100)}
    defs["D100"] = {"type": "integer"}
    msg = refused({"$defs": defs, "$ref": "#/$defs/D0"})
    assert "definitions in a row" in msg and len(msg) < 400


def test_property_names_are_names_not_keywords(llama):
    schema = {"type": "object", "properties": {"pattern": {"type": "string"}, "enum": {"type": "integer"},
                                               "$ref": {"type": "boolean"}, "minLength": {"type": "string"}},
              "required": ["pattern", "enum"]}
    smpl = C.llama_sampler_init_grammar(llama.vocab, schema_grammar(schema).encode(), b"root")
    assert smpl
    C.llama_sampler_free(smpl)


def test_a_root_ref_with_its_own_defs_converts(llama):
    schema = {"$ref": "#/$defs/Pet", "$defs": {
        "Pet": {"type": "object", "properties": {"kind": {"$ref": "#/$defs/Kind"}}, "required": ["kind"]},
        "Kind": {"enum": ["cat", "dog"]}}}
    g = schema_grammar(schema)
    for seed in range(2):
        assert json.loads(generate(llama, g, seed=seed).text)["kind"] in ("cat", "dog")


def test_empty_enum_and_remote_refs_are_refused():
    assert "non-empty" in refused({"enum": []})
    assert "local $ref" in refused({"$ref": "https://example.com/s.json"})


# ---------------------------------------------------------------------------------------------
# accepted: what real clients send


PYDANTIC_USER = {
    "$defs": {
        "Address": {"properties": {
            "street": {"title": "Street", "type": "string"},
            "city": {"title": "City", "type": "string"},
            "zip": {"anyOf": [{"pattern": r"^\d{5}(-\d{4})?$", "type": "string"}, {"type": "null"}],
                    "default": None, "title": "Zip"},
            "country": {"$ref": "#/$defs/Country"}},
            "required": ["street", "city", "country"], "title": "Address", "type": "object"},
        "Country": {"enum": ["US", "CA", "MX", "FR", "DE", "GB", "IT", "ES", "JP", "CN", "IN", "BR"],
                    "title": "Country", "type": "string"},
        "Role": {"enum": ["admin", "editor", "viewer"], "title": "Role", "type": "string"},
    },
    "properties": {
        "id": {"minimum": 1, "title": "Id", "type": "integer"},
        "name": {"maxLength": 100, "minLength": 1, "title": "Name", "type": "string"},
        "email": {"pattern": r"^[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}$", "title": "Email", "type": "string"},
        "phone": {"anyOf": [{"pattern": r"^\+?[0-9 ()-]{7,20}$", "type": "string"}, {"type": "null"}],
                  "default": None, "title": "Phone"},
        "birthday": {"format": "date", "title": "Birthday", "type": "string"},
        "created": {"format": "date-time", "title": "Created", "type": "string"},
        "role": {"$ref": "#/$defs/Role", "default": "viewer"},
        "address": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
        "tags": {"items": {"type": "string"}, "maxItems": 10, "title": "Tags", "type": "array"},
        "score": {"title": "Score", "type": "number"},
        "stars": {"maximum": 5, "minimum": 1, "title": "Stars", "type": "integer"},
        "active": {"default": True, "title": "Active", "type": "boolean"},
        "id_card": {"pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", "type": "string"},
    },
    "required": ["id", "name", "email", "role"], "title": "User", "type": "object",
}

TYPICAL_PATTERNS = [
    r"^\d{4}-\d{2}-\d{2}$", r"^[^@]+@[^@]+$", r"^[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}$",
    r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$", r"^\+?[0-9 ()-]{7,20}$", r"^\(\d{3}\) \d{3}-\d{4}$",
    r"^(\d{1,3}\.){3}\d{1,3}$", r"^#[0-9a-fA-F]{6}$", r"^[a-z0-9]+(?:-[a-z0-9]+)*$", r"^https?://[^\s/$.?#].[^\s]*$",
    r"^v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$", r"^[A-Z]{2}\d{2}[A-Z0-9]{1,30}$", r"^\d{5}(-\d{4})?$",
    r"^-?\d+(\.\d{1,2})?$", r"^(red|green|blue)$", r"^[A-Z][a-z]+( [A-Z][a-z]+)*$", r"^.{1,280}$", r"^\S+$",
    r"^[\w.-]+$", r"^(?:[01]\d|2[0-3]):[0-5]\d$", r"^(a|ab|abc){0,20}$", r"^(ab){0,1000}$",
]


@pytest.mark.parametrize("p", TYPICAL_PATTERNS)
def test_typical_patterns_are_accepted_and_compile(p, llama):
    g = schema_grammar({"type": "object", "properties": {"v": pattern(p)}, "required": ["v"]})
    smpl = C.llama_sampler_init_grammar(llama.vocab, g.encode(), b"root")
    assert smpl, g  # before: \d and \. reached llama.cpp as escapes it rejects
    C.llama_sampler_free(smpl)


def _tool(name, n_optional=5):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"query": {"type": "string"},
                                         **{f"opt{i}": {"type": "integer"} for i in range(n_optional)}},
        "required": ["query"]}}}


TYPICAL = {
    "pydantic user": PYDANTIC_USER,
    "openai test": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                     "sunny": {"type": "boolean"},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["city", "sunny", "days"], "additionalProperties": False},
    "250 country codes": {"type": "string",
                          "enum": sorted({a + b for a in "ABCDEFGHIJ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXY"})},
    "integer range": {"type": "integer", "minimum": 0, "maximum": 255},
    "list of records": {"type": "array", "minItems": 1, "maxItems": 50, "items": {
        "type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                         "genre": {"enum": ["drama", "comedy", "horror", None]}},
        "required": ["title"]}},
    "optional anything": {"type": "object", "properties": {"meta": {}, "extra": {"type": "object"}},
                          "additionalProperties": True},
    "28 optional": optional_props(28),
    "discriminated union": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": k}, "size": {"type": "number"}}, "required": ["kind"]}
        for k in ("circle", "square", "triangle", "hexagon")]},
    "nullable union": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
}


@pytest.mark.parametrize("name", TYPICAL)
def test_typical_schemas_are_accepted_and_compile(name, llama):
    g = ollama_format_grammar(copy.deepcopy(TYPICAL[name]))
    assert live_parses(TYPICAL[name]) <= MAX_LIVE_PARSES
    smpl = C.llama_sampler_init_grammar(llama.vocab, g.encode(), b"root")
    assert smpl, g
    C.llama_sampler_free(smpl)


def test_forced_tool_calls_with_many_tools():
    t = resolve_template(None, "chatml")
    spec = tools.tool_spec([_tool(f"tool_{i}") for i in range(MAX_LIVE_PARSES)], "required", t)
    assert tools.grammar(spec).startswith('root ::= "<tool_call>\\n" tool-call')
    spec = tools.tool_spec([_tool(f"tool_{i}") for i in range(MAX_LIVE_PARSES + 1)], "required", t)
    with pytest.raises(InvalidRequest) as e:
        tools.grammar(spec)
    assert e.value.param == "tool_choice" and "name one function" in str(e.value)
    # naming one function leaves one branch
    spec = tools.tool_spec([_tool(f"tool_{i}") for i in range(60)],
                           {"type": "function", "function": {"name": "tool_7"}}, t)
    assert "tool_7" in tools.grammar(spec)


def test_live_parses_counts():
    assert live_parses(optional_props(10)) == 11  # ten properties or "}" after each comma
    assert live_parses({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}) == 4
    assert live_parses({"enum": ["apple", "apricot", "banana"]}) == 2  # a | b, then p(ple|ricot)
    assert live_parses(pattern(r"^\d{4}$")) == 1
    union = {"oneOf": [{"type": "object", "properties": {"name": {"const": f"t{i}"}, "args": optional_props(3)},
                        "required": ["name", "args"]} for i in range(20)]}
    assert live_parses(union) == 20  # in step only up to the distinct name
    alike = {"anyOf": [optional_props(3), optional_props(4)]}
    assert live_parses(alike) == 4 + 5


# ---------------------------------------------------------------------------------------------
# enforced: generation through the Engine follows patterns and enums


def generate(llama, grammar: str, *, seed: int, max_tokens: int = 40):
    """Sample from the random tiny model at a high temperature: close to uniform over the tokens
    the grammar allows, so different seeds take different paths through it."""
    with Engine(llama, n_ctx=512, n_slots=1, n_threads=1) as eng:
        req = Request(llama.tokenize("Answer:"), max_tokens=max_tokens,
                      sampling=SamplingParams(temperature=50, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                              grammar=grammar))
        return eng.submit(req).wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p", [r"^\d{4}-\d{2}-\d{2}$", r"^[A-Z]{2}-\d{3,5}$",
                               r"^(red|green|blue)(,(red|green|blue)){0,3}$", r"^(\d{1,3}\.){3}\d{1,3}$",
                               r"^[a-z0-9._-]{1,8}@[a-z]{1,8}\.(com|org)$", r"^a|b$",
                               r"^(?:[01]\d|2[0-3]):[0-5]\d$", r"^\w{2}\s\w{2}$"])
def test_patterns_are_enforced(llama, p):
    g = schema_grammar(pattern(p))
    values = set()
    for seed in range(6):
        r = generate(llama, g, seed=seed, max_tokens=80)
        value = json.loads(r.text)  # complete, valid JSON
        assert re.fullmatch(f"(?:{p[1:-1]})", value, re.ASCII), (p, value)
        values.add(value)
    assert len(values) > 1  # seeds take different paths: the grammar is not stuck on one answer


@pytest.mark.timeout(120)
def test_negated_classes_and_dot_never_end_the_json_string(llama):
    # [^@] and . would also match '"', '\\' and control characters, which a JSON string must escape
    for p in (r"^[^@]{4,12}@[^@]{4,12}$", r"^.{8,16}$", r"^\S{8,16}$"):
        g = schema_grammar(pattern(p))
        for seed in range(4):
            value = json.loads(generate(llama, g, seed=seed, max_tokens=80).text)
            assert isinstance(value, str) and not set(value) & set('"\\\n\t'), (p, value)


@pytest.mark.timeout(120)
def test_json_strings_hold_no_raw_control_characters(llama):
    # a plain string property: the converter's own `char` rule let a raw newline in, and the
    # reply was then not JSON (json.loads refuses control characters inside strings)
    g = schema_grammar({"type": "object", "properties": {"note": {"type": "string", "maxLength": 24}},
                        "required": ["note"]})
    for seed in range(6):
        value = json.loads(generate(llama, g, seed=seed, max_tokens=80).text)["note"]
        assert not any(ord(c) < 0x20 or c == "\x7f" for c in value), repr(value)


@pytest.mark.timeout(120)
def test_enum_tries_are_enforced(llama):
    values = ["Paris", "Parma", "Porto", "Rome", 'say "hi"', "back\\slash", 7, None, True]
    g = schema_grammar({"enum": values})
    seen = set()
    for seed in range(8):
        value = json.loads(generate(llama, g, seed=seed).text)
        assert value in values
        seen.add(json.dumps(value))
    assert len(seen) > 1


@pytest.mark.timeout(300)
def test_worst_accepted_schema_generates_many_tokens(llama):
    """A schema at the limits: two required properties, then 30 optional ones (31 ways on after
    every comma), values that are wide or ambiguous-but-accepted patterns and unions. The sampler
    must go on through many tokens (what it costs is measured in benchmarks/grammar_cost.py)."""
    alts = "|".join(words(14))
    kinds = [pattern(f"^({alts})$"), pattern(r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$"),
             {"anyOf": [pattern("^(a|ab|abc){0,20}$"), {"type": "null"}]},
             {"type": "array", "items": {"type": "string", "maxLength": 1000}}]
    props = {"r0": kinds[0], "r1": {"type": "array", "items": kinds[2], "minItems": 3},
             **{f"p{i}": kinds[i % 4] for i in range(30)}}
    schema = {"type": "object", "properties": props, "required": ["r0", "r1"], "additionalProperties": False}
    assert live_parses(schema) == MAX_LIVE_PARSES - 1
    g = schema_grammar(schema)
    for seed in range(2):
        r = generate(llama, g, seed=seed, max_tokens=60)
        assert r.finish_reason in ("length", "stop") and r.n_gen >= 10, r
        assert re.match(r'\{ ?"r0" ?: ?"', r.text), r.text
        if r.finish_reason == "stop":
            value = json.loads(r.text)
            assert value["r0"] in words(14) and len(value["r1"]) >= 3


# ---------------------------------------------------------------------------------------------
# conversion off the event loop


def test_off_loop_runs_the_conversion_in_a_thread():
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": PYDANTIC_USER}}
    direct = response_format_grammar(copy.deepcopy(fmt))
    threads = []

    def convert(f):
        threads.append(threading.get_ident())
        return response_format_grammar(f)

    async def main():
        return await chat.off_loop(convert, copy.deepcopy(fmt)), threading.get_ident()

    out, loop_thread = asyncio.run(main())
    assert out == direct and threads and threads[0] != loop_thread


def test_off_loop_times_out_with_a_400(monkeypatch):
    monkeypatch.setattr(chat, "PREPARE_TIMEOUT_S", 0.05)

    def slow_conversion(schema):
        time.sleep(1)
        return "root ::= \"x\""

    with pytest.raises(APIError) as e:
        asyncio.run(chat.off_loop(slow_conversion, {}))
    assert e.value.status == 400 and "took longer than" in e.value.message


def test_off_loop_passes_errors_through():
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(chat.off_loop(ollama_format_grammar, pattern("^(a+)+$")))
    assert str(e.value).startswith("format.pattern")
    assert asyncio.run(chat.off_loop(ollama_format_grammar, None)) is None


# ---------------------------------------------------------------------------------------------
# the runtime probe


def test_probe_passes_plain_grammars_and_caches(llama):
    g = schema_grammar(PYDANTIC_USER)
    worst = check_grammar_cost(llama, g)
    assert worst > 0
    assert check_grammar_cost(llama, g) == worst  # cached: the same measurement


def test_probe_refuses_over_budget_and_remembers(llama):
    g = schema_grammar(optional_props(10))
    with pytest.raises(GrammarTooSlow) as e:
        check_grammar_cost(llama, g, budget_s=1e-9)
    assert isinstance(e.value, LlmdeskError) and "ms per token" in str(e.value)
    with pytest.raises(GrammarTooSlow):
        check_grammar_cost(llama, g, budget_s=1e-9)


def test_probe_refuses_unparsable_grammars(llama):
    with pytest.raises(LlmdeskError, match="could not be parsed"):
        check_grammar_cost(llama, 'root ::= "unclosed')


@pytest.mark.parametrize("schema, said", [
    ({"type": "strin"}, "'strin' is not valid under any of the given schemas"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}},
     ".properties.a.minimum is not valid JSON Schema: 'x' is not of type 'number'"),
    ({"type": "object", "required": "a"}, ".required is not valid JSON Schema"),
])
def test_a_schema_that_is_not_json_schema_says_where(schema, said):
    assert said in refused(schema)


def test_run_schema_file_errors_name_the_file(tmp_path, capsys):
    from llmdesk.cli.main import main

    bad = tmp_path / "answer.json"
    bad.write_text('{"type": "object", "properties": {"n": {"type": "intger"}}}')
    assert main(["run", "--schema", str(bad), "hi"]) == 1
    e = capsys.readouterr().err
    assert e.startswith(f"error: {bad}.properties.n.type is not valid JSON Schema") and e.count("\n") == 1
