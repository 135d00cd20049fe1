"""Files that appear whole or not at all.

Every file llmdesk writes (models, imatrix files, saved logits, plots, caches, checkpoints) is
written under a temporary name in the same folder, flushed to disk, then renamed onto its real
name; on any failure, Ctrl-C included, the temporary file is removed. The temporary name is
`.NAME.PID.part[SUFFIX]`, so a file left by a killed process is recognisable (see
`quantize.core.clean_stale_parts`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
