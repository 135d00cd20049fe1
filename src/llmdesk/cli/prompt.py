"""`llmdesk prompt`: reusable prompt templates (new, list, show, edit, rm, lint, run)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out

prompt_app = typer.Typer(help="Prompt templates: files with a task, context, exemplars, format and variables, "
                              "used by run, chat, the Python API and the server.", no_args_is_help=True)
app.add_typer(prompt_app, name="prompt")

VarOpt = Annotated[Optional[list[str]], typer.Option("-v", "--var", help="A variable's value: NAME=VALUE (repeatable; NAME=@FILE reads a file).")]


def parse_vars(items: list[str] | None) -> dict[str, str]:
    """-v NAME=VALUE pairs; NAME=@FILE takes the file's text."""
    from pathlib import Path

    vals: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise LlmdeskError(f"-v {item!r}: give NAME=VALUE")
        if value.startswith("@") and len(value) > 1:
            p = Path(value[1:]).expanduser()
            try:
                value = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise LlmdeskError(f"-v {name}=@{p}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        vals[name.strip()] = value
    return vals


@prompt_app.command("new")
def new(name: str, description: Annotated[str, typer.Option("--description", "-d", help="One line saying what it is for.")] = "",
        force: Annotated[bool, typer.Option("--force", help="Replace a template of that name.")] = False) -> None:
    """Create a template from a commented skeleton (then 'llmdesk prompt edit NAME')."""
    from ..store.paths import display
    from ..tools.prompts import new_prompt

    p = new_prompt(name, description=description, force=force)
    out.print(f"created {display(p)}; edit it with 'llmdesk prompt edit {name}'", markup=False)


@prompt_app.command("list")
def list_(json_: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False) -> None:
    """The templates in $LLMDESK_HOME/prompts."""
    from rich.table import Table

    from ..tools.prompts import list_prompts, prompts_dir

    rows = []
    for t in list_prompts():
        if isinstance(t, LlmdeskError):
            rows.append({"name": t.prompt_name, "description": f"(unreadable: {t})", "variables": [], "model": None})
        else:
            rows.append({"name": t.name, "description": t.description, "model": t.model,
                         "variables": sorted(set(t.variables) | (t.used_variables() & {"input"}))})
    if json_:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        out.print(f"no prompt templates yet in {prompts_dir()}; create one with 'llmdesk prompt new NAME'", markup=False)
        return
    table = Table(box=None)
    for c in ("NAME", "DESCRIPTION", "VARIABLES", "MODEL"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["name"], r["description"], ", ".join(r["variables"]), r["model"] or "")
    out.print(table)


@prompt_app.command("show")
def show(name: Annotated[str, typer.Argument(help="A template name or a .yaml file.")],
         render: Annotated[bool, typer.Option("--render", help="Show the messages it makes, with the variables filled in.")] = False,
         var: VarOpt = None,
         input_: Annotated[Optional[str], typer.Option("--input", help="With --render: the input text.")] = None) -> None:
    """Print a template (or, with --render, the conversation it makes)."""
    from ..tools.prompts import load_prompt

    t = load_prompt(name)
    if not render:
        out.print(t.source.rstrip("\n"), markup=False)
        return
    for m in t.messages(parse_vars(var), input=input_):
        out.print(f"--- {m['role']}", markup=False, style="bold")
        out.print(m["content"], markup=False)
    if t.schema is not None:
        out.print("--- answer schema", markup=False, style="bold")
        out.print(json.dumps(t.schema, indent=2), markup=False)


@prompt_app.command("edit")
def edit(name: str) -> None:
    """Open a template in $VISUAL / $EDITOR; it is checked when the editor closes."""
    from ..tools.prompts import PromptTemplate, lint, new_prompt, prompt_path

    p = prompt_path(name)
    if not p.exists():
        new_prompt(name)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        rc = subprocess.call([*shlex.split(editor), str(p)])
    except OSError as e:
        raise LlmdeskError(f"cannot start the editor {editor!r} ({e.strerror}); set EDITOR") from None
    if rc != 0:
        raise LlmdeskError(f"the editor {editor!r} exited with {rc}; {p} is as the editor left it")
    t = PromptTemplate.parse(p.read_text(encoding="utf-8"), name=name, where=str(p))  # one line if it broke
    for f in lint(t):
        err.print(str(f), markup=False)
    out.print(f"saved {p}", markup=False)


@prompt_app.command("rm")
def rm(name: str) -> None:
    """Delete a template."""
    from ..tools.prompts import remove_prompt

    p = remove_prompt(name)
    out.print(f"removed {p}", markup=False)


@prompt_app.command("lint")
def lint_cmd(names: Annotated[Optional[list[str]], typer.Argument(help="Template names or .yaml files (default: all).")] = None) -> None:
    """Say what a template lacks: no task, no format, exemplars that contradict the format,
    variables never used or never declared. Exits 1 when there are errors."""
    from ..tools.prompts import lint, list_names, load_prompt

    names = names or list_names()
    errors = 0
    for n in names:
        try:
            findings = lint(load_prompt(n))
        except LlmdeskError as e:
            findings, errors = [], errors + 1
            out.print(f"{n}: error: {e}", markup=False)
        for f in findings:
            errors += f.level == "error"
            out.print(f"{n}: {f}", markup=False)
        if not findings:
            out.print(f"{n}: ok", markup=False)
    if errors:
        raise typer.Exit(1)


def run_template(name: str, text: str, *, model: str | None, var: list[str] | None, samples: int | None,
                 vote_by: str, perspectives: str | None, json_: bool, no_log: bool, load_model, **sampling) -> None:
    """`prompt run` and `run -p`: answer a template, streamed (or voted, or from perspectives)."""
    from ..tools.prompts import PerspectivesResult, VoteResult, load_prompt

    t = load_prompt(name)
    variables = parse_vars(var)
    t.messages(variables, input=text or None)  # a missing variable: one line before the model loads
    m = load_model(model or t.model)
    show = None if (json_ or samples or perspectives) else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    try:
        if samples or perspectives:
            with err.status(f"{samples or len(perspectives.split(','))} answers ...", spinner="dots"):
                r = t.run(m, variables, input=text or None, samples=samples, vote_by=vote_by,
                          perspectives=perspectives.split(",") if perspectives else None, **sampling)
        else:
            r = t.run(m, variables, input=text or None, on_text=show, **sampling)
    finally:
        m.close()
    if isinstance(r, VoteResult):
        if json_:
            out.print_json(json.dumps(dataclasses.asdict(r)))
        else:
            out.print(r.answer.strip(), markup=False)
            err.print(f"agreement {r.agreement:.0%} ({r.counts.get(r.key, 0)} of {len(r.samples)} samples; "
                      f"{len(r.counts)} distinct answers)", markup=False)
        return
    if isinstance(r, PerspectivesResult):
        if json_:
            out.print_json(json.dumps(dataclasses.asdict(r)))
        else:
            for n, a in r.answers.items():
                out.print(f"--- {n}", markup=False, style="bold")
                out.print(a.strip(), markup=False)
            out.print("--- synthesis", markup=False, style="bold")
            out.print(r.synthesis.strip(), markup=False)
        return
    if show:
        sys.stdout.write("\n")
    if t.schema is not None:
        t.parse_answer(r.text)  # the grammar held it to the schema; a cut-off answer is one line here
    if not no_log:
        from ..store.logs import log_turn

        log_turn(model=m.name, prompt=t.messages(variables, input=text or None)[-1]["content"], response=r.text,
                 system=None, options={"prompt": t.name, **{k: v for k, v in sampling.items() if v is not None}},
                 tokens_in=r.prompt_tokens, tokens_out=r.completion_tokens, duration_s=r.total_s)
    if json_:
        answer = {k: v for k, v in dataclasses.asdict(r).items() if k not in ("tool_calls", "logprobs")}
        if t.schema is not None:
            answer["value"] = t.parse_answer(r.text)
        out.print_json(json.dumps({"model": m.name, "prompt": t.name, **answer}))


@prompt_app.command("run")
def run_cmd(
    name: Annotated[str, typer.Argument(help="A template name or a .yaml file.")],
    text: Annotated[Optional[list[str]], typer.Argument(help="The input (the template's {{ input }}; read from stdin when piped).")] = None,
    model: Annotated[Optional[str], typer.Option("-m", "--model", help="The model (default: the template's, else $LLMDESK_MODEL, else the demo model).")] = None,
    var: VarOpt = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Self-consistency: N samples, the majority answer and its agreement rate.")] = None,
    vote: Annotated[bool, typer.Option("--vote", help="With --samples: vote (the default when --samples is given).")] = True,
    vote_by: Annotated[str, typer.Option("--vote-by", help="What makes two answers the same: text (normalised), number (the last one), json.")] = "text",
    perspectives: Annotated[Optional[str], typer.Option("--perspectives", help="Answers from these perspectives (comma-separated), then a synthesis.")] = None,
    temperature: Annotated[Optional[float], typer.Option("-t", "--temperature", help="Over the template's setting.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("-n", "--max-tokens", help="Over the template's setting.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object (with 'value' for a template with a schema).")] = False,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not record it in 'llmdesk logs'.")] = False,
) -> None:
    """Answer a prompt template: llmdesk prompt run NAME -v key=value [INPUT]."""
    from .run import _load, _piped_input

    if samples is not None and not vote:
        raise LlmdeskError("--samples without --vote has nothing to do")
    words = " ".join(text or [])
    piped = _piped_input(wait=not words)
    words = f"{words}\n\n{piped}" if words and piped.strip() else (words or piped)
    run_template(name, words, model=model, var=var, samples=samples, vote_by=vote_by, perspectives=perspectives,
                 json_=json_, no_log=no_log, load_model=lambda ref: _load(ref, None, None, None, None),
                 temperature=temperature, max_tokens=max_tokens, seed=seed)
