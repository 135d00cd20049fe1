"""Files that appear whole or not at all.

Every file llmdesk writes (models, imatrix files, saved logits, plots, caches, checkpoints) is
written under a temporary name in the same folder, flushed to disk, then renamed onto its real
name; on any failure, Ctrl-C included, the temporary file is removed. The temporary name is
`.NAME.PID.part[SUFFIX]`, so a file left by a process killed with -9 is recognisable:
`stale_parts` finds the ones whose process is gone and `clean_stale_parts` removes them.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# `.NAME.PID.part` plus an optional suffix such as `.png` (see `part_path`)
_PART_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.part(?P<suffix>\.[A-Za-z0-9]{1,16})?$")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (POSIX; a no-op elsewhere)."""
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def part_path(dest: str | os.PathLike, suffix: str = "") -> Path:
    """The temporary name `dest` is written under by this process."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{os.getpid()}.part{suffix}")


def unique_part_path(folder: str | os.PathLike, stem: str) -> Path:
    """A temporary name in `folder` no other writer uses, in the same `.NAME.PID.part` form, for
    writers that do not know their final name yet (an import learns it from the content's hash)."""
    return Path(folder) / f".{stem}-{secrets.token_hex(8)}.{os.getpid()}.part"


def part_owner(name: str) -> int | None:
    """The pid in a temporary name `part_path` made, else None."""
    m = _PART_RE.match(name)
    return int(m["pid"]) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (someone else's counts: we cannot tell)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def stale_parts(folder: str | os.PathLike) -> list[Path]:
    """The temporary files in `folder` (not below it) whose writing process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for fname in names:
        pid = part_owner(fname)
        if pid is not None and not pid_alive(pid):
            out.append(Path(folder) / fname)
    return out


def clean_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files in `folder` left by processes that are gone (killed with -9).
    A file whose process is alive is being written and is never touched. Returns what went."""
    removed = []
    for p in stale_parts(folder):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass  # gone already (another cleaner), or not ours to remove: leave it
    return removed


@contextmanager
def atomic_path(dest: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `dest` to write; when the block ends normally it becomes
    `dest`. `suffix` is for writers that pick the format from the name (matplotlib's savefig)."""
    dest = Path(dest)
    tmp = part_path(dest, suffix)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(dest: str | os.PathLike, text: str) -> Path:
    """`Path.write_text`, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)
