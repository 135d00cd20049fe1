"""What a user may type where a model is expected, and what it means: one `ModelRef`.

    ./models/tiny.gguf, /abs/x.gguf, ~/x.gguf    a GGUF file on disk                      kind "file"
    NAME or NAME:TAG                             a model in the store (the tag: latest)   kind "store"
    hf:OWNER/REPO/FILE.gguf[@REVISION]           a file on the Hugging Face Hub (pulled)  kind "hf"
    openai:http://HOST:PORT/v1#MODEL             a model behind an OpenAI-compatible API  kind "remote"
    openai:ENDPOINT[#MODEL]                      an endpoint named in endpoints.toml      kind "remote"

An existing file always wins; anything that looks like a path (ends in .gguf or has a separator)
must exist.

Named endpoints live in `$LLMDESK_HOME/endpoints.toml`:

    [endpoints.local-vllm]
    url = "http://127.0.0.1:8000/v1"
    key_env = "VLLM_API_KEY"                # optional: the API key is read from this variable
    model = "Qwen/Qwen2.5-7B-Instruct"      # optional: the model when the reference names none

A key is never written in that file nor held in a ModelRef: only the name of the environment
variable, read when the model is used (runtime/remote.py), so it cannot reach a log or a repr.
With no `#MODEL` (and no `model =`), the model is the first one the endpoint lists at
GET /models when it is loaded: the default model of `llmdesk serve`, and vLLM's only one.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlmdeskError, ModelNotFound
from . import catalog, paths

REMOTE_PREFIX = "openai:"
ENDPOINTS_FILE = "endpoints.toml"
REMOTE_SYNTAX = "openai:http://HOST:PORT/v1#MODEL, or openai:NAME[#MODEL] for an endpoint in endpoints.toml"
_ENDPOINT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ENDPOINT_KEYS = {"url", "key_env", "model"}
_SECRET_KEYS = {"key", "api_key", "apikey", "token", "api_token", "secret", "password", "bearer"}
MAX_MODEL_ID = 256


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference. `path` is set for the local kinds, `base_url` for "remote"."""

    kind: str  # "file" | "store" | "hf" | "remote"
    name: str  # for display: "name:tag", the file name, or "openai:URL#MODEL"
    path: Path | None = None  # the GGUF file (local kinds)
    entry: catalog.ModelEntry | None = None  # set when the model is in the store ("store", "hf")
    base_url: str | None = None  # remote: the API's base, e.g. "http://127.0.0.1:8080/v1" (no trailing /)
    model: str | None = None  # remote: the endpoint's model id; None: its first listed, asked at load
    endpoint: str | None = None  # remote: the name in endpoints.toml, if it came from there
    key_env: str | None = None  # remote: the environment variable holding the API key (never the key)

    @property
    def is_remote(self) -> bool:
        return self.kind == "remote"


def looks_like_path(ref: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return ref.lower().endswith(".gguf") or any(s in ref for s in seps) or ref.startswith("~")




def resolve(ref: str, *, allow_remote: bool = False) -> ModelRef:
    """What `ref` names. Raises ModelNotFound or LlmdeskError (one line, with what to do).

    Remote references are refused unless `allow_remote`: most callers need the model's file
    (bench, fit, show, quantize, eval today); `llmdesk.load` takes either."""
    if ref.startswith(REMOTE_PREFIX):
        found = parse_remote(ref)
        if not allow_remote:
            raise LlmdeskError(f"'{found.name}' is a model behind an HTTP API; this needs a local model: "
                               "a .gguf path, NAME[:TAG] from 'llmdesk list', or hf:OWNER/REPO/FILE.gguf")
        return found

    if ref.startswith("hf:"):
        from . import pull as _pull

        entry = catalog.find_by_source(_pull.parse_hf_ref(ref).source) or _pull.pull(ref)
        return from_entry(entry, "hf")

    path = Path(ref).expanduser()
    if path.is_file():
        return ModelRef("file", path.name, path=path)
    if looks_like_path(ref):
        if path.is_dir():
            raise ModelNotFound(f"{ref} is a directory; pass the .gguf file inside it")
        raise ModelNotFound(f"no such file: {ref}")

    try:
        name, tag = catalog.parse_name(ref)
    except LlmdeskError:
        name, tag = ref, None
    entry = catalog.get(name, tag) if tag else None
    if entry is None:
        shown = f"{name}:{tag}" if tag else name
        raise ModelNotFound(
            f"model '{shown}' not found in the store ({paths.display(paths.home())}); "
            "run 'llmdesk list' to see local models, or pass a path to a .gguf file"
        )
    return from_entry(entry, "store")


def from_entry(entry: catalog.ModelEntry, kind: str = "store") -> ModelRef:
    """The reference of a store entry (ModelNotFound when its file has gone)."""
    if not entry.path.is_file():
        raise ModelNotFound(
            f"the file of model '{entry.ref}' is missing ({paths.display(entry.path)}); "
            f"run 'llmdesk rm {entry.ref}' and add it again"
        )
    return ModelRef(kind, entry.ref, path=entry.path, entry=entry)


# ---------------------------------------------------------------------------------------------
# remote references


def parse_remote(ref: str) -> ModelRef:
    """`openai:URL#MODEL` or `openai:NAME[#MODEL]` -> a remote ModelRef (no network)."""
    rest = ref[len(REMOTE_PREFIX):]
    if not rest.strip():
        raise LlmdeskError(f"'{ref}' names no endpoint: use {REMOTE_SYNTAX}")
    target, sep, model = rest.partition("#")
    if sep:
        if not model:
            raise LlmdeskError(f"nothing after '#' in '{_short(ref)}': name the model (openai:URL#MODEL), "
                               "or leave out '#' to use the endpoint's first model")
        _check_model_id(model, f"the model in '{_short(ref)}'")
    if "://" in target:
        base = check_url(target, f"the URL in '{_short(ref)}'" if "@" not in target else "the URL after openai:")
        return ModelRef("remote", f"{REMOTE_PREFIX}{base}" + (f"#{model}" if model else ""), base_url=base,
                        model=model or None)
    if not _ENDPOINT_NAME_RE.fullmatch(target):
        hint = (" (a URL starts with http:// or https://)" if re.match(r"[\w.-]+:\d", target) or "/" in target
                else "")
        raise LlmdeskError(f"'{_short(ref)}': '{_short(target, 40)}' is neither an http(s) URL nor an endpoint "
                           f"name{hint}; use {REMOTE_SYNTAX}")
    return endpoint(target, model or None)


def endpoints_path() -> Path:
    return paths.home() / ENDPOINTS_FILE


def endpoint(name: str, model: str | None = None) -> ModelRef:
    """The endpoint `name` of endpoints.toml (with `model`, else its `model =` if it has one)."""
    table = load_endpoints().get(name)
    file = paths.display(endpoints_path())
    if table is None:
        known = load_endpoints()
        where = (f"in {file} (it has {', '.join(sorted(known)) or 'none'})" if endpoints_path().is_file()
                 else f"({file} does not exist)")
        raise LlmdeskError(f"no endpoint named '{name}' {where}; add [endpoints.{name}] with "
                           f"url = \"http://HOST:PORT/v1\" there, or use openai:http://HOST:PORT/v1#MODEL")
    model = model or table.get("model")
    return ModelRef("remote", f"{REMOTE_PREFIX}{name}" + (f"#{model}" if model else ""), base_url=table["url"],
                    model=model, endpoint=name, key_env=table.get("key_env"))


def load_endpoints() -> dict[str, dict]:
    """The checked [endpoints.NAME] tables of endpoints.toml ({} when there is no such file)."""
    import tomllib

    file = endpoints_path()
    shown = paths.display(file)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise LlmdeskError(f"cannot read {shown}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LlmdeskError(f"{shown} is not UTF-8 text; write it as TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise LlmdeskError(f"{shown} is not valid TOML: {e}") from None
    extra = set(data) - {"endpoints"}
    if extra:
        raise LlmdeskError(f"{shown}: unknown table or key '{sorted(extra)[0]}'; endpoints go in "
                           "[endpoints.NAME] tables")
    endpoints = data.get("endpoints", {})
    if not isinstance(endpoints, dict):
        raise LlmdeskError(f"{shown}: 'endpoints' must be tables: [endpoints.NAME] with url = ...")
    out = {}
    for name, table in endpoints.items():
        where = f"{shown}: [endpoints.{name}]"
        if not _ENDPOINT_NAME_RE.fullmatch(name):
            raise LlmdeskError(f"{shown}: endpoint name '{_short(name, 40)}' must be letters, digits, '.', '-' "
                               "and '_', starting with a letter or digit")
        if not isinstance(table, dict):
            raise LlmdeskError(f"{where} must be a table with url = \"http://HOST:PORT/v1\"")
        for key in table:
            if key.lower() in _SECRET_KEYS:  # its value is never echoed
                raise LlmdeskError(f"{where} has '{key}': keys are not kept in this file; put the key in an "
                                   "environment variable and name that variable with key_env = \"VAR\"")
            if key not in _ENDPOINT_KEYS:
                raise LlmdeskError(f"{where}: unknown setting '{_short(key, 40)}' (known: url, key_env, model)")
        for key in _ENDPOINT_KEYS & set(table):
            if not isinstance(table[key], str):
                raise LlmdeskError(f"{where}.{key} must be a string")
        if "url" not in table:
            raise LlmdeskError(f"{where} has no url; add url = \"http://HOST:PORT/v1\"")
        checked = {"url": check_url(table["url"], f"{where}.url")}
        if "key_env" in table:
            if not _ENV_NAME_RE.fullmatch(table["key_env"]):
                raise LlmdeskError(f"{where}.key_env must be the name of an environment variable (like "
                                   f"VLLM_API_KEY), got '{_short(table['key_env'], 40)}'")
            checked["key_env"] = table["key_env"]
        if "model" in table:
            _check_model_id(table["model"], f"{where}.model")
            checked["model"] = table["model"]
        out[name] = checked
    return out


def check_url(url: str, where: str) -> str:
    """An http(s) base URL without credentials, query or fragment; returned without a trailing '/'."""
    # a URL with '@' is never repeated in a message: what is before the '@' is often a key
    shown = _short(url) if "@" not in url else "not shown: it has an '@'"
    if any(c.isspace() or not c.isprintable() for c in url):
        raise LlmdeskError(f"{where} has a space or an unprintable character")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise LlmdeskError(f"{where} is not a valid URL ({shown})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise LlmdeskError(f"{where} must start with http:// or https://, not {_short(parts.scheme, 20)}://")
    if parts.username is not None or parts.password is not None:
        raise LlmdeskError(f"{where} carries credentials before '@'; keep the key in an environment variable "
                           f"and name it with key_env in {paths.display(endpoints_path())}")
    if not parts.hostname:
        raise LlmdeskError(f"{where} has no host ({shown}); use http://HOST:PORT/v1")
    if parts.query:
        raise LlmdeskError(f"{where} has a query string ('?...'); give the API's base URL, like http://HOST:PORT/v1")
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, parts.path, "", "")).rstrip("/")


def _check_model_id(model: str, where: str) -> None:
    if len(model) > MAX_MODEL_ID:
        raise LlmdeskError(f"{where} is longer than {MAX_MODEL_ID} characters")
    if any(c.isspace() or not c.isprintable() for c in model):
        raise LlmdeskError(f"{where} has a space or an unprintable character")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
