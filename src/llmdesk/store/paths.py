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
from pathlib import Path

import platformdirs

ENV_HOME = "LLMDESK_HOME"


def home() -> Path:
    """The user directory: `$LLMDESK_HOME`, else e.g. `~/.local/share/llmdesk` on Linux."""
    env = os.environ.get(ENV_HOME)
    path = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("llmdesk", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


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
