"""Evaluation tasks as files: a small YAML or TOML spec over local JSONL, JSON, CSV or Parquet data.

A spec says which rows are asked (the evaluated split), how a row becomes a prompt (Jinja2
templates over the row's columns, in a sandbox), which continuations are scored or which answer
is expected, and where few-shot examples come from. `load_task` finds the spec (a built-in name or
a file) and the data, `Task.items()` turns rows into `Item`s ready to score or generate:

    task = load_task("arc_easy")               # or load_task("my_task.yaml", data="rows.jsonl")
    for item in task.items(limit=100, shots=5):
        item.context, item.choices, item.gold  # "Question: ...\\nAnswer:", [" rock", " air"], 1

The built-in specs (eval/builtin/*.yaml) reproduce lm-evaluation-harness's prompts, few-shot
layout and few-shot draws (the same seed picks the same examples), so scores are comparable.
Data is looked for, in order, at `--data PATH`, `$LLMDESK_HOME/eval-data/<task>/` and in the
Hugging Face hub cache; never on the network. docs/eval-tasks.md describes the format.

Every problem a user can cause (a bad spec key, a missing file, a row without a column, an
answer out of range) is one LlmdeskError line naming the file and the row.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jinja2
import jinja2.meta
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import LlmdeskError
from ..store import paths

__all__ = ["BUILTIN_DIR", "Item", "Task", "TaskError", "eval_data_dir", "hub_cache_dir", "list_tasks", "load_task",
           "preprocess"]

BUILTIN_DIR = Path(__file__).parent / "builtin"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
KINDS = ("multiple_choice", "generate")
SPLITS = ("test", "validation", "dev", "train")
# file and folder names the public releases give each split (MMLU's original CSVs say "val")
SPLIT_NAMES = {"test": ("test",), "validation": ("validation", "val", "valid"), "dev": ("dev",),
               "train": ("train",)}


class TaskError(LlmdeskError):
    """A task spec or its data that cannot be used: one line naming the file (and row)."""


# ---------------------------------------------------------------------------------------------
# What the scorer gets


@dataclass
class Item:
    index: int  # the row's position in the evaluated split (stable across runs, used to resume)
    context: str  # description + few-shot examples + this question, ready to score or generate after
    choices: list[str]  # multiple_choice: continuations, target delimiter included (" A"); [] for generate
    gold: int | None  # multiple_choice: index of the right choice (mc2: None)
    labels: list[int] | None  # mc2: 1 for each true choice, 0 for each false one (else None)
    target: str | None  # generate: the reference answer, extracted and normalised ("72")
    doc: dict  # the row as read (with what the spec's preprocess adds: hellaswag's query, ...)


@dataclass
class Task:
    name: str
    kind: str  # "multiple_choice" | "generate"
    metrics: list[str]  # multiple_choice: ["acc", "acc_norm"] (or ["mc2"]); generate: ["exact_match"]
    sha256: str  # the spec's text + the data files' content: identifies the task in results
    until: list[str]  # generate: stop strings
    max_tokens: int  # generate: answer length bound
    spec_path: Path | None
    shots: int = 0  # the spec's default number of few-shot examples
    split: str = "test"  # the evaluated split
    fewshot_split: str | None = None  # where few-shot examples come from
    extractions: list[str] = field(default_factory=list)  # generate: answer rules, the default first
    files: dict[str, list[Path]] = field(default_factory=dict)  # split -> data files
    data_origin: str = ""  # where the data was found, for people
    _spec: dict = field(default_factory=dict, repr=False)
    _subset: str | None = field(default=None, repr=False)
    _rows: dict[str, list[_Row]] = field(default_factory=dict, repr=False)
    _templates: dict[str, _Template] = field(default_factory=dict, repr=False)  # by source

    @property
    def target_delimiter(self) -> str:
        """What each choice starts with after the context (" " unless the spec says otherwise):
        acc_norm divides by a choice's length without it, as lm-eval does."""
        return self._spec.get("target_delimiter", " ")

    # -- items --

    def items(self, *, limit: int | None = None, shots: int | None = None, seed: int = 1234) -> list[Item]:
        """The evaluated rows as Items. `limit` takes the first N rows (as lm-eval's --limit);
        `shots` few-shot examples (None: the spec's default) come from the few-shot split, drawn
        with random.Random(seed) in row order as lm-eval draws them (or the first N, for specs
        that say `sampler: first_n`), never the evaluated row itself. Every row used is checked
        first: a bad one is one TaskError line naming its file and row."""
        shots = self.shots if shots is None else shots
        if shots < 0:
            raise TaskError(f"{self.name}: --shots must be 0 or more, not {shots}")
        if limit is not None and limit < 1:
            raise TaskError(f"{self.name}: --limit must be 1 or more, not {limit}")
        rows = self._split_rows(self.split)
        if limit is not None:
            rows = rows[:limit]
        asked = [self._render(r) for r in rows]
        examples = self._fewshot(rows, shots, seed) if shots else [[] for _ in rows]
        tdelim, fdelim = self._spec["target_delimiter"], self._spec["fewshot_delimiter"]
        out = []
        for i, (row, r, shown) in enumerate(zip(rows, asked, examples)):
            # lm-eval's layout: description, then "question<tdelim>answer<fdelim>" per example
            prefix = "".join(e.text + tdelim + e.answer + fdelim for e in shown)
            context = self._text("description", row) + prefix + r.text
            out.append(Item(index=i, context=context, choices=[tdelim + c for c in r.choices], gold=r.gold,
                            labels=r.labels, target=r.reference, doc=row.doc))
        return out

    def extract(self, text: str, rule: str | None = None) -> str:
        """generate: the answer in a model's output by the spec's rule (the first, unless `rule`
        names another: gsm8k has "strict" and "flexible"), normalised like the reference;
        "" when there is none."""
        rules = self._spec["answer"]["extract"]
        if not rules:
            raise TaskError(f"{self.name} is a {self.kind} task: it has no answer to extract")
        if rule is None:
            rule = next(iter(rules))
        if rule not in rules:
            raise TaskError(f"{self.name} has no answer rule {rule!r}: use one of {', '.join(rules)}")
        return self._normalise(_apply_rule(rules[rule], text))

    # -- rows --

    def _split_rows(self, split: str) -> list[_Row]:
        if split not in self._rows:
            files = self.files.get(split)
            if not files:
                raise TaskError(f"{self.name}: no data for the {split!r} split (found the others in "
                                f"{self.data_origin}): add its file there, or give --data a folder that has it")
            rows = [r for f in files for r in _read_rows(f, self._spec["data"].get("csv_columns"))]
            pre = self._spec.get("preprocess")
            if pre:
                rows = [_Row(_preprocessed(pre, r), r.where) for r in rows]
            needed = self._spec["data"].get("columns") or []
            for r in rows:
                missing = [c for c in needed if c not in r.doc]
                if missing:
                    raise r.error(f"no column {missing[0]!r} (the task {self.name} reads "
                                  f"{', '.join(needed)}): fix the file or point --data at the right one")
            if self._subset is not None:
                column = self._spec["subsets"]["column"]
                rows = [r for r in rows if r.doc.get(column) == self._subset]
            self._rows[split] = rows
        return self._rows[split]

    def _fewshot(self, rows: list[_Row], shots: int, seed: int) -> list[list[_Rendered]]:
        """The few-shot examples of each row, the way lm-eval's samplers pick them: `first_n`
        takes the first N of the pool; `random` draws rnd.sample(pool, N) row after row from one
        random.Random(seed) per group (N + 1 when the pool is the evaluated split, or the spec
        says exclude_self, then drops the evaluated row if drawn)."""
        fs = self._spec["fewshot"]
        split = fs.get("split") or self.split
        if split not in self.files:
            raise TaskError(f"{self.name}: {shots}-shot needs the {split!r} split for its examples, which is not "
                            f"in {self.data_origin}: give --data a folder with the {self.split!r} and {split!r} "
                            f"files, or use --shots 0")
        pool_rows = self._split_rows(split)
        group_by = fs.get("group_by")
        pools: dict[Any, list[_Row]] = {}
        for r in pool_rows:
            pools.setdefault(r.doc.get(group_by) if group_by else None, []).append(r)
        rendered: dict[int, _Rendered] = {}

        def shown(r: _Row) -> _Rendered:
            if id(r) not in rendered:
                rendered[id(r)] = self._render(r)
            return rendered[id(r)]

        same_split = split == self.split  # draw one more, then drop the evaluated row if drawn
        exclude_self = fs.get("exclude_self", same_split)
        rngs: dict[Any, random.Random] = {}  # one per group: lm-eval runs each MMLU subject as a task
        out = []
        for row in rows:
            key = row.doc.get(group_by) if group_by else None
            pool = pools.get(key, [])
            if fs["sampler"] == "first_n":
                picked = [r for r in pool if not (exclude_self and r.doc == row.doc)][:shots]
            else:
                rnd = rngs.setdefault(key, random.Random(seed))
                n = min(shots + 1 if exclude_self else shots, len(pool))
                picked = rnd.sample(pool, n)
                if exclude_self:
                    picked = [r for r in picked if r.doc != row.doc][:shots]
                    if len(picked) < shots:
                        rest = [r for r in pool if r.doc != row.doc]
                        picked = rnd.sample(rest, min(shots, len(rest)))
            if len(picked) < shots:
                where = f" with {group_by} {key!r}" if group_by else ""
                examples = f"{shots} example{'s' if shots != 1 else ''}{where}"
                raise row.error(f"{shots}-shot needs {examples} in the {split!r} split, which has {len(picked)}: "
                                f"use --shots {len(picked)} or fewer")
            out.append([shown(r) for r in picked])
        return out

    # -- rendering --

    def _text(self, key: str, row: _Row) -> str:
        template = self._spec.get(key)
        return _render(self, key, template, row) if template else ""

    def _render(self, row: _Row) -> _Rendered:
        spec = self._spec
        text = self._text("text", row)
        target = _value(self, "target", spec.get("target"), row)
        if self.kind == "generate":
            answer = "" if target is None else str(target)
            reference = self._normalise(_apply_rule(spec["answer"]["reference"], answer))
            if not reference:
                raise row.error(f"no reference answer in {answer[:60]!r} (the task {self.name} takes it "
                                f"{_rule_words(spec['answer']['reference'])}): fix the row or remove it")
            return _Rendered(text, [], None, None, answer, reference)
        choices = _choices(self, row)
        labels = None
        if spec.get("labels") is not None:
            labels = _labels(self, row, len(choices))
            gold = None
            answer = choices[labels.index(1)]
        else:
            gold = _gold(target, choices, row)
            answer = choices[gold]
        return _Rendered(text, choices, gold, labels, answer, None)

    def _normalise(self, text: str) -> str:
        """Like lm-eval's exact_match: each `ignore` regex removed, then lower case if asked."""
        answer = self._spec["answer"]
        for pattern in answer["ignore"]:
            text = re.sub(pattern, "", text)
        if answer["ignore_case"]:
            text = text.lower()
        return text.strip()


@dataclass
class _Where:
    """Which file and row a row came from: line numbers for JSONL and CSV, row numbers else."""

    path: Path
    number: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{paths.display(self.path)} {self.unit} {self.number}"


@dataclass
class _Row:
    doc: dict
    where: _Where

    def error(self, what: str) -> TaskError:
        return TaskError(f"{self.where}: {what}")


@dataclass
class _Rendered:
    text: str  # the question
    choices: list[str]  # without the target delimiter
    gold: int | None
    labels: list[int] | None
    answer: str  # what a few-shot example shows after the question
    reference: str | None  # generate: the expected answer, normalised


class _RowProblem(Exception):
    """Raised by a preprocess; the reader adds the file and row."""


# ---------------------------------------------------------------------------------------------
# Templates: Jinja2 with lm-eval's settings (StrictUndefined, trailing newlines kept), in an
# immutable sandbox that refuses `_` attributes at once, and `*` / `**` that would build a value
# of more than MAX_VALUE characters or digits in one step. A task file is chosen and run by its
# user, like a script; through the sandbox it cannot reach Python's internals. (The chat-template
# sandbox in runtime/templates.py also meters loops and time, for templates that come inside
# downloaded models and run for remote clients.)

MAX_VALUE = 1_000_000


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(attribute, str) and attribute.startswith("_"):
            raise SecurityError(f"access to attribute {attribute!r} is unsafe")
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right > 0:
            big = right * abs(left).bit_length() > MAX_VALUE
        elif operator == "*" and not ints:
            times, value = (right, left) if isinstance(right, int) else (left, right)
            big = isinstance(times, int) and hasattr(value, "__len__") and times * len(value) > MAX_VALUE
        else:
            big = False
        if big:
            raise SecurityError(f"{operator} would build a value of more than {MAX_VALUE:,} characters or digits")
        return super().call_binop(context, operator, left, right)


_ENV = _Sandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
_ENV.filters["regex_replace"] = lambda text, pattern, repl, count=0: re.sub(pattern, repl, text, count=count)
_ENV.globals.pop("lipsum", None)  # random text: a template stays a function of its row
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class _Template:
    """A compiled template, the columns it reads, and its renders by their values: a description
    over `subject` renders 57 times for MMLU's 14,042 rows, not 14,042 times."""

    template: jinja2.Template
    reads: tuple[str, ...]
    done: dict[tuple, str] = field(default_factory=dict)

    def render(self, doc: dict) -> str:
        given = {n: doc[n] for n in self.reads if n in doc}  # names it reads that are not columns: globals
        key = tuple((n in given, given.get(n)) for n in self.reads)
        if not all(isinstance(v, (str, int, float, type(None))) for _, v in key):  # lists, dicts: render
            return self.template.render(given)
        if key not in self.done:
            self.done[key] = self.template.render(given)
        return self.done[key]


def _compile(spec_label: str, key: str, source: str) -> _Template:
    try:
        reads = jinja2.meta.find_undeclared_variables(_ENV.parse(source))
        return _Template(_ENV.from_string(source), tuple(sorted(reads)))
    except jinja2.TemplateSyntaxError as e:
        raise TaskError(f"{spec_label}: the {key!r} template has a syntax error on line {e.lineno}: "
                        f"{e.message}") from None


def _render(task: Task, key: str, source: str, row: _Row) -> str:
    if "{" not in source:  # no Jinja in it: the text itself (MMLU's choices A, B, C, D)
        return source
    template = task._templates.get(source)
    if template is None:
        template = task._templates[source] = _compile(_spec_label(task), key, source)
    try:
        return template.render(row.doc)
    except jinja2.UndefinedError as e:
        raise row.error(f"the task {task.name}'s {key!r} template failed: {_one_line(e)} (a column missing "
                        f"or of another shape): fix the row or the spec") from None
    except SecurityError as e:
        raise TaskError(f"{_spec_label(task)}: the {key!r} template was refused by the sandbox: {_one_line(e)}; "
                        f"templates read the row's columns, not Python's internals") from None
    except Exception as e:  # the template's own error on this row: 'E' is not in list, ...
        raise row.error(f"the task {task.name}'s {key!r} template failed on this row: {type(e).__name__}: "
                        f"{_one_line(e)}: fix the row or remove it") from None


def _value(task: Task, key: str, template: Any, row: _Row) -> Any:
    """A spec value read the way lm-eval reads doc_to_choice / doc_to_target: an int or a list
    as it is, a bare column name as that column's value, else the rendered template."""
    if template is None or isinstance(template, (int, list)):
        return template
    if _IDENT.fullmatch(template):  # a column: one this row lacks is an error, not the word itself
        if template not in row.doc:
            raise row.error(f"no column {template!r} (the task {task.name}'s {key!r} reads it): fix the row, "
                            "or the spec if the column has another name")
        return row.doc[template]
    return _render(task, key, template, row)


def _one_line(e: Any) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _spec_label(task: Task) -> str:
    return paths.display(task.spec_path) if task.spec_path else f"task {task.name}"


def _as_list(task: Task, key: str, value: Any, row: _Row) -> list:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise row.error(f"the task {task.name}'s {key!r} gives {value[:60]!r}, not a list") from None
    if hasattr(value, "tolist"):  # a numpy array from a Parquet reader
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise row.error(f"the task {task.name}'s {key!r} gives a {type(value).__name__}, not a list")
    return list(value)


def _choices(task: Task, row: _Row) -> list[str]:
    template = task._spec["choices"]
    if isinstance(template, list):
        choices = [_render(task, "choices", str(t), row) for t in template]
    else:
        choices = _as_list(task, "choices", _value(task, "choices", template, row), row)
    if not choices:
        raise row.error("the choice list is empty: give the row its choices or remove it")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise row.error(f"choice {bad[0]!r} is not text: every choice must be a string")
    return choices


def _gold(value: Any, choices: list[str], row: _Row) -> int:
    """The index of the right choice: an int, digits, or the choice's own text (lm-eval's rule)."""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        elif value in choices:
            return choices.index(value)
        else:
            raise row.error(f"the answer {value!r} is not an integer (nor one of the choices): give the index "
                            f"of the right choice, 0 to {len(choices) - 1}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise row.error(f"the answer {value!r} is not an integer: give the index of the right choice, "
                        f"0 to {len(choices) - 1}")
    if not 0 <= value < len(choices):
        raise row.error(f"the answer {value} is out of range: the row has {len(choices)} choices "
                        f"(0 to {len(choices) - 1}); fix the row or remove it")
    return value


def _labels(task: Task, row: _Row, n: int) -> list[int]:
    labels = _as_list(task, "labels", _value(task, "labels", task._spec["labels"], row), row)
    if len(labels) != n:
        raise row.error(f"{len(labels)} labels for {n} choices: give one label (1 true, 0 false) per choice")
    if any(isinstance(x, bool) or x not in (0, 1) for x in labels) or 1 not in labels:
        raise row.error(f"labels {labels[:8]} must be 1 (true) or 0 (false), with at least one 1")
    return [int(x) for x in labels]


# ---------------------------------------------------------------------------------------------
# Preprocesses: what a template cannot say, as small named functions that specs refer to by name
# (`preprocess: hellaswag`). A new one registers the same way; nothing from a spec file runs.

PREPROCESS: dict[str, Callable[[dict, _Where], dict]] = {}


def preprocess(name: str) -> Callable:
    """Register `fn(row, where) -> row` under `name`; raise ValueError(what) for a bad row."""

    def register(fn: Callable[[dict, _Where], dict]) -> Callable[[dict, _Where], dict]:
        PREPROCESS[name] = fn
        return fn

    return register


def _preprocessed(name: str, row: _Row) -> dict:
    try:
        return PREPROCESS[name](dict(row.doc), row.where)
    except _RowProblem as e:
        raise row.error(str(e)) from None


def _need(row: dict, *columns: str) -> None:
    for c in columns:
        if c not in row:
            raise _RowProblem(f"no column {c!r} (this layout has {', '.join(columns)})")


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: brackets are artifacts of the WikiHow part of the data
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@preprocess("hellaswag")
def _hellaswag(row: dict, where: _Where) -> dict:
    """Rowan/hellaswag rows -> query, choices, gold (lm-eval's tasks/hellaswag/utils.py)."""
    _need(row, "ctx_a", "ctx_b", "activity_label", "endings", "label")
    label = str(row["label"]).strip()
    if not re.fullmatch(r"\d+", label):
        raise _RowProblem(f"the label {row['label']!r} is not an integer (the index of the right ending)")
    endings = row["endings"].tolist() if hasattr(row["endings"], "tolist") else row["endings"]
    if not isinstance(endings, list):
        raise _RowProblem(f"the endings are a {type(endings).__name__}, not a list")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    row.update(query=_hellaswag_clean(row["activity_label"] + ": " + ctx),
               choices=[_hellaswag_clean(e) for e in endings], gold=int(label))
    return row


@preprocess("mmlu")
def _mmlu(row: dict, where: _Where) -> dict:
    """MMLU's original CSV layout (question, A, B, C, D, answer letter; the subject is the file
    name, `abstract_algebra_test.csv`) -> cais/mmlu's (question, subject, choices, answer index)."""
    if "choices" not in row and "A" in row:
        _need(row, "question", "A", "B", "C", "D", "answer")
        letter = str(row["answer"]).strip()
        if letter not in ("A", "B", "C", "D"):
            raise _RowProblem(f"the answer {row['answer']!r} is not one of the letters A, B, C, D")
        row["choices"] = [row.pop(k) for k in "ABCD"]
        row["answer"] = "ABCD".index(letter)
    if "subject" not in row:
        stem = where.path.stem
        for names in SPLIT_NAMES.values():
            for s in names:
                stem = stem.removesuffix("_" + s)
        row["subject"] = stem
    return row


# ---------------------------------------------------------------------------------------------
# Answers of generate tasks: rules that take an answer out of a text


# lm-eval's gsm8k "flexible-extract": the last number-like run in the text
LAST_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def _apply_rule(rule: Any, text: str) -> str:
    """A rule: "all" (the whole text), "last_number", or {regex: ..., select: first|last}. As
    lm-eval's regex filter: re.findall, the first (or last) match, its first non-empty group."""
    if rule == "all":
        return text
    if rule == "last_number":
        rule = {"regex": LAST_NUMBER, "select": "last"}
    found = re.findall(rule["regex"], text)
    if not found:
        return ""
    match = found[-1] if rule.get("select") == "last" else found[0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "")
    return match.strip()


def _rule_words(rule: Any) -> str:
    if rule == "all":
        return "whole"
    if rule == "last_number":
        return "as its last number"
    return f"with the regex {rule['regex']!r}"


def _check_rule(label: str, key: str, rule: Any) -> Any:
    if rule in ("all", "last_number"):
        return rule
    if isinstance(rule, dict) and isinstance(rule.get("regex"), str) and set(rule) <= {"regex", "select"}:
        try:
            re.compile(rule["regex"])
        except re.error as e:
            raise TaskError(f"{label}: {key}: the regex {rule['regex']!r} is not valid: {e}") from None
        if rule.get("select", "first") not in ("first", "last"):
            raise TaskError(f"{label}: {key}: select must be first or last, not {rule['select']!r}")
        return rule
    raise TaskError(f"{label}: {key} must be all, last_number or {{regex: '...', select: first|last}}, "
                    f"not {rule!r}")


# ---------------------------------------------------------------------------------------------
# Specs

# the keys of a spec (docs/eval-tasks.md says what each is)
SPEC_KEYS = ("name", "kind", "description", "data", "split", "fewshot", "preprocess", "subsets", "text",
             "choices", "target", "labels", "target_delimiter", "fewshot_delimiter", "metrics", "until",
             "max_tokens", "answer")
DATA_KEYS = ("hf", "config", "files", "columns", "csv_columns")


def _read_spec(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {paths.display(path)} not found: give a path to a .yaml or .toml spec, "
                        f"or a built-in name ({', '.join(_builtin_names())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read task file {paths.display(path)}: {_one_line(e)}") from None
    try:
        spec = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" line {line + 1}" if line is not None else ""
        raise TaskError(f"{paths.display(path)}{at}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                        f"{_one_line(getattr(e, 'problem', None) or e)}") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{paths.display(path)}: a task spec is a mapping of keys (name, kind, text, ...)")
    return text, spec


def _checked(spec: dict, label: str, stem: str) -> dict:
    """The spec with its defaults filled in, or a TaskError naming the key that is wrong."""
    spec = dict(spec)
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise TaskError(f"{label}: unknown key {unknown[0]!r}: a task spec has {', '.join(SPEC_KEYS)}")
    spec.setdefault("name", stem)
    kind = spec.get("kind")
    if kind not in KINDS:
        raise TaskError(f"{label}: kind must be multiple_choice or generate, not {kind!r}")
    for key in ("text",) + (("choices",) if kind == "multiple_choice" else ()) + ("target",):
        if spec.get(key) is None and not (key == "target" and spec.get("labels") is not None):
            raise TaskError(f"{label}: a {kind} task needs a {key!r} template")
    for key in ("text", "description"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise TaskError(f"{label}: {key} must be a template (text), not {type(spec[key]).__name__}")
    data = spec.setdefault("data", {}) or {}
    if not isinstance(data, dict) or any(k not in DATA_KEYS for k in data):
        raise TaskError(f"{label}: data must be a mapping of {', '.join(DATA_KEYS)}")
    spec["data"] = data
    files = data.get("files") or {}
    if not isinstance(files, dict) or any(s not in SPLITS for s in files):
        raise TaskError(f"{label}: data.files maps splits ({', '.join(SPLITS)}) to files")
    spec.setdefault("split", "test")
    if spec["split"] not in SPLITS:
        raise TaskError(f"{label}: split must be one of {', '.join(SPLITS)}, not {spec['split']!r}")
    fs = dict(spec.get("fewshot") or {})
    fs_keys = {"split", "sampler", "shots", "group_by", "exclude_self"}
    if set(fs) - fs_keys:
        raise TaskError(f"{label}: fewshot has {', '.join(sorted(fs_keys))}, not {sorted(set(fs) - fs_keys)[0]!r}")
    fs.setdefault("split", None)
    fs.setdefault("sampler", "random")
    fs.setdefault("shots", 0)
    if fs["split"] is not None and fs["split"] not in SPLITS:
        raise TaskError(f"{label}: fewshot.split must be one of {', '.join(SPLITS)}, not {fs['split']!r}")
    if fs["sampler"] not in ("random", "first_n"):
        raise TaskError(f"{label}: fewshot.sampler must be random or first_n, not {fs['sampler']!r}")
    if isinstance(fs["shots"], bool) or not isinstance(fs["shots"], int) or fs["shots"] < 0:
        raise TaskError(f"{label}: fewshot.shots must be a whole number, 0 or more")
    spec["fewshot"] = fs
    if spec.get("preprocess") is not None and spec["preprocess"] not in PREPROCESS:
        raise TaskError(f"{label}: no preprocess named {spec['preprocess']!r}: use one of {', '.join(PREPROCESS)}")
    spec.setdefault("target_delimiter", " ")
    spec.setdefault("fewshot_delimiter", "\n\n")
    default_metrics = ["exact_match"] if kind == "generate" else (
        ["mc2"] if spec.get("labels") is not None else ["acc", "acc_norm"])
    spec.setdefault("metrics", default_metrics)
    spec.setdefault("until", [])
    spec.setdefault("max_tokens", 256)  # lm-eval's max_gen_toks
    answer = dict(spec.get("answer") or {})
    if set(answer) - {"extract", "reference", "ignore", "ignore_case"}:
        raise TaskError(f"{label}: answer has extract, reference, ignore and ignore_case")
    extract = answer.get("extract") or ({"default": "all"} if kind == "generate" else {})
    if not isinstance(extract, dict):
        extract = {"default": extract}
    answer["extract"] = {k: _check_rule(label, f"answer.extract.{k}", v) for k, v in extract.items()}
    answer["reference"] = _check_rule(label, "answer.reference", answer.get("reference", "all"))
    answer.setdefault("ignore", [])
    answer.setdefault("ignore_case", False)
    for pattern in answer["ignore"]:
        _check_rule(label, "answer.ignore", {"regex": pattern})
    spec["answer"] = answer
    _check_types(spec, label)
    subsets = spec.get("subsets")
    if subsets is not None and not (isinstance(subsets, dict) and isinstance(subsets.get("column"), str)
                                    and isinstance(subsets.get("names"), list)):
        raise TaskError(f"{label}: subsets needs a column and a list of names")
    return spec


def _check_types(spec: dict, label: str) -> None:
    def texts(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    wrong = [
        ("name", isinstance(spec["name"], str) and spec["name"], "a name (text)"),
        ("metrics", texts(spec["metrics"]) and spec["metrics"], "a list of metric names"),
        ("until", texts(spec["until"]), "a list of stop strings"),
        ("max_tokens", type(spec["max_tokens"]) is int and spec["max_tokens"] > 0, "a whole number above 0"),
        ("target_delimiter", isinstance(spec["target_delimiter"], str), "text"),
        ("fewshot_delimiter", isinstance(spec["fewshot_delimiter"], str), "text"),
        ("data.columns", texts(spec["data"].get("columns", [])), "a list of column names"),
        ("data.csv_columns", texts(spec["data"].get("csv_columns", [])), "a list of column names"),
        ("answer.ignore", texts(spec["answer"]["ignore"]), "a list of regexes"),
    ]
    for key, ok, what in wrong:
        if not ok:
            raise TaskError(f"{label}: {key} must be {what}")


def _builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _builtin(name: str) -> tuple[Path, str | None] | None:
    """The built-in spec a name means, and the subset it picks (mmlu_anatomy -> mmlu, anatomy)."""
    path = BUILTIN_DIR / f"{name}.yaml"
    if path.is_file():
        return path, None
    for base in _builtin_names():
        if name.startswith(base + "_"):
            _, spec = _read_spec(BUILTIN_DIR / f"{base}.yaml")
            subset = name[len(base) + 1:]
            if subset in (spec.get("subsets") or {}).get("names", []):
                return BUILTIN_DIR / f"{base}.yaml", subset
    return None


# ---------------------------------------------------------------------------------------------
# Loading a task


def load_task(name_or_path: str | os.PathLike, *, data: str | os.PathLike | None = None) -> Task:
    """A built-in (mmlu, mmlu_<subject>, arc_easy, arc_challenge, hellaswag, truthfulqa_mc1,
    truthfulqa_mc2, gsm8k) or a path to a .yaml/.toml spec, with its data found (`data` first: a
    file, the evaluated split, or a folder). Nothing is read from the network."""
    ref = str(name_or_path)
    found = _builtin(ref) if not ref.endswith((".yaml", ".yml", ".toml")) else None
    if found is not None:
        spec_path, subset = found
    else:
        spec_path, subset = Path(ref).expanduser(), None
        if not spec_path.is_file() and "/" not in ref and not spec_path.suffix:
            raise TaskError(f"unknown task {ref!r}: use a built-in ({', '.join(_builtin_names())}, "
                            f"mmlu_<subject>) or a path to a .yaml or .toml task file")
    text, raw = _read_spec(spec_path)
    label = paths.display(spec_path)
    spec = _checked(raw, label, spec_path.stem)
    name = f"{spec['name']}_{subset}" if subset else spec["name"]
    files, origin = _find_data(spec, name, subset, spec_path, data)
    task = Task(
        name=name, kind=spec["kind"], metrics=list(spec["metrics"]), sha256="",
        until=list(spec["until"]), max_tokens=int(spec["max_tokens"]), spec_path=spec_path,
        shots=spec["fewshot"]["shots"], split=spec["split"],
        fewshot_split=spec["fewshot"]["split"] or spec["split"],
        extractions=list(spec["answer"]["extract"]) if spec["kind"] == "generate" else [],
        files=files, data_origin=origin, _spec=spec, _subset=subset,
    )
    for key in ("text", "description"):  # syntax errors now, not at the first row
        if spec.get(key):
            _compile(label, key, spec[key])
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(json.dumps({"subset": subset, "files": {s: [_file_sha256(f) for f in fs]
                                                            for s, fs in sorted(files.items())}}).encode())
    task.sha256 = digest.hexdigest()
    return task


def list_tasks() -> list[dict]:
    """The built-in tasks: name, kind, metrics, default shots, the data each looks for and
    whether it is found on this machine (and where)."""
    out = []
    for name in _builtin_names():
        path = BUILTIN_DIR / f"{name}.yaml"
        spec = _checked(_read_spec(path)[1], paths.display(path), name)
        try:
            files, origin = _find_data(spec, name, None, path, None)
            found, where = True, origin
        except TaskError:
            found, where = False, None
        d = spec["data"]
        out.append({
            "name": name, "kind": spec["kind"], "metrics": spec["metrics"], "shots": spec["fewshot"]["shots"],
            "split": spec["split"], "fewshot_split": spec["fewshot"]["split"],
            "data": f"{d['hf']}" + (f" ({d['config']})" if d.get("config") else "") if d.get("hf") else "",
            "looks_in": _places(name, d),
            "subsets": list((spec.get("subsets") or {}).get("names", [])),
            "found": found, "where": where,
        })
    return out


# ---------------------------------------------------------------------------------------------
# Finding data: --data, the user's eval-data folder, the Hugging Face hub cache


def eval_data_dir() -> Path:
    """`$LLMDESK_HOME/eval-data/`: a folder per task (`mmlu/`, `gsm8k/`) with its split files."""
    return paths.home() / "eval-data"


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (read now, as huggingface_hub reads it at import)."""
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(env):
            return Path(os.environ[env]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _hub_snapshots(repo: str) -> list[Path]:
    """The snapshots of a dataset repo in the hub cache: the one refs/main names first, then the
    other refs', then the rest, newest first."""
    root = hub_cache_dir() / f"datasets--{repo.replace('/', '--')}"
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return []
    ordered: list[Path] = []
    refs = root / "refs"
    ref_files = sorted(refs.rglob("*")) if refs.is_dir() else []
    ref_files.sort(key=lambda p: p != refs / "main")  # main first
    for ref in (p for p in ref_files if p.is_file()):
        try:
            snap = snaps / ref.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if snap.is_dir() and snap not in ordered:
            ordered.append(snap)
    rest = [p for p in snaps.iterdir() if p.is_dir() and p not in ordered]
    return ordered + sorted(rest, key=lambda p: p.stat().st_mtime, reverse=True)


def _split_files(folder: Path, split: str, subfolders: list[str]) -> list[Path]:
    """The files of `split` in `folder` (or its subfolder for the config: cais/mmlu's `all/`),
    in the layouts the public releases use: test.jsonl, test-00000-of-00001.parquet (the Hub's
    shards), abstract_algebra_test.csv (MMLU's CSVs), test/0000.parquet (the Hub's parquet
    conversion), data/test-*.parquet."""
    for sub in subfolders:
        d = folder / sub if sub else folder
        if not d.is_dir():
            continue
        for s in SPLIT_NAMES[split]:
            found: list[Path] = []
            for suffix in DATA_SUFFIXES:
                found += [p for p in (d / f"{s}{suffix}",) if p.is_file()]
                found += sorted(d.glob(f"{s}-*{suffix}"))
                found += sorted(d.glob(f"*_{s}{suffix}"))
                if (d / s).is_dir():
                    found += sorted(p for p in (d / s).glob(f"*{suffix}") if p.is_file())
            if found:
                return found
    return []


def _subfolders(spec: dict, subset: str | None) -> list[str]:
    config = spec["data"].get("config")
    return [x for x in (subset, config, "data", "default", "") if x is not None]


def _places(name: str, data: dict) -> str:
    hub = f"; the Hugging Face cache ({paths.display(hub_cache_dir())}) for {data['hf']}" if data.get("hf") else ""
    return f"--data PATH; {paths.display(eval_data_dir() / name)}/{hub}"


def _find_data(spec: dict, name: str, subset: str | None, spec_path: Path,
               data: str | os.PathLike | None) -> tuple[dict[str, list[Path]], str]:
    """split -> files, and where they were found. The evaluated split decides the place; the
    few-shot split is taken from the same place."""
    split = spec["split"]
    fs_split = spec["fewshot"]["split"]
    wanted = [split] + ([fs_split] if fs_split and fs_split != split else [])
    subs = _subfolders(spec, subset)

    def from_folder(folder: Path) -> dict[str, list[Path]]:
        got = {s: _split_files(folder, s, subs) for s in wanted}
        if not got[split] and subset is None and spec.get("subsets"):
            got = _from_subset_folders(folder, spec, name, wanted)
        return {s: f for s, f in got.items() if f}

    looked: list[str] = []
    if data is not None:
        p = Path(data).expanduser()
        if p.is_file():
            if p.suffix not in DATA_SUFFIXES:
                raise TaskError(f"--data {paths.display(p)}: not a data file ({', '.join(DATA_SUFFIXES)})")
            return {split: [p]}, paths.display(p)
        if not p.is_dir():
            raise TaskError(f"--data {paths.display(p)}: no such file or folder")
        files = from_folder(p)
        if split in files:
            return files, paths.display(p)
        raise TaskError(f"{name}: no {split!r} split in --data {paths.display(p)}: looked for "
                        f"{_patterns(split, subs)}; name the file after its split, or give the file itself")
    given = spec["data"].get("files") or {}
    if given:
        files = {}
        for s, f in given.items():
            fl = [f] if isinstance(f, str) else list(f)
            files[s] = [(spec_path.parent / x).expanduser() if not Path(x).is_absolute() else Path(x) for x in fl]
            for x in files[s]:
                if not x.is_file():
                    raise TaskError(f"{paths.display(spec_path)}: data.files.{s}: {paths.display(x)} not found: "
                                    f"fix the path (relative to the spec file) or give --data PATH")
        if split in files:
            return files, paths.display(spec_path.parent)
    user = eval_data_dir()
    for folder in ([user / name] + ([user / spec["name"]] if subset else [])):
        files = from_folder(folder)
        if split in files:
            return files, paths.display(folder)
        looked.append(paths.display(folder) + "/")
    repo = spec["data"].get("hf")
    if repo:
        for snap in _hub_snapshots(repo):
            files = from_folder(snap)
            if split in files:
                return files, f"the Hugging Face cache ({repo}, {snap.name[:12]})"
        looked.append(f"the Hugging Face cache ({paths.display(hub_cache_dir())}/datasets--{repo.replace('/', '--')})")
    how = (f"download it once with `hf download {repo} --repo-type dataset`, " if repo else "")
    raise TaskError(f"{name}: no data for the {split!r} split: looked for {_patterns(split, subs)} in "
                    f"{' and '.join(looked)}; {how}put the files in {paths.display(user / name)}/, or give --data PATH")


def _from_subset_folders(folder: Path, spec: dict, name: str, wanted: list[str]) -> dict[str, list[Path]]:
    """A task with subsets from one folder per subset (lm-eval loads cais/mmlu subject by
    subject, so its cache holds `abstract_algebra/`, `anatomy/`, ... and no `all/`): all of
    them, or a TaskError saying which are missing."""
    names = spec["subsets"]["names"]
    got = {s: [_split_files(folder, s, [n]) for n in names] for s in wanted}
    have = [n for n, files in zip(names, got[wanted[0]]) if files]
    if not have:
        return {s: [] for s in wanted}
    if len(have) < len(names):
        missing = [n for n in names if n not in have]
        raise TaskError(f"{name}: {paths.display(folder)} has {len(have)} of the {len(names)} subsets "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} missing): add them, "
                        f"or ask for one at a time ({name}_{have[0]})")
    return {s: [f for files in per_subset for f in files] for s, per_subset in got.items()}


def _patterns(split: str, subs: list[str]) -> str:
    s = SPLIT_NAMES[split][0]
    inside = ", ".join(f"{x}/" for x in subs if x)
    return f"{s}.jsonl|json|csv|parquet, {s}-*.parquet, *_{s}.csv, {s}/*.parquet (also under {inside})"


# ---------------------------------------------------------------------------------------------
# Reading rows: JSONL, JSON, CSV, Parquet


def _read_rows(path: Path, csv_columns: list[str] | None) -> list[_Row]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path, csv_columns)
        if suffix == ".parquet":
            return _read_parquet(path)
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read {paths.display(path)}: {_one_line(e)}") from None
    raise TaskError(f"{paths.display(path)}: not a data file ({', '.join(DATA_SUFFIXES)})")


def _row(doc: Any, where: _Where) -> _Row:
    if not isinstance(doc, dict):
        raise TaskError(f"{where}: a row is an object of columns, not a {type(doc).__name__}")
    return _Row(doc, where)


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{paths.display(path)} line {n}: not JSON ({e.msg} at column {e.colno}): "
                                f"fix the line or remove it") from None
            rows.append(_row(doc, _Where(path, n)))
    return rows


def _read_json(path: Path) -> list[_Row]:
    """A list of rows, or an object holding one ({"data": [...]}); JSON Lines under a .json name
    (what `datasets`' to_json writes) are read as such."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _read_jsonl(path)
        raise TaskError(f"{paths.display(path)} line {e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise TaskError(f"{paths.display(path)}: a JSON data file is a list of rows (or an object holding "
                        f"one), or one row a line (JSON Lines)")
    return [_row(doc, _Where(path, n, "row")) for n, doc in enumerate(data, 1)]


def _read_csv(path: Path, csv_columns: list[str] | None) -> list[_Row]:
    """A header line names the columns; a file without one (MMLU's) gets the spec's csv_columns
    (a first line equal to those is taken as the header)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        start = 1
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record:
                continue
            if header is None:
                if csv_columns and record != list(csv_columns):
                    header = list(csv_columns)
                else:
                    header = record
                    continue
            if len(record) != len(header):
                said = "the header" if header != csv_columns else "the task's csv_columns"
                raise TaskError(f"{paths.display(path)} line {line}: {len(record)} fields, {said} names "
                                f"{len(header)} ({', '.join(header)}): fix the line (quote commas)")
            rows.append(_Row(dict(zip(header, record)), _Where(path, line)))
    return rows


def _read_parquet(path: Path) -> list[_Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskError(f"{paths.display(path)} is Parquet, which needs pyarrow: pip install 'llmdesk[eval]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not a Parquet file, truncated, ...
        raise TaskError(f"cannot read {paths.display(path)} as Parquet: {_one_line(e)}") from None
    return [_Row(doc, _Where(path, n, "row")) for n, doc in enumerate(table.to_pylist(), 1)]


# file -> ((size, mtime_ns), sha256): a big file is hashed once per process
_HASHES: dict[Path, tuple[tuple[int, int], str]] = {}


def _file_sha256(path: Path) -> str:
    from ..store.catalog import sha256_file

    real = path.resolve()  # the hub cache's snapshot files are links to blobs
    st = real.stat()
    key = (st.st_size, st.st_mtime_ns)
    cached = _HASHES.get(real)
    if cached is None or cached[0] != key:
        cached = _HASHES[real] = (key, sha256_file(real, progress=False))
    return cached[1]
