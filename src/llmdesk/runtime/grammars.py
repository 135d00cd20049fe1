"""JSON output enforced by llama.cpp grammars (the conversation layer's): `response_format` (OpenAI), `format` (Ollama) and
forced tool calls.

A JSON schema becomes GBNF with llama.cpp's own converter (json-schema-to-grammar, as shipped in
llama-cpp-python). Schemas come from clients, so they are bounded first: the converter expands
`maxLength: 1000000000` or `a{1000000000}` into a rule that long, which would take the server's
memory with it.
"""

from __future__ import annotations

import json
import re

from .limits import InvalidRequest

MAX_SCHEMA_CHARS = 64 * 1024
MAX_DEPTH = 32
MAX_REPEAT = 1000  # minLength, maxItems, {n,m} in patterns, ...
MAX_GRAMMAR_CHARS = 512 * 1024
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")

# any JSON object (llama.cpp's grammars/json.gbnf, with whitespace bounded as in the schema converter)
JSON_OBJECT_GRAMMAR = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""


def check_schema(schema, where: str) -> None:
    """Refuse schemas that are too big or would expand into huge grammars (InvalidRequest, naming the field)."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{where} must be a JSON schema object", where)
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError):
        raise InvalidRequest(f"{where} is not valid JSON", where) from None
    if size > MAX_SCHEMA_CHARS:
        raise InvalidRequest(f"{where} is {size} characters long; the limit is {MAX_SCHEMA_CHARS}", where)

    def walk(node, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"{where} is nested more than {MAX_DEPTH} levels deep", where)
        if isinstance(node, dict):
            for key in _COUNTS:
                v = node.get(key)
                if v is not None and (type(v) is not int or not 0 <= v <= MAX_REPEAT):
                    raise InvalidRequest(f"{where}: '{key}' must be an integer from 0 to {MAX_REPEAT}, got {v!r}",
                                   where)
            pattern = node.get("pattern")
            if pattern is not None:
                if not isinstance(pattern, str) or len(pattern) > 1000:
                    raise InvalidRequest(f"{where}: 'pattern' must be a string of at most 1000 characters", where)
                for m in re.finditer(r"\{(\d+)(?:,(\d*))?\}", pattern):
                    if any(g and int(g) > MAX_REPEAT for g in m.groups()):
                        raise InvalidRequest(f"{where}: repetition {m.group(0)} in 'pattern' is over {MAX_REPEAT}",
                                       where)
            ref = node.get("$ref")
            if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
                raise InvalidRequest(f"{where}: only local $ref (\"#/...\") are allowed", where)
            for v in node.values():
                walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)

    walk(schema, 0)


MAX_ENUM_RANGE = 256


def _integer_ranges(node):
    """The converter shipped with llama-cpp-python ignores `minimum`/`maximum`; a small integer
    range becomes an enum, which it does enforce."""
    if isinstance(node, list):
        return [_integer_ranges(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _integer_ranges(v) for k, v in node.items()}
    if node.get("type") == "integer" and "enum" not in node:
        lo, hi = node.get("minimum"), node.get("maximum")
        if type(node.get("exclusiveMinimum")) is int:
            lo = node["exclusiveMinimum"] + 1
        if type(node.get("exclusiveMaximum")) is int:
            hi = node["exclusiveMaximum"] - 1
        if type(lo) is int and type(hi) is int and 0 <= hi - lo < MAX_ENUM_RANGE:
            return {"enum": list(range(lo, hi + 1))}
    return node


def schema_grammar(schema, *, root: str = "root", where: str = "schema") -> str:
    """GBNF for values matching `schema`, its top rule named `root`."""
    check_schema(schema, where)
    schema = _integer_ranges(schema)
    from llama_cpp.llama_grammar import SchemaConverter

    try:
        conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        resolved = conv.resolve_refs(schema, "request")
        conv.visit(resolved, "")
        text = conv.format_grammar()
    except InvalidRequest:
        raise
    except Exception as e:  # the converter's own complaints: unsupported keywords, bad refs, ...
        raise InvalidRequest(f"{where} could not be turned into a grammar: {type(e).__name__}: {e}"[:400],
                       where) from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{where} makes a grammar of {len(text)} characters; the limit is {MAX_GRAMMAR_CHARS}",
                       where)
    if root != "root":
        text = re.sub(r"^root ::=", f"{root} ::=", text, count=1, flags=re.M)
    return text


def response_format_grammar(fmt) -> str | None:
    """OpenAI's `response_format`: {"type": "text" | "json_object" | "json_schema", ...}."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("'response_format' must be an object with a 'type'", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise InvalidRequest("'response_format.json_schema' must be {\"name\": ..., \"schema\": {...}}",
                           "response_format.json_schema")
        return schema_grammar(js["schema"], where="response_format.json_schema.schema")
    raise InvalidRequest(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                   "response_format.type")


def ollama_format_grammar(fmt) -> str | None:
    """Ollama's `format`: "json", a JSON schema, or empty."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return JSON_OBJECT_GRAMMAR
    if isinstance(fmt, dict):
        return schema_grammar(fmt, where="format")
    raise InvalidRequest("'format' must be \"json\" or a JSON schema object", "format")
