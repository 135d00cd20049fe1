"""Prompt templates: a prompt written once, as a file, and used from the CLI, Python and the server.

A template is a small YAML file in `$LLMDESK_HOME/prompts/NAME.yaml` (plain files: copy them,
share them, keep them in git) with the parts a good prompt has:

    description: Summarise a text for a busy reader
    model: demo                      # optional: the model it is meant for
    system: You answer briefly.      # optional
    persona: an experienced editor   # "You are ..." (goes into the system message)
    task: Summarise the text in {{ sentences }} sentences.
    context: "{{ text }}"
    exemplars:                       # few-shot pairs, given as earlier turns
      - input: The meeting moved to Tuesday because the room was booked.
        output: The meeting is now on Tuesday.
    format: Plain sentences, no list.
    tone: neutral
    variables:
      sentences: {default: 2, description: how many sentences}
      text: {description: the text to summarise}     # no default: must be given
    sampling: {temperature: 0.2, max_tokens: 200}
    schema: {...}                    # optional JSON schema: the answer is JSON of that shape

Text fields are Jinja templates over the variables (`{{ name }}`), rendered in a sandbox with
undefined names as errors. `input` is always a variable: the text a user gives `run` (when the
template does not use it, that text comes after the task).

Two strategies run a template more than once: `vote` (self-consistency: N samples with seeds
seed, seed+1, ..., the majority answer and its agreement rate) and `perspectives` (an answer from
each named perspective, then one synthesis of them)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..atomic import write_text
from ..errors import LlmdeskError
from ..runtime.conversation import respond_many
from ..store import paths

SUFFIX = ".yaml"
TEXT_FIELDS = ("system", "persona", "task", "context", "format", "tone")
KNOWN_KEYS = {"name", "description", "model", *TEXT_FIELDS, "exemplars", "variables", "sampling", "schema"}
SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "seed", "stop",
                 "frequency_penalty", "presence_penalty"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_BYTES = 1_000_000  # a template is a small file; anything larger is a mistake

SKELETON = """\
# llmdesk prompt template: fill in what your prompt needs, delete the rest.
# Text fields are templates: {{{{ variable }}}} is replaced by a variable's value.
description: {description}
# model: demo
# system: You answer briefly and exactly.
persona: a careful assistant
task: |
  {{{{ input }}}}
# context: |
#   {{{{ text }}}}
# exemplars:
#   - input: an example request
#     output: the answer you want for it
format: plain text
# tone: friendly
variables:
  input: {{description: what the user asks}}
# sampling: {{temperature: 0.7, max_tokens: 512}}
# schema: {{type: object, properties: {{answer: {{type: string}}}}, required: [answer]}}
"""


def prompts_dir() -> Path:
    return paths.home() / "prompts"


def _sandbox():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass
class Variable:
    name: str
    default: Any = None
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass
class Finding:
    level: str  # "error" (the template cannot be used as it is) or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


@dataclass
class PromptTemplate:
    name: str
    where: str  # the file, for messages
    description: str = ""
    model: str | None = None
    system: str = ""
    persona: str = ""
    task: str = ""
    context: str = ""
    format: str = ""
    tone: str = ""
    exemplars: list[tuple[str, str]] = field(default_factory=list)
    variables: dict[str, Variable] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    schema: dict | None = None
    source: str = ""  # the file's text

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, name: str, where: str) -> "PromptTemplate":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise LlmdeskError(f"{where}: not valid YAML{at}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LlmdeskError(f"{where}: a prompt template is a YAML mapping (task:, format:, ...), "
                               f"not a {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - KNOWN_KEYS)
        if unknown:
            raise LlmdeskError(f"{where}: unknown key {unknown[0]!r} (a template has: {', '.join(sorted(KNOWN_KEYS))})")
        t = cls(name=name, where=where, source=text)
        t.description = _text(data, "description", where)
        t.model = _text(data, "model", where) or None
        for k in TEXT_FIELDS:
            setattr(t, k, _text(data, k, where))
        t.exemplars = _exemplars(data.get("exemplars"), where)
        t.variables = _variables(data.get("variables"), where)
        t.sampling = _sampling(data.get("sampling"), where)
        schema = data.get("schema")
        if schema is not None:
            from ..runtime.grammars import check_schema

            if not isinstance(schema, dict):
                raise LlmdeskError(f"{where}: schema must be a JSON schema object, not {type(schema).__name__}")
            import jsonschema

            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as e:
                loc = "/".join(str(x) for x in e.path) or "the top"
                raise LlmdeskError(f"{where}: schema is not a valid JSON Schema (at {loc}): {e.message}") from None
            check_schema(schema, f"{where}: schema")
            t.schema = schema
        env = _sandbox()
        for fld, src in t._template_texts():
            try:
                env.parse(src)
            except Exception as e:  # jinja2.TemplateSyntaxError
                raise LlmdeskError(f"{where}: {fld}: template error: {getattr(e, 'message', e)}") from None
        return t

    def _template_texts(self) -> list[tuple[str, str]]:
        out = [(k, getattr(self, k)) for k in TEXT_FIELDS if getattr(self, k)]
        for i, (a, b) in enumerate(self.exemplars, 1):
            out += [(f"exemplars[{i}].input", a), (f"exemplars[{i}].output", b)]
        return out

    def used_variables(self) -> set[str]:
        from jinja2 import meta

        env = _sandbox()
        used: set[str] = set()
        for _fld, src in self._template_texts():
            used |= meta.find_undeclared_variables(env.parse(src))
        return used

    # -- using ----------------------------------------------------------------------------------
    def values(self, given: dict[str, Any] | None = None, *, input: str | None = None) -> dict[str, Any]:
        """The variables' values: `given` over the defaults; an unknown name or a missing value is
        one line naming it."""
        given = dict(given or {})
        declared = set(self.variables) | {"input"}
        for k in given:
            if k not in declared:
                names = ", ".join(sorted(self.variables)) or "none"
                raise LlmdeskError(f"prompt {self.name}: no variable {k!r} (its variables: {names})")
        vals = {k: v.default for k, v in self.variables.items() if v.default is not None}
        vals.update(given)
        if input is not None:
            vals["input"] = input
        for k in sorted(self.used_variables()):
            if k not in vals:
                if k == "input":
                    raise LlmdeskError(f"prompt {self.name}: needs an input (give the text after the command, "
                                       "or pipe it on stdin)")
                how = f"-v {k}=VALUE" + (f" ({self.variables[k].description})" if k in self.variables and
                                         self.variables[k].description else "")
                raise LlmdeskError(f"prompt {self.name}: variable {k!r} has no value; give it with {how}")
        return vals

    def render(self, given: dict[str, Any] | None = None, *, input: str | None = None) -> dict[str, str]:
        """Every text field with the variables filled in."""
        vals = self.values(given, input=input)
        env = _sandbox()
        out: dict[str, str] = {}
        for fld, src in self._template_texts():
            try:
                out[fld] = env.from_string(src).render(**vals).strip()
            except Exception as e:  # an undefined attribute, a sandbox refusal
                raise LlmdeskError(f"{self.where}: {fld}: {getattr(e, 'message', None) or e}") from None
        if input is not None and "input" not in self.used_variables():
            out["input"] = input.strip()
        return out

    def messages(self, given: dict[str, Any] | None = None, *, input: str | None = None) -> list[dict]:
        """The conversation the template stands for: a system message (system text and persona),
        the exemplars as earlier user/assistant turns, and the request (task, context, the user's
        input, format and tone) as the last user message."""
        r = self.render(given, input=input)
        system = "\n\n".join(x for x in (r.get("system", ""), f"You are {r['persona']}." if r.get("persona") else "")
                             if x)
        msgs = [{"role": "system", "content": system}] if system else []
        for i in range(1, len(self.exemplars) + 1):
            msgs += [{"role": "user", "content": r[f"exemplars[{i}].input"]},
                     {"role": "assistant", "content": r[f"exemplars[{i}].output"]}]
        parts = [r.get("task", "")]
        if r.get("context"):
            parts.append(f"Context:\n{r['context']}")
        if r.get("input"):
            parts.append(r["input"])
        if r.get("format"):
            parts.append(f"Answer format: {r['format']}")
        if r.get("tone"):
            parts.append(f"Tone: {r['tone']}")
        user = "\n\n".join(p for p in parts if p)
        if not user:
            raise LlmdeskError(f"prompt {self.name}: renders to an empty request (give it a task)")
        return msgs + [{"role": "user", "content": user}]

    def response_format(self) -> dict | None:
        if self.schema is None:
            return None
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema}}

    def options(self, **overrides) -> dict[str, Any]:
        """Sampling settings: the template's, with the caller's (not None) over them."""
        return {**self.sampling, **{k: v for k, v in overrides.items() if v is not None}}

    def run(self, model, variables: dict[str, Any] | None = None, *, input: str | None = None,
            samples: int | None = None, vote_by: str = "text", perspectives: list[str] | None = None,
            on_text=None, **sampling):
        """Answer the template on `model` (a loaded local or remote model): a `Reply` (streamed to
        `on_text`), or with `samples` a `VoteResult`, or with `perspectives` a
        `PerspectivesResult`. `sampling` overrides the template's settings."""
        messages = self.messages(variables, input=input)
        opts = self.options(**sampling)
        opts.setdefault("max_tokens", 512)
        if samples and perspectives:
            raise LlmdeskError("choose --samples (vote) or --perspectives, not both")
        if samples:
            if opts.get("temperature") == 0:
                raise LlmdeskError("a vote needs different samples: use a temperature above 0")
            by = "json" if self.schema is not None and vote_by == "text" else vote_by
            return vote(model, messages, samples=samples, by=by, seed=opts.pop("seed", None) or 0,
                        response_format=self.response_format(), **opts)
        if perspectives:
            return perspectives_answer(model, messages, perspectives, response_format=self.response_format(), **opts)
        return model.respond(messages, response_format=self.response_format(), on_text=on_text, **opts)

    def parse_answer(self, text: str) -> Any:
        """The answer as a value: the JSON object for a template with a schema (checked against
        it), else the text."""
        if self.schema is None:
            return text
        problem = _schema_problem(text, self.schema)
        if problem:
            raise LlmdeskError(f"prompt {self.name}: the answer does not match the schema: {problem}")
        return json.loads(text)


def _text(data: dict, key: str, where: str) -> str:
    v = data.get(key)
    if v is None:
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise LlmdeskError(f"{where}: {key} must be text, not {type(v).__name__}")
    return v


def _exemplars(v, where: str) -> list[tuple[str, str]]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise LlmdeskError(f"{where}: exemplars must be a list of {{input: ..., output: ...}}")
    out = []
    for i, e in enumerate(v, 1):
        if not isinstance(e, dict) or not isinstance(e.get("input"), (str, int, float)) \
                or not isinstance(e.get("output"), (str, int, float)) or set(e) - {"input", "output"}:
            raise LlmdeskError(f"{where}: exemplars[{i}] must have exactly an input and an output (text)")
        out.append((str(e["input"]), str(e["output"])))
    return out


def _variables(v, where: str) -> dict[str, Variable]:
    if v is None:
        return {}
    if isinstance(v, list):  # a plain list of names: all required
        v = {name: None for name in v}
    if not isinstance(v, dict):
        raise LlmdeskError(f"{where}: variables must be a mapping of name to {{default: ..., description: ...}}")
    out = {}
    for name, spec in v.items():
        name = str(name)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LlmdeskError(f"{where}: variable {name!r}: a name is letters, digits and _")
        if spec is None:
            out[name] = Variable(name)
        elif isinstance(spec, dict):
            extra = set(spec) - {"default", "description"}
            if extra:
                raise LlmdeskError(f"{where}: variable {name!r}: unknown key {sorted(extra)[0]!r} "
                                   "(a variable has default and description)")
            out[name] = Variable(name, spec.get("default"), str(spec.get("description") or ""))
        else:  # `name: value` is a default
            out[name] = Variable(name, spec)
    return out


def _sampling(v, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise LlmdeskError(f"{where}: sampling must be a mapping (temperature: 0.2, max_tokens: 200, ...)")
    unknown = sorted(set(v) - SAMPLING_KEYS)
    if unknown:
        raise LlmdeskError(f"{where}: sampling: unknown setting {unknown[0]!r} (known: {', '.join(sorted(SAMPLING_KEYS))})")
    from ..runtime.engine import sampling_params

    rest = {k: x for k, x in v.items() if k not in ("max_tokens", "stop")}
    try:
        sampling_params(**rest)  # the bounds every request is held to
    except (LlmdeskError, TypeError, ValueError) as e:
        raise LlmdeskError(f"{where}: sampling: {e}") from None
    mt = v.get("max_tokens")
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise LlmdeskError(f"{where}: sampling: max_tokens must be a positive whole number")
    return dict(v)


# -- the prompts folder ----------------------------------------------------------------------------

def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LlmdeskError(f"{name!r} is not a prompt name: use letters, digits, '.', '_' and '-' (at most 64)")
    return name


def prompt_path(name: str) -> Path:
    return prompts_dir() / f"{_check_name(name)}{SUFFIX}"


def load_prompt(ref: str | os.PathLike) -> PromptTemplate:
    """A template by name (from the prompts folder) or by path to a .yaml file."""
    s = str(ref)
    p = Path(s).expanduser()
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        if not p.is_file():
            raise LlmdeskError(f"{p}: no such prompt file")
        name = p.stem
    else:
        p = prompt_path(s)
        name = s
        if not p.is_file():
            have = ", ".join(t for t in list_names()) or "none yet"
            raise LlmdeskError(f"no prompt named {s!r} in {paths.display(prompts_dir())} (have: {have}); "
                               f"create it with 'llmdesk prompt new {s}'")
    if p.stat().st_size > MAX_BYTES:
        raise LlmdeskError(f"{p}: {p.stat().st_size} bytes is too large for a prompt template (at most {MAX_BYTES})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmdeskError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise LlmdeskError(f"cannot read {p}: {e.strerror}") from None
    return PromptTemplate.parse(text, name=name, where=str(p))


def list_names() -> list[str]:
    d = prompts_dir()
    return sorted(p.stem for p in d.glob(f"*{SUFFIX}") if NAME_RE.match(p.stem)) if d.is_dir() else []


def list_prompts() -> list[PromptTemplate | LlmdeskError]:
    """Every template in the prompts folder; one that cannot be read is its error, not a crash."""
    out: list[PromptTemplate | LlmdeskError] = []
    for n in list_names():
        try:
            out.append(load_prompt(n))
        except LlmdeskError as e:
            e.prompt_name = n  # type: ignore[attr-defined]
            out.append(e)
    return out


def save_prompt(name: str, text: str, *, force: bool = False) -> Path:
    """Write a template's text (checked first) to the prompts folder, atomically."""
    p = prompt_path(name)
    PromptTemplate.parse(text, name=name, where=str(p))
    if p.exists() and not force:
        raise LlmdeskError(f"prompt {name!r} exists ({paths.display(p)}); edit it with 'llmdesk prompt edit {name}' "
                           "or pass --force to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_text(p, text)


def new_prompt(name: str, *, description: str = "", force: bool = False) -> Path:
    return save_prompt(name, SKELETON.format(description=description or name), force=force)


def remove_prompt(name: str) -> Path:
    p = prompt_path(name)
    if not p.is_file():
        raise LlmdeskError(f"no prompt named {name!r} in {paths.display(prompts_dir())}")
    p.unlink()
    return p


# -- lint ------------------------------------------------------------------------------------------

_FORMAT_RULES: list[tuple[re.Pattern, str, Callable[[str], bool]]] = [
    (re.compile(r"\bjson\b", re.I), "is not JSON", lambda s: _is_json(s)),
    (re.compile(r"\b(bullet(ed)?|bullet points?)\b", re.I), "is not a bulleted list",
     lambda s: all(re.match(r"\s*([-*\u2022]|\d+[.)])\s", ln) for ln in s.splitlines() if ln.strip())),
    (re.compile(r"\b(one|a single) word\b", re.I), "is not one word", lambda s: len(s.split()) == 1),
    (re.compile(r"\b(only|just) (a|the) number\b|\bnumber only\b", re.I), "is not a number",
     lambda s: re.fullmatch(r"\s*-?\d[\d,]*(\.\d+)?\s*", s) is not None),
]


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def lint(t: PromptTemplate) -> list[Finding]:
    """What the template lacks or gets wrong, most serious first."""
    found: list[Finding] = []
    if not t.task.strip():
        found.append(Finding("error", "no task: say what the model is to do (task: ...)"))
    if not t.format.strip() and t.schema is None:
        found.append(Finding("warning", "no format: say what the answer should look like (format: ...) or give a schema"))
    used = t.used_variables()
    for k in sorted(used - set(t.variables) - {"input"}):
        found.append(Finding("error", f"variable {k!r} is used but not declared under variables: "
                                      "every run must then pass it, and nothing says what it is"))
    for k in sorted(set(t.variables) - used):
        found.append(Finding("warning", f"variable {k!r} is declared but never used"))
    for i, (_inp, outp) in enumerate(t.exemplars, 1):
        if t.schema is not None:
            problem = _schema_problem(outp, t.schema)
            if problem:
                found.append(Finding("error", f"exemplars[{i}].output does not match the schema: {problem}"))
            continue
        for pattern, what, ok in _FORMAT_RULES:
            if pattern.search(t.format) and "{{" not in outp and not ok(outp.strip()):
                found.append(Finding("error", f"exemplars[{i}].output {what}, but the format asks for it "
                                              f"({t.format.strip()!r})"))
    if not t.exemplars and t.task.strip():
        found.append(Finding("warning", "no exemplars: one or two input/output pairs show the model the format"))
    return sorted(found, key=lambda f: f.level != "error")


def _schema_problem(text: str, schema: dict) -> str | None:
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return e.message
    return None


# -- running ---------------------------------------------------------------------------------------

@dataclass
class VoteResult:
    answer: str  # the most common answer, as the first sample that gave it wrote it
    key: str  # what was compared
    agreement: float  # share of the samples that gave it
    counts: dict[str, int]
    samples: list[str]


def answer_key(text: str, by: str = "text") -> str:
    """What two answers must share to count as the same: the normalised text (case, spaces,
    final punctuation), the last number in it, or the JSON value."""
    if by == "number":
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        return nums[-1].replace(",", "").rstrip(".") if nums else ""
    if by == "json":
        try:
            return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        except ValueError:
            return ""
    if by != "text":
        raise LlmdeskError(f"vote by {by!r}: use text, number or json")
    return re.sub(r"\s+", " ", text).strip().rstrip(".!").casefold()


def vote(model, messages: list[dict], *, samples: int = 5, by: str = "text", seed: int = 0,
         response_format: dict | None = None, **kw) -> VoteResult:
    """Self-consistency: `samples` answers to one conversation (seeds seed, seed+1, ...; all in
    flight at once on a local model, so the Engine batches them), the majority answer and the
    share of samples that agree with it. An empty key (no number, bad JSON) never wins."""
    if samples < 1 or samples > 64:
        raise LlmdeskError(f"--samples {samples}: give 1 to 64")
    texts = respond_many(model, [messages] * samples, seeds=[seed + i for i in range(samples)],
                  response_format=response_format, **kw)
    keys = [answer_key(t, by) for t in texts]
    counts = Counter(k for k in keys if k)
    if not counts:
        return VoteResult(answer="", key="", agreement=0.0, counts={}, samples=texts)
    best, n = max(counts.items(), key=lambda kv: (kv[1], -keys.index(kv[0])))  # ties: the earliest
    return VoteResult(answer=texts[keys.index(best)], key=best, agreement=n / samples, counts=dict(counts),
                      samples=texts)


@dataclass
class PerspectivesResult:
    answers: dict[str, str]
    synthesis: str


def perspectives_answer(model, messages: list[dict], names: list[str], **kw) -> PerspectivesResult:
    """An answer from each named perspective (a line added to the system message), then one
    answer that weighs them (the question and the answers, quoted, as a new request)."""
    names = [n.strip() for n in names if n.strip()]
    if len(names) < 2:
        raise LlmdeskError("--perspectives needs at least two names, separated by commas")
    convs = []
    for n in names:
        line = f"Answer from the perspective of {n}."
        if messages and messages[0]["role"] == "system":
            convs.append([{"role": "system", "content": f"{messages[0]['content']}\n\n{line}"}] + messages[1:])
        else:
            convs.append([{"role": "system", "content": line}] + messages)
    answers = dict(zip(names, respond_many(model, convs, **kw)))
    question = messages[-1]["content"]
    quoted = "\n\n".join(f"Perspective: {n}\n\"\"\"\n{a.strip()}\n\"\"\"" for n, a in answers.items())
    synth = list(messages[:-1]) + [{"role": "user", "content":
                                    f"{question}\n\nHere are answers from several perspectives:\n\n{quoted}\n\n"
                                    "Write one answer that weighs them: keep what they agree on, and say where "
                                    "they differ and why."}]
    return PerspectivesResult(answers=answers, synthesis=respond_many(model, [synth], **kw)[0])
