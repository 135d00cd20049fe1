"""Prompt templates in the server, by name (tools/prompts.py; docs/prompts.md).

    GET  /v1/prompt_templates         the templates in $LLMDESK_HOME/prompts, with their variables
    POST /v1/chat/completions         {"prompt_template": {"name": "release-note", "variables": {"tone": "dry"}},
                                       "messages": [{"role": "user", "content": "fix: ..."}]}

A request that names a template gets what `llmdesk chat -p NAME` gives a message: the template's
system prompt (unless the request has system messages of its own, which then stand instead),
its exemplars as earlier turns, and its request frame (task, context, format, tone) around the
last user message, which is the template's `input`. The template's sampling settings apply where
the request sets none, and its schema becomes the `response_format` unless the request gives one.
Templates are read from the server's prompts folder, by name only (never a path).
"""

from __future__ import annotations

import re

from fastapi import APIRouter

from ..errors import LlmdeskError
from ..store.paths import redact
from ..tools import prompts
from .chat import off_loop
from .errors import APIError

router = APIRouter()
PARAM = "prompt_template"


def _load(spec) -> tuple[prompts.PromptTemplate, dict]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or set(spec) - {"name", "variables"}:
        raise APIError(400, "'prompt_template' must be an object {\"name\": NAME, \"variables\": {...}} "
                            "(GET /v1/prompt_templates lists the names)", param=PARAM)
    variables = spec.get("variables") or {}
    if not isinstance(variables, dict):
        raise APIError(400, "'prompt_template.variables' must be an object of NAME: VALUE", param=f"{PARAM}.variables")
    name = spec["name"]
    try:
        path = prompts.prompt_path(name)  # a name, never a path
    except LlmdeskError as e:
        raise APIError(400, str(e), param=f"{PARAM}.name") from None
    if not path.is_file():
        have = ", ".join(prompts.list_names()) or "none"
        raise APIError(404, f"no prompt template named {name!r} on this server (it has: {have})",
                       code="prompt_template_not_found", param=f"{PARAM}.name")
    try:
        return prompts.load_prompt(name), variables
    except LlmdeskError as e:
        raise APIError(500, f"the prompt template {name!r} cannot be read: {redact(str(e))}",
                       code="bad_prompt_template") from None


def apply(body, messages: list[dict]) -> list[dict]:
    """The conversation `body.prompt_template` makes of `messages`; the template's sampling
    settings and schema set on `body` where it has none."""
    tpl, variables = _load(body.prompt_template)
    last = messages[-1] if messages[-1]["role"] == "user" else None
    earlier = messages[:-1] if last is not None else messages
    try:
        made = tpl.messages(variables, input=last["content"] if last is not None else None)
    except LlmdeskError as e:  # an unknown variable, one with no value, a render error
        message = re.sub(r"give it with -v (\w+)=VALUE", r"give it in prompt_template.variables as \1", redact(str(e)))
        if "needs an input" in message:
            message = f"prompt {tpl.name}: needs an input: end 'messages' with the user's message"
        raise APIError(400, message, param=f"{PARAM}.variables") from None
    own = [m for m in earlier if m["role"] == "system"]
    system = own or [m for m in made if m["role"] == "system"]
    for key, value in tpl.sampling.items():
        if key == "max_tokens":
            if body.max_tokens is None and body.max_completion_tokens is None:
                body.max_tokens = value
        elif getattr(body, key, None) is None:
            setattr(body, key, value)
    if body.response_format is None:
        body.response_format = tpl.response_format()
    return system + [m for m in made if m["role"] != "system"][:-1] + \
        [m for m in earlier if m["role"] != "system"] + made[-1:]


def _card(t) -> dict:
    if isinstance(t, LlmdeskError):
        return {"object": "prompt_template", "name": getattr(t, "prompt_name", "?"), "error": redact(str(t))}
    return {"object": "prompt_template", "name": t.name, "description": t.description, "model": t.model,
            "variables": [{"name": v.name, "default": v.default, "description": v.description, "required": v.required}
                          for v in t.variables.values()],
            "uses_input": "input" in t.used_variables(), "exemplars": len(t.exemplars), "sampling": t.sampling,
            "schema": t.schema}


@router.get("/v1/prompt_templates")
async def list_prompt_templates():
    templates = await off_loop(prompts.list_prompts)
    return {"object": "list", "data": [_card(t) for t in templates]}
