"""`llmdesk run` (one prompt, streamed) and `llmdesk chat` (a conversation in the terminal)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import atomic
from ..errors import LlmdeskError
from .app import app, err, out

# -- options shared by run and chat -----------------------------------------------------------
ModelOpt = Annotated[Optional[str], typer.Option("-m", "--model", help="A .gguf path, NAME[:TAG] from 'llmdesk list', hf:OWNER/REPO/FILE.gguf, or a model behind an OpenAI-compatible API: openai:URL#MODEL, openai:NAME (from endpoints.toml); BASE+ADAPTER[:SCALE] applies a LoRA adapter (a LoRA GGUF, a 'tune -o' or PEFT folder, or one imported into the store; '+' again for more). Default: $LLMDESK_MODEL.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
MaxTokensOpt = Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens to generate (-1: until the context is full).")]
TempOpt = Annotated[float, typer.Option("-t", "--temperature", help="0 is greedy (always the most likely token).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the K most likely tokens (0: off).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Keep the smallest set of tokens whose probability adds up to P.")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than P times the most likely one.")]
RepeatOpt = Annotated[float, typer.Option("--repeat-penalty", help="Penalise tokens seen in the last 64 (1.0: off).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed: the same seed gives the same output.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text is generated (repeatable).")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="Context length in tokens (default: the model's, at most 4096).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")]
GpuLayersOpt = Annotated[Optional[str], typer.Option(
    "-ngl", "--gpu-layers", help="Layers to offload to a GPU: a number or 'all' (needs a GPU build of llama.cpp; default 0, the CPU).")]
TemplateOpt = Annotated[Optional[str], typer.Option("--template", help="Chat template: a built-in name (chatml, llama-3, ...) or a .jinja file.")]
NoLogOpt = Annotated[bool, typer.Option("--no-log", help="Do not record this conversation in 'llmdesk logs'.")]
PromptOpt = Annotated[Optional[str], typer.Option("-p", "--prompt", help="A prompt template ('llmdesk prompt list') or a .yaml file: its system prompt, exemplars, task, format and settings.")]
VarOpt = Annotated[Optional[list[str]], typer.Option("-v", "--var", help="A prompt template's variable: NAME=VALUE (repeatable; NAME=@FILE reads a file).")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="Apply a LoRA adapter: ADAPTER.gguf[:SCALE], a llama.cpp LoRA GGUF made for this model ('llmdesk convert --lora'); repeatable, scale 1 by default, after those of -m BASE+ADAPTER.")]


def default_model_ref(model: str | None) -> str:
    """The model named with -m, else $LLMDESK_MODEL, else the demo model bundled with llmdesk."""
    ref = model or os.environ.get("LLMDESK_MODEL")
    if ref:
        return ref
    try:
        from ..demo import default_model_path
    except ImportError:
        default_model_path = lambda: None  # noqa: E731
    bundled = default_model_path()
    if bundled is None:
        raise LlmdeskError(
            "no model named: pass -m PATH.gguf (or a name from 'llmdesk list'), or set LLMDESK_MODEL"
        )
    return str(bundled)


def _load(model: str | None, ctx: int | None, threads: int | None, template: str | None, gpu_layers: str | None,
          lora: list[str] | None = None):
    from ..runtime.llama import parse_gpu_layers
    from ..runtime.model import load, lora_spec

    if threads is not None and threads < 1:
        raise LlmdeskError(f"--threads must be at least 1, got {threads}")
    adapters = [lora_spec(x) for x in lora or []]  # a bad --lora fails before the model loads
    ref = default_model_ref(model)
    with err.status(f"loading {ref} ...", spinner="dots"):
        return load(ref, ctx=ctx, threads=threads, template=template, gpu_layers=parse_gpu_layers(gpu_layers),
                    lora=adapters, say=lambda text: err.print(text, style="dim", markup=False))


def _explicit(context, kw: dict) -> dict:
    """The settings given on the command line (a template's own settings are not overridden by
    the command's defaults)."""
    if context is None:
        return kw
    # typer may carry its own copy of click: the source is compared by name
    return {k: v for k, v in kw.items()
            if getattr(context.get_parameter_source(k), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def _run_template(context, name: str, text: str, *, load, **kw) -> None:
    from .prompt import run_template

    piped = _piped_input(wait=not text)
    text = f"{text}\n\n{piped}" if text and piped.strip() else (text or piped)
    sampling = _explicit(context, {k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                          "seed", "max_tokens", "stop")})
    if sampling.get("max_tokens", 0) < 0:
        sampling["max_tokens"] = None
    run_template(name, text, load_model=load, **kw, **sampling)


def _log(no_log: bool, **kw) -> None:
    if no_log:
        return
    from ..store.logs import log_turn

    log_turn(**kw)


def _stats(c) -> str:
    """A Completion's or a Reply's numbers, one line."""
    cached = f", {c.cached_tokens} cached" if c.cached_tokens else ""
    return (f"{c.completion_tokens} tokens, {c.tokens_per_second:.1f} tokens/s · "
            f"prompt {c.prompt_tokens} tokens{cached}, first token after {c.ttft_s:.2f} s")


def _piped_input(wait: bool) -> str:
    """What is piped on stdin. With a prompt argument, only what is there already: an idle
    pipe that nobody writes to must not hang the command."""
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    if not wait:
        import select

        try:
            ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        except (OSError, ValueError):
            return ""
        if not ready:
            return ""
    return sys.stdin.read()


SchemaOpt = Annotated[Optional[Path], typer.Option("--schema", help="Answer with JSON matching this JSON schema file (enforced by a grammar).", dir_okay=False)]


def _response_format(json_mode: bool, schema: Path | None) -> dict | None:
    """OpenAI's response_format for --json / --schema FILE (the same grammar the server uses)."""
    if schema is not None:
        try:
            data = json.loads(schema.expanduser().read_text(encoding="utf-8"))
        except OSError as e:
            raise LlmdeskError(f"cannot read the schema {schema}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise LlmdeskError(f"{schema} is not JSON: {e.msg} at line {e.lineno}") from None
        from ..runtime.grammars import check_schema

        check_schema(data, str(schema))  # what is wrong, said of the file (and before a model loads)
        return {"type": "json_schema", "json_schema": {"name": schema.stem, "schema": data}}
    return {"type": "json_object"} if json_mode else None


@app.command()
def run(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="The prompt (read from stdin when piped).")] = None,
    model: ModelOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TempOpt = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    template: TemplateOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as it is, without the chat template.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, token counts, speed.")] = False,
    format_: Annotated[Optional[str], typer.Option("--format", help="'json': the answer is a JSON object (enforced by a grammar).")] = None,
    schema: SchemaOpt = None,
    lora: LoraOpt = None,
    no_log: NoLogOpt = False,
    prompt_template: PromptOpt = None,
    var: VarOpt = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="With -p: self-consistency, N samples and the majority answer with its agreement rate.")] = None,
    vote_by: Annotated[str, typer.Option("--vote-by", help="With --samples: text, number or json.")] = "text",
    perspectives: Annotated[Optional[str], typer.Option("--perspectives", help="With -p: answers from these perspectives (comma-separated), then a synthesis.")] = None,
    *,
    context: typer.Context,
) -> None:
    """Answer one prompt, streaming the answer to stdout."""
    if prompt_template is not None:
        return _run_template(context, prompt_template, " ".join(prompt or []), model=model, var=var, samples=samples,
                             vote_by=vote_by, perspectives=perspectives, json_=json_, no_log=no_log,
                             load=lambda ref: _load(ref, ctx, threads, template, gpu_layers, lora),
                             temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens, stop=stop)
    if var or samples or perspectives:
        raise LlmdeskError("-v, --samples and --perspectives go with a prompt template: -p NAME")
    if format_ not in (None, "json"):
        raise LlmdeskError(f"--format takes 'json', got {format_!r}; for a given shape use --schema FILE.json")
    text = " ".join(prompt or [])
    piped = _piped_input(wait=not text)
    text = f"{text}\n\n{piped}" if text and piped.strip() else (text or piped)
    if not text.strip():
        raise LlmdeskError("no prompt: give it as an argument or pipe it on stdin")
    if raw and system:
        raise LlmdeskError("--system needs the chat template; it cannot be used with --raw")
    fmt = _response_format(format_ == "json", schema)
    if raw and fmt:
        raise LlmdeskError("--schema and --format json need the chat template; they cannot be used with --raw")
    m = _load(model, ctx, threads, template, gpu_layers, lora)
    kw = dict(max_tokens=None if max_tokens < 0 else max_tokens, temperature=temperature, top_k=top_k,
              top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop)
    show = None if json_ else _write
    try:
        if raw:
            stream = m.start(text, **kw)
            for ev in stream:
                if ev.text and show:
                    show(ev.text)
            c = m.finish(stream)
            answer = c.to_dict()
        else:  # the conversation layer, as chat and the server answer
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            c = m.respond(messages, response_format=fmt, on_text=show, **kw)
            answer = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("tool_calls", "logprobs")}
        if show:
            sys.stdout.write("\n")
        _log(no_log, model=m.name, prompt=text, response=c.text, system=system,
             options={k: v for k, v in kw.items() if v is not None}, tokens_in=c.prompt_tokens,
             tokens_out=c.completion_tokens, duration_s=c.total_s)
        if json_:
            out.print_json(json.dumps({"model": m.name, **answer}))
    finally:
        m.close()


CHAT_HELP = """commands:
  /system TEXT        set the system prompt (and start over)
  /set NAME VALUE     temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens
  /show               the settings and the chat template in use
  /clear              forget the conversation (keeps the system prompt)
  /save FILE          write the conversation to FILE as JSON
  /bye                leave (Ctrl-D too)
  \"\"\"                 start and end a multi-line message"""

_SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
             "repeat_penalty": float, "seed": int, "max_tokens": int}


def _read_message(prompt: str) -> str | None:
    """One user message: a line, or several between triple quotes. None at end of input."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]
    if lines[0].rstrip().endswith('"""') and len(lines[0].rstrip()) >= 3:
        return lines[0].rstrip()[:-3]
    while True:
        try:
            nxt = input("... ")
        except EOFError:
            break
        if nxt.rstrip().endswith('"""'):
            lines.append(nxt.rstrip()[:-3])
            break
        lines.append(nxt)
    return "\n".join(lines).strip("\n")


def _save(path: str, data: dict) -> Path:
    p = Path(path).expanduser()
    try:
        atomic.write_text(p, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise LlmdeskError(f"cannot write {p}: {e.strerror}") from None
    return p


@app.command()
def chat(
    model: ModelOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TempOpt = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    template: TemplateOpt = None,
    json_mode: Annotated[bool, typer.Option("--json", help="Answer in JSON (any JSON object).")] = False,
    schema: SchemaOpt = None,
    tool: Annotated[Optional[list[Path]], typer.Option("--tool", help="A Python file whose public functions the model may call (repeatable); their schemas come from type hints and docstrings.", dir_okay=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Run the model's tool calls without asking first.")] = False,
    docs: Annotated[Optional[str], typer.Option("--docs", help="Answer from this collection of your documents ('llmdesk docs list'): each message retrieves passages, quoted to the model as data, and the answer cites them as [n].")] = None,
    mcp: Annotated[Optional[Path], typer.Option("--mcp", help="An MCP config (the mcpServers JSON of Claude Desktop or LM Studio): its servers are started or reached, and the model may call their tools.", dir_okay=False)] = None,
    tool_choice: Annotated[Optional[str], typer.Option("--tool-choice", help="auto (the model decides), required (it must call a tool each round, up to --max-steps), none, or a tool's name (it must call that one).")] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", min=1, help="Rounds of tool calls per message before the model must answer without tools.")] = 8,
    lora: LoraOpt = None,
    no_log: NoLogOpt = False,
    prompt_template: PromptOpt = None,
    var: VarOpt = None,
    *,
    context: typer.Context,
) -> None:
    """Chat with a model in the terminal. Type /? for commands.

    A conversation longer than the context keeps going: the oldest messages are left out (and
    the chat says so), the same way the server truncates when asked to."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover
        pass
    fmt = _response_format(json_mode, schema)
    tpl = variables = None
    opening: list[dict] = []  # a template's exemplars, the start of every conversation
    if prompt_template is not None:
        from ..tools.prompts import load_prompt
        from .prompt import parse_vars

        tpl, variables = load_prompt(prompt_template), parse_vars(var)
        head = tpl.messages(variables, input="...")  # a missing variable: one line now
        if head[0]["role"] == "system" and system is None:
            system = head[0]["content"]
        opening = [x for x in head[:-1] if x["role"] != "system"]
        fmt = fmt or tpl.response_format()
        given = _explicit(context, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                        repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens))
        chosen = {**tpl.sampling, **given}  # the template's settings, then what the command line gives
        temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens = (
            chosen.get(k, d) for k, d in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                          ("min_p", min_p), ("repeat_penalty", repeat_penalty), ("seed", seed),
                                          ("max_tokens", max_tokens)))
    elif var:
        raise LlmdeskError("-v goes with a prompt template: -p NAME")
    functions = _load_tools(tool or [])
    if docs is not None:
        _check_collection(docs)
    servers = _mcp_config(mcp)
    choice = _tool_choice(tool_choice)
    m = _load(model, ctx, threads, template, gpu_layers, lora)
    mcp_tools = _start_mcp(servers, m)
    tools_now = lambda: {**functions, **(mcp_tools.functions(taken=functions) if mcp_tools else {})}  # noqa: E731
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens)
    messages: list[dict] = list(opening)
    origin = getattr(getattr(m, "template", None), "origin", "the server's")
    adapters = "".join(f" · LoRA {p.name} x{scale:g}" for p, scale in getattr(m, "lora", []))
    err.print(f"{m.name} · context {m.n_ctx or '?'} tokens · template: {origin}{adapters}", style="dim", markup=False)
    if docs is not None:
        err.print(f"answering from the collection '{docs}': passages are quoted to the model as data", style="dim",
                  markup=False)
    if tools_now():
        unasked = [n for n, f in tools_now().items() if getattr(f, "always_allowed", False)]
        asked = (" (each call is shown and asked for" + (f", except to {', '.join(unasked)}: \"alwaysAllow\")"
                                                          if unasked else ")")) if not yes else (
            " (with --docs, a call proposed while passages are in the context is asked for, --yes or not)"
            if docs is not None else "")
        err.print(f"tools: {', '.join(tools_now())}{asked}", style="dim", markup=False)
    err.print("type /? for commands, /bye to leave", style="dim")
    state = {"dropped": 0}
    try:
        while True:
            line = _read_message(">>> ")
            if line is None:
                break
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("/") and not stripped.startswith("//"):
                cmd, _, arg = stripped.partition(" ")
                arg = arg.strip()
                if cmd in ("/bye", "/exit", "/quit"):
                    break
                elif cmd in ("/?", "/help"):
                    err.print(CHAT_HELP, markup=False)
                elif cmd == "/system":
                    system, messages = (arg or None), list(opening)
                    state["dropped"] = 0
                    err.print("system prompt set" if arg else "system prompt cleared", style="dim")
                elif cmd == "/clear":
                    messages = list(opening)
                    state["dropped"] = 0
                    err.print("conversation cleared", style="dim")
                elif cmd == "/set":
                    name, _, value = arg.partition(" ")
                    if name not in _SETTABLE or not value.strip():
                        err.print(f"usage: /set NAME VALUE, NAME one of {', '.join(_SETTABLE)}", markup=False)
                        continue
                    try:
                        settings[name] = _SETTABLE[name](value.strip())
                    except ValueError:
                        err.print(f"/set {name}: '{value.strip()}' is not a valid {_SETTABLE[name].__name__}", markup=False)
                        continue
                    err.print(f"{name} = {settings[name]}", style="dim")
                elif cmd == "/show":
                    err.print(json.dumps({**settings, "system": system, "template": origin,
                                          "context": m.n_ctx, "tools": list(tools_now()),
                                          "lora": [[str(p), scale] for p, scale in getattr(m, "lora", [])],
                                          "response_format": fmt}, indent=2), markup=False)
                elif cmd == "/save":
                    if not arg:
                        err.print("usage: /save FILE", markup=False)
                        continue
                    try:
                        p = _save(arg, {"model": m.name, "settings": settings,
                                        "messages": _with_system(system, messages)})
                    except LlmdeskError as e:
                        err.print(f"error: {e}", markup=False)
                        continue
                    err.print(f"saved to {p}", style="dim")
                else:
                    err.print(f"unknown command {cmd}; type /? for the list", markup=False)
                continue
            content = tpl.messages(variables, input=line)[-1]["content"] if tpl is not None else line
            turn = messages + [{"role": "user", "content": content}]
            got = _answer(m, _with_system(system, turn), settings, stop, fmt, tools_now(), yes, state, choice, docs,
                          max_steps)
            if got is None:  # interrupted, or the model could not answer
                continue
            reply, added = got
            messages = turn + added
            _log(no_log, model=m.name, prompt=line, response=reply.text, system=system,
                 options={k: v for k, v in settings.items() if v is not None},
                 tokens_in=reply.prompt_tokens, tokens_out=reply.completion_tokens, duration_s=reply.total_s)
    finally:
        if mcp_tools is not None:
            mcp_tools.close()
        m.close()


def _mcp_config(path: Path | None) -> list:
    """The servers of --mcp's config (a file that cannot be read or is not one stops here)."""
    if path is None:
        return []
    from ..tools.mcp_client import read_config

    return read_config(path)


def _start_mcp(servers: list, m):
    """The MCP servers started (a server that cannot start is one line, and the chat goes on)."""
    if not servers:
        return None
    from ..rag.guard import injection_flags
    from ..tools.mcp_client import MCPTools

    problem = lambda line: err.print(line, style="yellow", markup=False)  # noqa: E731
    try:
        with err.status(f"starting {len(servers)} MCP server{'s' if len(servers) > 1 else ''} ...", spinner="dots"):
            return MCPTools(servers, on_problem=problem, guard=injection_flags)
    except BaseException:
        m.close()
        raise


def _tool_choice(value: str | None):
    """--tool-choice as the conversation layer takes it."""
    if value is None or value in ("auto", "required", "none"):
        return value or "auto"
    return {"type": "function", "function": {"name": value}}


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def _load_tools(paths: list[Path]) -> dict:
    from ..runtime.functions import function_tool, load_functions

    functions: dict = {}
    for path in paths:
        for name, fn in load_functions(path).items():
            if name in functions:
                raise LlmdeskError(f"two --tool files define a function named {name!r}; rename one")
            function_tool(fn)  # a function that cannot be described fails now, not mid-conversation
            functions[name] = fn
    return functions


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _confirm(call) -> bool:
    args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
    err.print(f"run {call.name}({args})? [y/N] ", end="", markup=False)
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _confirm_unless_allowed(functions: dict):
    """Ask for each call, except to an MCP tool its server's config lists in "alwaysAllow"."""
    def confirm(call) -> bool:
        return getattr(functions.get(call.name), "always_allowed", False) or _confirm(call)

    return confirm


def _check_collection(name: str) -> None:
    """--docs names a collection that exists (checked before the model loads)."""
    from ..rag.ingest import list_collections

    names = [c.name for c in list_collections()]
    if name not in names:
        have = f"the collections are: {', '.join(names)}" if names else "there are none yet"
        raise LlmdeskError(f"--docs: no collection named '{name}' ({have}); create it with "
                           f"`llmdesk docs add PATH --collection {name}`")


def _answer_docs(m, messages: list[dict], collection: str, functions: dict, yes: bool, tool_choice, shown, kw,
                 max_steps: int = 8):
    """A --docs turn: the question retrieves passages, quoted as data (rag.answer.chat_turn);
    (the Answer, the messages added after the user's)."""
    from ..rag.answer import chat_turn
    from ..runtime.agent import run_agent

    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    history = messages[1 if system is not None else 0:-1]
    agent = None
    if functions:
        def agent(msgs, **kw2):
            r = run_agent(m, msgs, functions, on_run=shown, tool_choice=tool_choice, max_steps=max_steps, **kw2)
            _said_max_steps(r)
            return r.reply, r.messages
    kw = {k: v for k, v in kw.items() if k != "truncate"}  # chat_turn truncates the history, never the passages
    a, added = chat_turn(m, history, messages[-1]["content"], collection, agent=agent, confirm=_confirm, yes=yes,
                         system=system, **kw)
    return a, added[1:]


def _said_max_steps(r) -> None:
    if r.max_steps_reached:
        sys.stdout.write("\n")
        err.print(f"(the model was still calling tools after {r.steps} rounds; it answered without them: "
                  "raise --max-steps to let it go on)", style="yellow", markup=False)


def _sources(a) -> None:
    """After a --docs answer: where its passages came from, and what did not fit."""
    for line in a.sources():
        err.print(line, style="dim", markup=False)
    if a.dropped:
        err.print(f"({len(a.dropped)} more passage{'s' if len(a.dropped) > 1 else ''} did not fit in the context "
                  f"and were left out)", style="yellow", markup=False)
    if a.unknown_citations:
        err.print(f"(the answer cites {', '.join(f'[{n}]' for n in a.unknown_citations)}, which no passage has)",
                  style="yellow", markup=False)


def _answer(m, messages: list[dict], settings: dict, stop: list[str] | None, fmt, functions: dict, yes: bool,
            state: dict, tool_choice="auto", docs: str | None = None, max_steps: int = 8):
    """Answer the conversation (running tool calls when tools are given; from a collection with
    `docs`): (the Reply, the messages it added after the user's), or None when interrupted or
    refused."""
    from ..runtime.agent import run_agent

    kw = dict(settings)
    kw["max_tokens"] = None if kw["max_tokens"] < 0 else kw["max_tokens"]
    kw.update(stop=stop, response_format=fmt, truncate=True, on_text=_write)

    def shown(run) -> None:
        mark = "" if run.ok else " (failed)"
        err.print(f"{run.name} -> {run.result[:500]}{mark}", style="dim", markup=False)

    try:
        answer = None
        if docs is not None:
            answer, added = _answer_docs(m, messages, docs, functions, yes, tool_choice, shown, kw, max_steps)
            reply = answer.reply
        elif functions:
            r = run_agent(m, messages, functions, confirm=None if yes else _confirm_unless_allowed(functions),
                          on_run=shown,
                          tool_choice=tool_choice, max_steps=max_steps, **kw)
            _said_max_steps(r)
            reply, added = r.reply, r.messages[len(messages):]
        else:
            reply = m.respond(messages, **kw)
            added = [reply.message()]
    except LlmdeskError as e:
        sys.stdout.write("\n")
        err.print(f"error: {e}", markup=False)
        return None
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        err.print("(stopped)", style="dim")
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    if answer is not None:
        _sources(answer)
    if reply.messages_dropped > state["dropped"]:
        err.print(f"(the conversation outgrew the context of {m.n_ctx} tokens: the oldest {reply.messages_dropped} "
                  "messages were left out of this answer's prompt)", style="dim", markup=False)
    state["dropped"] = reply.messages_dropped
    err.print(_stats(reply), style="dim")
    return reply, added
