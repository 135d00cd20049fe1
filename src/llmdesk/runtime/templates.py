"""Chat templates: turn a conversation into the exact prompt text a model was trained on.

A GGUF model carries its Hugging Face chat template (Jinja2) in `tokenizer.chat_template`. We
render it the way transformers' `apply_chat_template` does (transformers/utils/
chat_template_utils.py): Jinja's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that does not escape HTML, the globals
`raise_exception` and `strftime_now`, and the variables `messages`, `tools`, `documents`,
`add_generation_prompt`, `bos_token`, `eos_token` plus any extra keyword arguments. Same
template, same variables, same text.

The template comes from a downloaded file, so it is treated as hostile (CVE-2024-34359: a GGUF
whose template reached `__globals__` through llama-cpp-python's unsandboxed Jinja and ran shell
commands). Three fences, all reported as one line of llmdesk.errors.TemplateError:
  1. The immutable sandbox, made strict: touching an unsafe attribute (`_`-prefixed names,
     function and frame internals, `list.append`, `dict.update`, ...) raises at once, instead
     of quietly rendering an empty Undefined as Jinja would.
  2. Size: rendered text, and every value the template builds, stays under MAX_OUTPUT_CHARS.
     Operations that could allocate a huge value in one step (`'x' * n`, `2 ** n`,
     `center(n)`, `'%0999999999d'`, `join`, `replace`, ...) are checked before they run.
  3. Work: each loop iteration, call, filter and arithmetic operator is a step (at most
     MAX_STEPS), and a render stops after MAX_RENDER_SECONDS. Loops and output are metered by rewriting the parsed template
     before it is compiled (see _Meter).
This module imports neither torch nor llama.cpp: it is cheap and works without a model.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from llmdesk.errors import TemplateError

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "ChatTemplate",
    "guess_builtin",
    "resolve_template",
]

# Limits for one render. Real chat templates use a few hundred steps per message and finish in
# milliseconds; these only stop templates that are broken or hostile.
MAX_OUTPUT_CHARS = 10_000_000  # rendered text, and any single value a template builds
MAX_STEPS = 1_000_000  # loop iterations + calls + filters + operators
MAX_RENDER_SECONDS = 10.0
MAX_INT_BITS = 4096  # numbers a template computes (2 ** 10 ** 9 would take forever)
MAX_JSON_INDENT = 64
MAX_TEMPLATE_CHARS = 1_000_000  # the template's own source


# ---------------------------------------------------------------------------------------------
# Built-in templates: the prompt formats of well-known families, for models without a template
# of their own (or for --template). Each reproduces the layout of the family's official template;
# `text(content)` also accepts OpenAI-style content lists ([{"type": "text", "text": ...}]).
# ---------------------------------------------------------------------------------------------

_TEXT = r"""
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}{%- elif part is mapping and part.type == 'text' -%}{{ part.text }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

# ChatML (OpenAI's, used by Qwen, Yi, Hermes and many fine-tunes).
_CHATML = r"""
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\n' + text(message.content) + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 2 chat: the system prompt sits inside the first [INST] between <<SYS>> markers; every
# user turn opens with BOS, every assistant turn closes with EOS.
_LLAMA2 = r"""
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}
{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + text(message.content) | trim %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- set content = text(message.content) | trim %}
{%- if ns.system %}
{%- set content = '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' + content %}
{%- set ns.system = '' %}
{%- endif %}
{{- bos_token + '[INST] ' + content + ' [/INST]' }}
{%- elif message.role == 'assistant' %}
{{- ' ' + text(message.content) | trim + ' ' + eos_token }}
{%- endif %}
{%- endfor %}
"""

# Llama 3 / 3.1 / 3.2 instruct, without the tool-calling extras.
_LLAMA3 = r"""
{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + text(message.content) | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Mistral Instruct v0.1/v0.2: no system role of its own, so a system prompt is put in front of
# the next user message (as Mistral's later templates do).
_MISTRAL = r"""
{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- set ns.system = ns.system + text(message.content) + '\n\n' %}
{%- elif message.role == 'user' %}
{{- '[INST] ' + ns.system + text(message.content) + ' [/INST]' }}
{%- set ns.system = '' %}
{%- elif message.role == 'assistant' %}
{{- text(message.content) + eos_token }}
{%- endif %}
{%- endfor %}
"""

# Gemma (1, 2, 3): roles user and model; no system role, so the system prompt opens the next
# user turn (as Gemma 3's template does).
_GEMMA = r"""
{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- set ns.system = ns.system + text(message.content) | trim + '\n\n' %}
{%- else %}
{%- set role = 'model' if message.role == 'assistant' else message.role %}
{%- set prefix = ns.system if role == 'user' else '' %}
{{- '<start_of_turn>' + role + '\n' + prefix + text(message.content) | trim + '<end_of_turn>\n' }}
{%- if role == 'user' %}
{%- set ns.system = '' %}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<start_of_turn>model\n' }}
{%- endif %}
"""

# Phi-3 (mini, small, medium, 3.5).
_PHI3 = r"""
{%- for message in messages %}
{{- '<|' + message.role + '|>\n' + text(message.content) + '<|end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>\n' }}
{%- else %}
{{- eos_token }}
{%- endif %}
"""

# Alpaca (Stanford): a preamble, then "### Instruction:" / "### Response:" blocks.
_ALPACA = r"""
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}
{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + text(message.content) %}
{%- endfor %}
{{- (ns.system or 'Below is an instruction that describes a task. Write a response that appropriately completes the request.') + '\n\n' }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- '### Instruction:\n' + text(message.content) + '\n\n' }}
{%- elif message.role == 'assistant' %}
{{- '### Response:\n' + text(message.content) + eos_token + '\n\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '### Response:\n' }}
{%- endif %}
"""

# Vicuna v1.1 (FastChat's "vicuna_v1.1": separators " " after user turns, EOS after assistant).
_VICUNA = r"""
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}
{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + text(message.content) %}
{%- endfor %}
{{- (ns.system or "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.") + ' ' }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- 'USER: ' + text(message.content) + ' ' }}
{%- elif message.role == 'assistant' %}
{{- 'ASSISTANT: ' + text(message.content) + eos_token }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- 'ASSISTANT:' }}
{%- endif %}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    name: (_TEXT + body).strip()
    for name, body in {
        "chatml": _CHATML,
        "llama-2": _LLAMA2,
        "llama-3": _LLAMA3,
        "mistral": _MISTRAL,
        "gemma": _GEMMA,
        "phi-3": _PHI3,
        "alpaca": _ALPACA,
        "vicuna": _VICUNA,
    }.items()
}
DEFAULT_TEMPLATE = "chatml"

_ALIASES = {"llama2": "llama-2", "llama3": "llama-3", "phi3": "phi-3", "qwen": "chatml"}

# Text an engine should stop on for each built-in format (besides the model's end-of-generation
# tokens, which llama.cpp stops on by itself).
_BUILTIN_STOPS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>",),
    "llama-2": ("[INST]",),
    "llama-3": ("<|eot_id|>",),
    "mistral": ("[INST]",),
    "gemma": ("<end_of_turn>",),
    "phi-3": ("<|end|>",),
    "alpaca": ("### Instruction:",),
    "vicuna": ("USER:",),
}

# End-of-turn markers that show up literally in model templates, in the order they are reported.
_TURN_END_MARKERS = (
    "<|im_end|>",  # ChatML: Qwen, Yi, Hermes, Phi-4, SmolLM
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end|>",  # Phi-3, gpt-oss
    "<|return|>",  # gpt-oss
    "<|call|>",  # gpt-oss
    "<end_of_turn>",  # Gemma
    "<|END_OF_TURN_TOKEN|>",  # Command-R
    "<|end_of_turn|>",  # OpenChat
    "<|EOT|>",  # DeepSeek Coder
    "<｜end▁of▁sentence｜>",  # DeepSeek V2/V3/R1
    "<|endoftext|>",
    "</s>",
)

# How to recognise a family from its template, checked in order: first family whose markers
# all occur wins.
_FAMILY_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama-3", ("<|start_header_id|>",)),
    ("gemma", ("<start_of_turn>",)),
    ("chatml", ("<|im_start|>",)),
    ("phi-3", ("<|assistant|>", "<|end|>")),
    ("llama-2", ("[INST]", "<<SYS>>")),
    ("mistral", ("[INST]",)),
    ("alpaca", ("### Instruction",)),
    ("vicuna", ("USER:", "ASSISTANT:")),
)


def guess_builtin(source: str) -> str | None:
    """Which built-in family a model's template looks like, by its markers (for display)."""
    for name, markers in _FAMILY_MARKERS:
        if all(marker in source for marker in markers):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# The meter: per-render budget of steps, time and size
# ---------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """A render went over one of the limits. Deliberately not a TypeError/LookupError/
    AttributeError, which Jinja's own code catches and turns into Undefined."""


class _RaisedByTemplate(TemplateError):
    """raise_exception() called by the template itself; the text is the template's own."""


class _NotRendering(Exception):
    """A metered function was called outside a render: by Jinja's constant folding at compile
    time. Any exception there makes Jinja leave the expression to run time, where it is metered."""


def _over(what: str) -> _Stopped:
    return _Stopped(f"{what} more than {MAX_OUTPUT_CHARS:,} characters")


_CONTAINERS = (list, tuple, dict)


class _Budget:
    """What one render may still spend. Lives in a ContextVar for the duration of a render, so
    concurrent renders in threads or tasks each have their own."""

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.produced = 0  # characters of output, including text buffered in macros and blocks
        self.known: dict[int, int] = {}  # id -> size of the caller's containers (alive all render)

    def tick(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _Stopped(f"ran more than {MAX_STEPS:,} steps (loop iterations and calls)")
        if time.monotonic() > self.deadline:
            raise _Stopped(f"ran for more than {MAX_RENDER_SECONDS:g} seconds")

    def measure_inputs(self, value: Any) -> int:
        """Size the caller's data once, so later checks of it cost nothing."""
        if not isinstance(value, _CONTAINERS):
            return self.size(value)
        if id(value) not in self.known:
            self.known[id(value)] = 0  # (in case the data refers to itself)
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            self.known[id(value)] = 2 * len(value) + sum(self.measure_inputs(item) for item in items)
        return self.known[id(value)]

    def size(self, value: Any) -> int:
        """About how many characters str(value) would take, counted only until it passes the
        limit. Containers are walked because `[s] * n` is cheap to build but not to print."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, int):
            return value.bit_length() // 3
        if isinstance(value, jinja2.utils.Namespace):
            value = dict(object.__getattribute__(value, "_Namespace__attrs"))
        if not isinstance(value, _CONTAINERS):
            return 0
        total, stack = 0, [value]
        while stack and total <= MAX_OUTPUT_CHARS:
            item = stack.pop()
            known = self.known.get(id(item))
            if known is not None:
                total += known
                continue
            total += 2 * len(item)  # the ", " between elements
            if total > MAX_OUTPUT_CHARS:
                break
            for element in [*item, *item.values()] if isinstance(item, dict) else item:
                if isinstance(element, (str, bytes)):
                    total += len(element)
                elif isinstance(element, int):
                    total += element.bit_length() // 3
                elif isinstance(element, _CONTAINERS):
                    stack.append(element)
        return total

    def sized(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                raise _Stopped(f"computed a number of more than {MAX_INT_BITS} bits")
        elif self.size(value) > MAX_OUTPUT_CHARS:
            raise _over("built a value of")
        return value

    def fits(self, estimate: int) -> None:
        if estimate > MAX_OUTPUT_CHARS:
            raise _over("would build a value of")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("llmdesk_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise _NotRendering()
    return budget


# -- checks before operations that can build a huge value in one step --------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _big_int(value: Any, limit: int | None = None) -> bool:
    limit = MAX_OUTPUT_CHARS if limit is None else limit
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit


def _check_numbers(text: str) -> None:
    """Widths and precisions written into a format string."""
    for digits in _DIGITS.findall(text):
        if len(digits) > 9 or int(digits) > MAX_OUTPUT_CHARS:
            raise _over("would format a field of")


def _check_args(budget: _Budget, args: Any, kwargs: dict, *, widths: bool = True) -> None:
    """Values about to be formatted into text: containers must not print larger than the limit,
    and (when `widths`) numbers that will become field widths must not be huge."""
    if isinstance(args, dict):
        values = [*args.values()]
    elif isinstance(args, tuple):
        values = list(args)
    else:
        values = [args]
    for value in (*values, *kwargs.values()):
        if widths and _big_int(value):
            raise _over("would build a value of")
        budget.fits(budget.size(value))


def _check_percent(budget: _Budget, fmt: str, args: Any) -> None:
    for match in _PERCENT_SPEC.finditer(fmt):
        _check_numbers("".join(group for group in match.groups() if group and group != "*"))
    _check_args(budget, args, {}, widths="*" in fmt)  # '%*d' takes its width from the arguments


def _check_format(budget: _Budget, fmt: str, args: tuple, kwargs: dict) -> None:
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
    except ValueError:
        return  # malformed: str.format will raise the same error itself
    for spec in specs:
        _check_numbers(spec)
    _check_args(budget, args, kwargs, widths=any("{" in spec for spec in specs))  # '{:{}}'


def _check_join(budget: _Budget, sep: str, items: str | list) -> None:
    content = len(items) if isinstance(items, str) else sum(budget.size(item) for item in items)
    budget.fits(content + len(sep) * max(len(items) - 1, 0))


def _check_replace(budget: _Budget, text: str, old: str, new: str, count: Any = -1) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    budget.fits(len(text) + hits * (len(new) - len(old)))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_method(budget: _Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Calls of methods of str, int, list, ... from a template. Returns the args to call with."""
    owner = getattr(method, "__self__", None)
    if isinstance(owner, type) or not isinstance(owner, (str, bytes, int, float, list, tuple, dict)):
        return args
    name = getattr(method, "__name__", "")
    if name in ("format", "format_map") and isinstance(owner, str):
        fmt_kwargs = args[0] if name == "format_map" and args and isinstance(args[0], dict) else kwargs
        _check_format(budget, owner, args, fmt_kwargs)
        return args
    if isinstance(owner, (str, bytes)) or name == "to_bytes":
        for value in (*args, *kwargs.values()):  # center(10**9), zfill, ljust, to_bytes, ...
            if _big_int(value):
                raise _over("would build a value of")
    if isinstance(owner, str):
        if name == "join" and args:
            items = args[0] if isinstance(args[0], str) else list(args[0])
            _check_join(budget, owner, items)
            return (items, *args[1:])
        if name == "replace" and len(args) >= 2:
            _check_replace(budget, owner, *args[:3])
        elif name == "expandtabs":
            budget.fits(len(owner) + owner.count("\t") * int(_arg(args, kwargs, 0, "tabsize", 8)))
        elif name == "translate" and args and isinstance(args[0], dict):
            widest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            budget.fits(len(owner) * widest)
    return args


# Filters that can build much more than they are given: check the arguments first.
def _filter_center(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    _check_args(budget, (), {"width": _arg(args, kwargs, 0, "width", 80)})
    return (value, *args)


def _filter_indent(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    width = _arg(args, kwargs, 0, "width", 4)
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if _big_int(per_line):
        raise _over("would build a value of")
    text = value if isinstance(value, str) else ""
    budget.fits(len(text) + (text.count("\n") + 1) * per_line)
    return (value, *args)


def _filter_wordwrap(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    if isinstance(value, str) and isinstance(wrap, str):
        budget.fits(len(value) * (1 + len(wrap)))
    return (value, *args)


def _filter_count(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    _check_args(budget, args[:1], {})  # batch(linecount), slice(slices)
    return (value, *args)


def _filter_format(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    if isinstance(value, str):
        _check_percent(budget, value, args or tuple(kwargs.values()))
    return (value, *args)


def _filter_join(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    items = value if isinstance(value, (str, jinja2.Undefined)) else list(value)
    sep = _arg(args, kwargs, 0, "d", "")
    if isinstance(items, (str, list)) and isinstance(sep, str):
        _check_join(budget, sep, items)
    return (items, *args)


def _filter_replace(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    if len(args) >= 2:
        count = _arg(args, kwargs, 2, "count", None)
        _check_replace(budget, value, args[0], args[1], -1 if count is None else count)
    return (value, *args)


def _filter_tojson(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> tuple:
    indent = _arg(args, kwargs, 1, "indent", None)
    if _big_int(indent, MAX_JSON_INDENT) or (isinstance(indent, str) and len(indent) > MAX_JSON_INDENT):
        raise _Stopped(f"asked for a JSON indent of more than {MAX_JSON_INDENT}")
    return (value, *args)


_FILTER_CHECKS = {
    "center": _filter_center,
    "indent": _filter_indent,
    "wordwrap": _filter_wordwrap,
    "batch": _filter_count,
    "slice": _filter_count,
    "format": _filter_format,
    "join": _filter_join,
    "replace": _filter_replace,
    "tojson": _filter_tojson,
}


def _metered_filter(name: str, func: Any) -> Any:
    """Wrap a filter: one step, argument checks, and a size check of what it returns. Keeps
    Jinja's pass_context/pass_eval_context/pass_environment marker (functools.wraps copies it)."""
    check = _FILTER_CHECKS.get(name)
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context/env argument comes first

    @functools.wraps(func)
    def metered(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if len(args) > skip:
            value = args[skip]
            if not isinstance(value, jinja2.Undefined):
                budget.fits(budget.size(value))  # a filter may turn its value into text
            if check is not None:
                args = (*args[:skip], *check(budget, value, args[skip + 1 :], kwargs))
        return budget.sized(func(*args, **kwargs))

    return metered


# ---------------------------------------------------------------------------------------------
# The environment: transformers' setup, in a strict sandbox
# ---------------------------------------------------------------------------------------------


def _raise_exception(message: Any) -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts must get the JSON as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training
    masks (its AssistantTracker). For a prompt it is just its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    # arithmetic that can build big values runs through call_binop (and is never folded at
    # compile time)
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals.pop("lipsum", None)  # lorem ipsum of any length: of no use to a prompt
        self.filters["tojson"] = _tojson
        self.filters = {name: _metered_filter(name, func) for name, func in self.filters.items()}

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(attribute, str) and attribute.startswith("_"):  # even where none exists
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja returns an Undefined that only fails when used (and prints as ""): refuse at once
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and isinstance(seq, (str, bytes, list, tuple)):
                    budget.fits(budget.size(seq) * max(times, 0))
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                    raise _Stopped(f"computed a number of more than {MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
                raise _Stopped(f"computed a number of more than {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_percent(budget, left, right)
        return budget.sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if getattr(__obj, "__self__", None) is __self and __obj.__name__.startswith("llmdesk_"):
            return __obj(*args)  # a meter inserted by _Meter (calls in loops also get _loop_vars)
        budget = _budget()
        budget.tick()
        given = {key: value for key, value in kwargs.items() if key not in ("_loop_vars", "_block_vars")}
        # str.format arrives wrapped by the sandbox (jinja2 >= 3.1.5); check the real method
        args = _check_method(budget, getattr(__obj, "__wrapped__", __obj), args, given)
        return budget.sized(super().call(__context, __obj, *args, **kwargs))

    # -- meters called from the instrumented template (see _Meter) --

    def llmdesk_loop(self, iterable: Any) -> Any:
        budget = _budget()
        for item in iterable:
            budget.tick()
            yield item

    def llmdesk_out(self, value: Any) -> str:
        budget = _budget()
        if not isinstance(value, str):
            budget.fits(budget.size(value))
        text = str(value)
        budget.produced += len(text)
        if budget.produced > 4 * MAX_OUTPUT_CHARS:  # all output, with macro and block buffers
            raise _over("produced")
        if time.monotonic() > budget.deadline:
            raise _Stopped(f"ran for more than {MAX_RENDER_SECONDS:g} seconds")
        return text

    def llmdesk_text(self, value: Any) -> Any:
        if not isinstance(value, str):
            budget = _budget()
            budget.fits(budget.size(value))
        return value

    def llmdesk_sized(self, value: Any) -> Any:
        return _budget().sized(value)


class _Meter(NodeTransformer):
    """Rewrite a parsed template so its work is metered when it runs: every `for` iterates
    through llmdesk_loop (a step per item), every piece of output passes llmdesk_out (counted
    even when a macro or `{% set %}` block buffers it), and concatenations and literal lists,
    tuples and dicts are size-checked. Loops that print nothing and output collected in
    buffers are invisible to a count of the final text alone."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _hook("llmdesk_loop", node.iter)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_hook("llmdesk_out", child) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_hook("llmdesk_text", child) for child in node.nodes]
        return _hook("llmdesk_sized", node)

    def _container(self, node: nodes.Node) -> nodes.Node:
        self.generic_visit(node)
        return _hook("llmdesk_sized", node)

    visit_List = visit_Dict = _container

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _hook("llmdesk_sized", node) if node.ctx == "load" else node


def _hook(meter: str, node: nodes.Expr) -> nodes.Expr:
    call = nodes.Call(nodes.EnvironmentAttribute(meter), [node], [], None, None)
    return call.set_lineno(node.lineno or 1)


_ENV: _Sandbox | None = None


def _environment() -> _Sandbox:
    global _ENV
    if _ENV is None:
        _ENV = _Sandbox()
    return _ENV


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    """Parse, meter and compile a template; cached by source. Raises jinja2's errors."""
    env = _environment()
    tree = _Meter().visit(env.parse(source))
    tree.set_environment(env)
    return env.from_string(tree)


# ---------------------------------------------------------------------------------------------
# The public face
# ---------------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template ready to render, and where it came from."""

    source: str
    name: str  # a built-in's name, "model" for the model's own template, or a file's path
    origin: str  # for people: "from the model's metadata", "built-in 'llama-3' (--template)", ...
    bos_token: str = ""
    eos_token: str = ""
    model_name: str = "model"  # used in error messages

    @property
    def _label(self) -> str:
        if self.name == "model":
            return f"chat template of {self.model_name}"
        if self.name in BUILTIN_TEMPLATES:
            return f"built-in chat template '{self.name}' (for {self.model_name})"
        return f"chat template {self.name} (for {self.model_name})"

    def compile(self) -> None:
        """Parse the template now, so a broken one is reported when the model loads."""
        if len(self.source) > MAX_TEMPLATE_CHARS:
            raise TemplateError(
                f"{self._label} is {len(self.source):,} characters long; the limit is {MAX_TEMPLATE_CHARS:,}"
            )
        try:
            _compile(self.source)
        except Exception as e:
            raise self._error(e) from None

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts: role, content, ...), as transformers'
        apply_chat_template(tokenize=False) would produce it. Extra keyword arguments become
        template variables (`enable_thinking=False`, `date_string=...`, `documents=[...]`)."""
        self.compile()
        template = _compile(self.source)
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "documents": None,
            **extra,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        budget = _Budget()
        token = _BUDGET.set(budget)
        try:
            for value in variables.values():
                budget.measure_inputs(value)
            pieces, total = [], 0
            for piece in template.generate(variables):  # streamed, so a flood stops early
                total += len(piece)
                if total > MAX_OUTPUT_CHARS:
                    raise _over("rendered")
                pieces.append(piece)
            return "".join(pieces)
        except Exception as e:
            raise self._error(e) from None
        finally:
            _BUDGET.reset(token)

    def _error(self, e: Exception) -> TemplateError:
        """Whatever went wrong inside Jinja, as one line for the user."""
        label, text = self._label, _one_line(str(e))
        if isinstance(e, _RaisedByTemplate):  # the template's own words
            return TemplateError(f"{label}: {text}")
        if isinstance(e, jinja2.TemplateSyntaxError):
            return TemplateError(f"{label} has a syntax error on line {e.lineno}: {_one_line(e.message or '')}")
        if isinstance(e, SecurityError):
            hint = ""
            if self.name == "model":
                hint = "; the model file may be hostile: use a built-in template (--template)"
            return TemplateError(f"{label} tried to access an unsafe attribute and was refused: {text}{hint}")
        if isinstance(e, _Stopped):
            return TemplateError(f"{label} was stopped: it {text}")
        if isinstance(e, RecursionError):
            return TemplateError(f"{label} failed: it recursed too deeply")
        if isinstance(e, MemoryError):
            return TemplateError(f"{label} failed: it ran out of memory")
        if isinstance(e, jinja2.TemplateError):  # undefined variables and attributes, mostly
            return TemplateError(f"{label} failed: {text}")
        # the template's own bug: TypeError (str + None), ZeroDivisionError, ...
        return TemplateError(f"{label} failed: {type(e).__name__}: {text}")

    @property
    def stop_strings(self) -> list[str]:
        """End-of-turn text the engine should stop on for this format (may be empty)."""
        if self.name in _BUILTIN_STOPS:
            stops = list(_BUILTIN_STOPS[self.name])
        else:
            stops = [marker for marker in _TURN_END_MARKERS if marker in self.source]
        if self.eos_token and "eos_token" in self.source and self.eos_token not in stops:
            stops.append(self.eos_token)
        return stops


def resolve_template(
    model_template: str | None,
    override: str | None = None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    model_name: str = "model",
) -> ChatTemplate:
    """Pick the chat template for a model: `override` (a built-in name or a path to a .jinja
    file), else the model's own, else DEFAULT_TEMPLATE. Compiles it, so errors show up now."""
    if override:
        key = _ALIASES.get(override.strip().lower(), override.strip().lower())
        if key in BUILTIN_TEMPLATES:
            name, source, origin = key, BUILTIN_TEMPLATES[key], f"built-in '{key}' (--template)"
        elif override.endswith((".jinja", ".jinja2", ".j2")) or "/" in override or Path(override).is_file():
            path = Path(override).expanduser()
            try:
                source = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise TemplateError(f"chat template file {path} not found") from None
            except (OSError, UnicodeDecodeError) as e:
                raise TemplateError(f"cannot read chat template file {path}: {_one_line(str(e))}") from None
            name, origin = str(path), f"file {path} (--template)"
        else:
            names = ", ".join(BUILTIN_TEMPLATES)
            raise TemplateError(f"unknown chat template {override!r}: use one of {names}, or a path to a .jinja file")
    elif model_template and model_template.strip():
        name, source, origin = "model", model_template, "from the model's metadata"
    else:
        name, source = DEFAULT_TEMPLATE, BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
        origin = f"default '{DEFAULT_TEMPLATE}' (the model has no chat template)"
    template = ChatTemplate(source, name, origin, bos_token=bos_token, eos_token=eos_token, model_name=model_name)
    template.compile()
    return template
