"""Where llmdesk keeps its files: one user directory, `$LLMDESK_HOME` or the platform's default.

    home()/
      llmdesk.db               catalog, logs, settings (SQLite, see db.py)
      models/blobs/            sha256-<hex>.gguf, one file per distinct model (content-addressed)
      cache/huggingface/       partial and in-flight downloads (pull.py)

Every function reads the environment when called, so a test (or a user) can point
`LLMDESK_HOME` somewhere else at any time. Directories are created on demand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs

ENV_HOME = "LLMDESK_HOME"


def home() -> Path:
    """The user directory: `$LLMDESK_HOME`, else e.g. `~/.local/share/llmdesk` on Linux."""
    path = _home_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _home_path() -> Path:
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("llmdesk", appauthor=False))


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def blobs_dir() -> Path:
    """Model files named by their content: `sha256-<hex>.gguf`."""
    path = models_dir() / "blobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Downloads in progress (resumable) and other things that can be deleted at any time."""
    path = home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path() -> Path:
    return home() / "llmdesk.db"


def display(path: Path) -> str:
    """A path for messages: `~/...` when it is under the user's home directory."""
    try:
        rel = Path(path).relative_to(Path.home())
    except ValueError:
        return str(path)
    return "~" if rel == Path(".") else f"~/{rel}"


# ---------------------------------------------------------------------------------------------
# Messages for remote clients

STORE_LABEL = "$" + ENV_HOME

# An absolute path in a message: POSIX (`/a/b`), home-relative (`~/a`), Windows (`C:\\a`, `\\\\srv\\a`),
# starting the text or after a space, quote, bracket or '='. A space belongs to the path when
# the word after it goes on with a separator ("/My Models/x.gguf"). Never after ':' or '/', so
# URLs (`https://host/...`) and references (`hf:owner/repo/file`) stay as they are.
_STOP = r"""\s'"`()\[\]{}<>,;|"""
_ABS_PATH_RE = re.compile(
    rf"""(?:^|(?<=[\s'"`(\[{{=]))(?P<path>(?:~|[A-Za-z]:)?[/\\](?:[^{_STOP}]|\ (?=[^{_STOP}/\\]*[/\\]))*)"""
)


def redact(text: str) -> str:
    """`text` (an error message) without the absolute paths of this machine, for answers to
    remote clients: a path in the user directory becomes its place in the store
    (`$LLMDESK_HOME/models/blobs/sha256-....gguf`), any other absolute path its file name alone
    (`/home/me/models/tiny.gguf` -> `tiny.gguf`). URLs and `hf:` references are left alone."""
    text = str(text)
    for prefix in _home_forms():
        text = re.sub(re.escape(prefix) + r"(?=$|[/\\\s'\"`),;:\]}>])", lambda _m: STORE_LABEL, text)
    return _ABS_PATH_RE.sub(lambda m: _file_name(m["path"]), text)


def _home_forms() -> list[str]:
    """The spellings of the user directory a message may use, longest first."""
    try:
        h = _home_path()
        forms = {str(h), os.path.realpath(h), os.path.abspath(h), display(h)}
    except (OSError, RuntimeError, ValueError):  # no usable home directory: only the generic rule
        return []
    return sorted((f for f in forms if f not in ("", "/", "~", ".")), key=len, reverse=True)


def _file_name(path: str) -> str:
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    return name if name and name != "~" else path  # "/" or "~" alone tell nothing
