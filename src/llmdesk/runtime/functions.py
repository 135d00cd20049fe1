"""Python functions as tools: their JSON schemas from type hints and docstrings.

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''The weather in a city now.

        Args:
            city: the city's name, e.g. "Paris"
            unit: degrees Celsius or Fahrenheit
        '''

    function_tool(get_weather)   # {"type": "function", "function": {"name": "get_weather",
                                 #   "description": "The weather in a city now.", "parameters": {...}}}
    load_functions("tools.py")   # {"get_weather": <function>, ...}: the public functions defined there

Types map to JSON schema as Pydantic and OpenAI's own helpers map them: str, int, float, bool,
None, list[X], dict[str, X], tuple, Literal[...] (an enum), Optional[X] / X | None, Enum
subclasses, and TypedDict / dataclasses (objects). A parameter without a default is required.
Docstrings in Google style (`Args:`), reST (`:param x:`) or NumPy style give the descriptions.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from ..errors import LlmdeskError


def _schema(tp, where: str) -> dict:
    """The JSON schema of a Python type."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is type(None):
        return {"type": "null"}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = [_schema(a, where) for a in rest]
        if len(rest) < len(args):  # Optional[X]
            inner.append({"type": "null"})
        return inner[0] if len(inner) == 1 else {"anyOf": inner}
    if origin in (list, set, frozenset, typing.Sequence) or tp in (list, set):
        return {"type": "array", "items": _schema(args[0], where) if args else {}}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0], where)}
        return {"type": "array", "prefixItems": [_schema(a, where) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if origin is dict or tp is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], where) if len(args) == 2 else {}}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = dataclasses.fields(tp)
        return {"type": "object", "properties": {f.name: _schema(hints[f.name], where) for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING]}
    if isinstance(tp, type) and typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp)
        return {"type": "object", "properties": {k: _schema(v, where) for k, v in hints.items()},
                "required": sorted(tp.__required_keys__)}
    raise LlmdeskError(f"{where}: the type {getattr(tp, '__name__', tp)!s} cannot be described as JSON; "
                       "use str, int, float, bool, list, dict, Literal, an Enum, a dataclass or a TypedDict")


def _doc_params(doc: str) -> tuple[str, dict[str, str]]:
    """(the description, {parameter: description}) from a docstring in Google, reST or NumPy style."""
    doc = inspect.cleandoc(doc or "")
    params: dict[str, str] = {}
    for m in re.finditer(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.M):  # reST
        params[m.group(1)] = m.group(2).strip()
    section = re.search(r"^(?:Args|Arguments|Parameters):?\s*\n(?:-+\n)?(.*?)(?:\n\s*\n(?=\S)|\n\S|\Z)", doc, re.S | re.M)
    if section:
        for m in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?\s*:\s*(.+)$", "\n" + section.group(1), re.M):  # Google
            params.setdefault(m.group(1), m.group(2).strip())
        for m in re.finditer(r"^(\w+)\s*:\s*[^\n]*\n\s+(.+)$", section.group(1), re.M):  # NumPy
            params.setdefault(m.group(1), m.group(2).strip())
    first = re.split(r"\n\s*\n|^(?:Args|Arguments|Parameters|Returns|Raises):?\s*$|^\s*:param", doc, maxsplit=1,
                     flags=re.M)[0]
    return " ".join(first.split()), params


def function_tool(fn: Callable, name: str | None = None) -> dict:
    """The tool description (OpenAI's shape) of a Python function, called `name` (default: its own)."""
    name = name or fn.__name__
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise LlmdeskError(f"function {name!r} cannot be a tool: its name must be 1 to 64 letters, digits or '_'")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # a hint naming something undefined
        raise LlmdeskError(f"function {name}: its type hints cannot be read ({e})") from None
    description, docs = _doc_params(fn.__doc__ or "")
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise LlmdeskError(f"function {name}: *{p.name} cannot be a tool parameter; name each parameter")
        prop = _schema(hints.get(p.name, inspect.Parameter.empty), f"function {name}, parameter {p.name}")
        if p.name in docs:
            prop = {**prop, "description": docs[p.name]}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif isinstance(p.default, (str, int, float, bool)) or p.default is None:
            prop = {**prop, "default": p.default}
        props[p.name] = prop
    entry: dict[str, Any] = {"name": name, "parameters": {"type": "object", "properties": props, "required": required}}
    if description:
        entry["description"] = description
    return {"type": "function", "function": entry}


def load_functions(path: str | Path) -> dict[str, Callable]:
    """The public functions a Python file defines (not the ones it imports), by name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LlmdeskError(f"no such file: {path}; --tool takes a Python file whose functions become tools")
    name = f"llmdesk_tools_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LlmdeskError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise LlmdeskError(f"{path} failed to load: {type(e).__name__}: {e}") from None
    found = {n: f for n, f in vars(module).items()
             if inspect.isfunction(f) and f.__module__ == name and not n.startswith("_")}
    if not found:
        raise LlmdeskError(f"{path} defines no public functions to use as tools")
    return found
