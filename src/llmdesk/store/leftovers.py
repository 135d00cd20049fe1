"""Temporary files that interrupted imports and pulls leave in the store, and their cleanup.

A process killed with -9 cannot remove what it was writing. What can be left, and how we know
nobody is writing it any more:

    models/blobs/.import-<random>.<pid>.part     an import (catalog._stage): its process is gone
    models/blobs/.import-<random>.part           the same, from llmdesk versions before the pid was
                                                 in the name: untouched for OLD_PART_AGE_S
    cache/huggingface/.pull-<random>.<pid>.part  a pull between download and import: process gone
    cache/huggingface/*/blobs/*.incomplete       huggingface_hub's download in progress: no process
                                                 holds its lock (`.locks/<repo folder>/<etag>.lock`)
    cache/huggingface/*/blobs/<etag>             a finished download a pull did not get to move out
                                                 (pull.py moves it at once): OLD_PART_AGE_S old
    any `.NAME.<pid>.part` under the user dir    an atomic write (llmdesk.atomic): process gone

A file a live process is still writing is never removed. Every store operation (import, pull,
list, rm) calls `clean()`; `llmdesk doctor` lists them all with `find()`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from . import paths

# An import of a big file from a slow disk can take many minutes; an hour without any change is
# far beyond that, so an old-style name untouched that long has no writer left.
OLD_PART_AGE_S = 3600
_OLD_IMPORT_RE = re.compile(r"^\.import-[0-9a-f]{16}\.part$")
# huggingface_hub's in-flight download names: `<etag>.incomplete` (before 1.x it resumed these
# across runs) and `<etag>.<uuid8>.incomplete` (since, one per process, never resumed)
_INCOMPLETE_RE = re.compile(r"^(?P<etag>[^.]+)(?:\.[0-9a-f]+)?\.incomplete$")


@dataclass(frozen=True)
class Leftover:
    path: Path
    size: int
    why: str  # why it is known to be abandoned, for `llmdesk doctor`

    @property
    def shown(self) -> str:
        """Its path inside the user directory, for messages."""
        try:
            return str(self.path.relative_to(paths.home()))
        except ValueError:
            return str(self.path)


def hf_cache() -> Path:
    """llmdesk's own huggingface_hub cache (pull.py downloads into it)."""
    return paths.cache_dir() / "huggingface"


def find(*, everywhere: bool = False) -> list[Leftover]:
    """The abandoned temporary files of the store. `everywhere` also walks the whole user
    directory for atomic writes' part files (what `llmdesk doctor` does); without it, only the
    folders imports and pulls write to are looked at, which is cheap enough for every command."""
    found: dict[Path, Leftover] = {}
    for p in _old_imports(paths.blobs_dir()):
        found[p] = _leftover(p, f"an interrupted import (untouched for over {OLD_PART_AGE_S // 60} minutes)")
    folders = _all_folders(paths.home()) if everywhere else [paths.blobs_dir(), hf_cache()]
    for folder in folders:
        for p in atomic.stale_parts(folder):
            found.setdefault(p, _leftover(p, f"its process (pid {atomic.part_owner(p.name)}) is gone"))
    for p, lock in _hub_blobs():
        if p.name.endswith(".incomplete"):
            with _unlocked(lock) as free:
                if free:
                    found.setdefault(p, _leftover(p, "an interrupted download (no download of it is running)"))
        elif _age(p) > OLD_PART_AGE_S:
            found.setdefault(p, _leftover(p, "a finished download that was never added to the store"))
    return sorted((v for v in found.values() if v.size >= 0), key=lambda v: str(v.path))


def clean(*, everywhere: bool = False) -> list[Leftover]:
    """Remove the abandoned temporary files `find` lists. Returns what was removed."""
    return [item for item in find(everywhere=everywhere) if remove(item)]


def remove(item: Leftover) -> bool:
    """Remove one file `find` listed (again making sure no download holds it); True if removed."""
    if item.path.parent.name == "blobs" and item.path.parent.parent.parent == hf_cache():
        # in huggingface_hub's cache: removed under its own download lock, so a download
        # starting meanwhile cannot be writing into it
        with _unlocked(_lock_path(item.path)) as free:
            return free and _unlink(item.path)
    return _unlink(item.path)


def clean_quietly() -> None:
    """`clean()` for the start of a store operation: the cleanup must never make it fail."""
    try:
        clean()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------


def _leftover(p: Path, why: str) -> Leftover:
    try:
        st = p.lstat()
    except OSError:
        return Leftover(p, -1, why)  # gone meanwhile: dropped by find()
    if st.st_nlink > 1:  # an import's hard link to the file being imported
        why += "; a second name of another file, so removing it frees no space"
    return Leftover(p, st.st_size, why)


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
        return True
    except FileNotFoundError:
        return False  # another cleaner was first
    except OSError:
        return False


def _age(p: Path) -> float:
    """Seconds since `p` last changed. The ctime counts too: a hard link keeps the source's old
    mtime, but linking (and renaming) sets the ctime."""
    try:
        st = p.lstat()
    except OSError:
        return -1.0
    return time.time() - max(st.st_mtime, st.st_ctime)


def _old_imports(blobs: Path) -> list[Path]:
    try:
        names = os.listdir(blobs)
    except OSError:
        return []
    return [blobs / n for n in names if _OLD_IMPORT_RE.match(n) and _age(blobs / n) > OLD_PART_AGE_S]


def _all_folders(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirnames, _files in os.walk(root, followlinks=False):
        out.append(Path(dirpath))
    return out


def _hub_blobs() -> Iterator[tuple[Path, Path]]:
    """The files in huggingface_hub's blob folders of llmdesk's cache, each with its lock file."""
    root = hf_cache()
    try:
        repos = [d for d in os.listdir(root) if not d.startswith(".")]
    except OSError:
        return
    for repo in repos:
        blobs = root / repo / "blobs"
        try:
            names = os.listdir(blobs)
        except OSError:
            continue
        for name in names:
            p = blobs / name
            if p.is_file() and not p.is_symlink():
                yield p, _lock_path(p)


def _lock_path(blob: Path) -> Path:
    # huggingface_hub (file_download._hf_hub_download_to_cache_dir) holds
    # `{cache}/.locks/{repo folder}/{etag}.lock` for the whole download of `blobs/{etag}`
    m = _INCOMPLETE_RE.match(blob.name)
    etag = m["etag"] if m else blob.name
    repo_folder = blob.parent.parent.name
    return blob.parent.parent.parent / ".locks" / repo_folder / f"{etag}.lock"


@contextmanager
def _unlocked(lock: Path | None) -> Iterator[bool]:
    """Hold huggingface_hub's download lock `lock` for the block if nobody holds it: yields True
    then, False when a download holds it or we cannot tell (no flock here: keep the file)."""
    fd, free = None, False
    if lock is not None and os.name == "posix":
        import fcntl

        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            # the file huggingface_hub's FileLock flocks; flock locks of two open files conflict
            # even in one process, so a download in another thread here counts as running too
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except OSError:  # held (EWOULDBLOCK), or a filesystem without flock
            pass
    try:
        yield free
    finally:
        if fd is not None:
            os.close(fd)  # closing the file releases the lock
