"""Graders: functions that score completions, for GRPO's rewards, ranking `synth` candidates, and
checking a behaviour.

Every grader has TRL's reward-function signature,

    grader(prompts: list, completions: list, **columns) -> list[float | None]

where `completions` are strings or chat messages ([{"role": "assistant", "content": ...}]) and
`columns` are the dataset's columns, one value per completion. A score of None means "could not be
graded" (a Python grader that raised): TRL leaves it out of the mean; the run counts it.

A grader is named by a spec, as `--reward` takes them (comma-separated, weights with
`--reward-weights`):

    exact[:COLUMN]            1 if the answer equals the reference (case and spaces ignored;
                              default column: answer)
    regex:PATTERN             1 if the pattern is found in the completion (anchor it to match all)
    numeric[:COLUMN[:TOL]]    1 if the completion's last number is within TOL (absolute,
                              default 1e-6) of the reference number
    json[:SCHEMA.json]        1 if the completion is JSON (valid against the schema when given)
    python:FILE.py:FUNCTION   your function, with the signature above
    judge:MODEL               a model's 1-10 grade of the completion, scaled to 0-1 (local or
                              openai:URL#MODEL; eval.judge asks and reads it)
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import LlmdeskError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
KINDS = ("exact", "regex", "numeric", "json", "python", "judge")


def completion_text(c: Any) -> str:
    """The text of a completion: a string, or the last message's content of a chat completion."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        content = c[-1].get("content")
        return content if isinstance(content, str) else ""
    if isinstance(c, dict):
        content = c.get("content")
        return content if isinstance(content, str) else ""
    return ""


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _norm(s: Any) -> str:
    return re.sub(r"\s+", " ", str(s)).strip().rstrip(".").casefold()


@dataclass
class Grader:
    """A named scoring function; `calls`, `failed` count what it did (None scores)."""
    spec: str
    fn: Callable[..., list]
    column: str | None = None  # the dataset column it needs, checked before a run starts
    failed: int = 0
    calls: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def __name__(self) -> str:  # TRL logs reward functions by __name__
        return self.spec

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        self.calls += 1
        scores = self.fn(prompts, completions, **columns)
        if not isinstance(scores, (list, tuple)):
            raise LlmdeskError(f"grader {self.spec}: returned {type(scores).__name__}, not a list of scores")
        if len(scores) != len(completions):
            raise LlmdeskError(f"grader {self.spec}: returned {len(scores)} scores for {len(completions)} completions "
                               "(one score per completion, None where it cannot grade)")
        out: list[float | None] = []
        for s in scores:
            if s is None or (isinstance(s, float) and math.isnan(s)):
                out.append(None)
                self.failed += 1
                continue
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise LlmdeskError(f"grader {self.spec}: a score must be a number or None, not {s!r}")
            out.append(float(s))
        return out

    def check_columns(self, columns: set[str], where: str) -> None:
        if self.column and self.column not in columns:
            raise LlmdeskError(f"{where}: grader {self.spec} needs a column {self.column!r}; the rows have "
                               f"{', '.join(sorted(columns)) or 'none'}")


def _column(columns: dict, name: str, n: int) -> list:
    vals = columns.get(name)
    if vals is None:
        raise LlmdeskError(f"the rows have no column {name!r} (they have: {', '.join(sorted(columns)) or 'none'})")
    return list(vals) if isinstance(vals, (list, tuple)) else [vals] * n


def exact(column: str = "answer") -> Grader:
    def fn(prompts, completions, **columns):
        refs = _column(columns, column, len(completions))
        return [1.0 if _norm(completion_text(c)) == _norm(r) else 0.0 for c, r in zip(completions, refs)]
    return Grader(f"exact:{column}", fn, column)


def regex(pattern: str) -> Grader:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise LlmdeskError(f"grader regex:{pattern}: not a regular expression ({e})") from None

    def fn(prompts, completions, **columns):
        return [1.0 if rx.search(completion_text(c)) else 0.0 for c in completions]
    return Grader(f"regex:{pattern}", fn)


def numeric(column: str = "answer", tol: float = 1e-6) -> Grader:
    if not (tol >= 0 and math.isfinite(tol)):
        raise LlmdeskError(f"grader numeric: the tolerance must be a number >= 0, not {tol}")

    def fn(prompts, completions, **columns):
        refs = _column(columns, column, len(completions))
        out = []
        for c, r in zip(completions, refs):
            ref = r if isinstance(r, (int, float)) and not isinstance(r, bool) else last_number(str(r))
            got = last_number(completion_text(c))
            out.append(1.0 if ref is not None and got is not None and abs(got - float(ref)) <= tol else 0.0)
        return out
    return Grader(f"numeric:{column}:{tol:g}", fn, column)


def json_valid(schema_file: str | None = None) -> Grader:
    validator = None
    if schema_file:
        import jsonschema

        p = Path(schema_file).expanduser()
        try:
            schema = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise LlmdeskError(f"grader json:{schema_file}: cannot read it ({e.strerror})") from None
        except ValueError as e:
            raise LlmdeskError(f"grader json:{schema_file}: not JSON ({e})") from None
        try:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise LlmdeskError(f"grader json:{schema_file}: not a valid JSON Schema: {e.message}") from None
        validator = cls(schema)

    def fn(prompts, completions, **columns):
        out = []
        for c in completions:
            try:
                value = json.loads(completion_text(c))
            except ValueError:
                out.append(0.0)
                continue
            out.append(1.0 if validator is None or validator.is_valid(value) else 0.0)
        return out
    return Grader("json" + (f":{schema_file}" if schema_file else ""), fn)


def python(file: str, function: str) -> Grader:
    """A function from a file; its exceptions score None for that batch (counted), and a wrong
    result (length, type) is an error."""
    p = Path(file).expanduser()
    if not p.is_file():
        raise LlmdeskError(f"grader python:{file}:{function}: no such file")
    name = f"llmdesk_grader_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise LlmdeskError(f"{p}:{e.lineno}: grader file has a syntax error: {e.msg}") from None
    except Exception as e:  # the file's own import-time error
        raise LlmdeskError(f"{p}: grader file failed to import: {type(e).__name__}: {e}") from None
    f = getattr(mod, function, None)
    if not callable(f):
        have = ", ".join(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == name) or "none"
        raise LlmdeskError(f"{p}: no function {function!r} (functions: {have})")
    g = Grader(f"python:{p.name}:{function}", lambda *a, **k: [])

    def fn(prompts, completions, **columns):
        try:
            return f(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            if len(g.errors) < 5:
                g.errors.append(msg)
            print(f"grader {g.spec} raised {msg}; these {len(completions)} completions score None",
                  file=sys.stderr)
            return [None] * len(completions)
    g.fn = fn
    return g


def judge(model_ref: str, *, load: Callable[[str], Any] | None = None) -> Grader:
    """A model's 1-10 grade (eval.judge.grade), scaled to 0-1; an unreadable verdict is None."""
    from .judge import grade

    holder: dict[str, Any] = {}

    def fn(prompts, completions, **columns):
        if "model" not in holder:
            if load is None:
                from ..runtime.model import load as load_model

                holder["model"] = load_model(model_ref)
            else:
                holder["model"] = load(model_ref)
        refs = columns.get("answer") or columns.get("reference")
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            question = completion_text(p) if not isinstance(p, str) else p
            g = grade(holder["model"], question, completion_text(c),
                      reference=str(refs[i]) if isinstance(refs, (list, tuple)) else None)
            out.append(None if g.score is None else (g.score - 1) / 9)
        return out
    return Grader(f"judge:{model_ref}", fn)


def parse_grader(spec: str) -> Grader:
    """A grader from its spec (see the module docstring); a bad spec is one line."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "exact":
        return exact(arg or "answer")
    if kind == "regex":
        if not arg:
            raise LlmdeskError("grader regex needs a pattern: regex:PATTERN")
        return regex(arg)
    if kind == "numeric":
        column, _, tol = arg.partition(":")
        try:
            t = float(tol) if tol else 1e-6
        except ValueError:
            raise LlmdeskError(f"grader {spec}: the tolerance {tol!r} is not a number") from None
        return numeric(column or "answer", t)
    if kind == "json":
        return json_valid(arg or None)
    if kind == "python":
        file, sep, function = arg.rpartition(":")
        if not sep or not file or not function:
            raise LlmdeskError(f"grader {spec}: give python:FILE.py:FUNCTION")
        return python(file, function)
    if kind == "judge":
        if not arg:
            raise LlmdeskError("grader judge needs a model: judge:MODEL (a store name, a .gguf, openai:URL#MODEL)")
        return judge(arg)
    raise LlmdeskError(f"unknown grader {kind!r} in {spec!r} (graders: {', '.join(KINDS)})")


def parse_graders(specs: str | list[str], weights: str | list[float] | None = None) -> tuple[list[Grader], list[float]]:
    """`--reward a,b` and `--reward-weights 1,0.5`. A regex with a comma is given as its own
    --reward (a list)."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise LlmdeskError("no grader given: --reward exact, regex:PATTERN, numeric, json, python:FILE.py:FN or judge:MODEL")
    graders = [parse_grader(s) for s in items]
    if weights is None:
        return graders, [1.0] * len(graders)
    if isinstance(weights, str):
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise LlmdeskError(f"--reward-weights {weights!r}: give numbers separated by commas") from None
    else:
        ws = [float(w) for w in weights]
    if len(ws) != len(graders):
        raise LlmdeskError(f"--reward-weights gives {len(ws)} weights for {len(graders)} graders")
    if not all(math.isfinite(w) for w in ws):
        raise LlmdeskError("--reward-weights must be finite numbers")
    return graders, ws


def combined(graders: list[Grader], weights: list[float], prompts: list, completions: list,
             **columns) -> tuple[list[float], dict[str, float]]:
    """The weighted reward of each completion (None scores count as 0 in the sum, as TRL's nansum
    does) and each grader's mean (over the scores it gave)."""
    totals = [0.0] * len(completions)
    means: dict[str, float] = {}
    for g, w in zip(graders, weights):
        scores = g(prompts, completions, **columns)
        got = [s for s in scores if s is not None]
        means[g.spec] = sum(got) / len(got) if got else float("nan")
        for i, s in enumerate(scores):
            if s is not None:
                totals[i] += w * s
    return totals, means
