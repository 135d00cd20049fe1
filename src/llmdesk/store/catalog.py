"""The model catalog: named, tagged GGUF files in the user directory.

A model in the store is a row in the `models` table (`name:tag` -> file, checksum, a few facts
from its metadata) and a content-addressed file `models/blobs/sha256-<hex>.gguf`. Two names for
the same bytes share one blob; the blob goes when the last name for it goes.

    entry = add_file("tiny.gguf", "tiny", "f32", source="/home/me/tiny.gguf")
    get("tiny", "f32"); list_models(); remove("tiny:f32")

Imports are all or nothing: the file is validated before anything is written, copied (or hard
linked) to a temporary name next to the blobs, fsynced, and renamed into place under the
database's write lock, in the same transaction that records it. The temporary name carries the
importing process's pid, so what an import killed with -9 leaves is removed by the next store
operation (leftovers.py); an import running in another process is left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import fsync_dir, unique_part_path
from ..errors import LlmdeskError, ModelNotFound
from . import db, leftovers, paths

DEFAULT_TAG = "latest"
NAME_RULE = "lowercase letters, digits, '.', '-' and '_', starting with a letter or digit"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")

# files at least this big get a progress bar while they are hashed or copied
PROGRESS_MIN_BYTES = 64 * 1024 * 1024
_CHUNK = 4 * 1024 * 1024


@dataclass
class ModelEntry:
    name: str
    tag: str
    path: Path  # the blob, absolute
    sha256: str
    size: int
    architecture: str | None
    parameters: int | None
    file_type: str | None
    context_length: int | None
    source: str | None  # where it came from: "hf:owner/repo/file.gguf" or the imported file's path
    added: str  # UTC, ISO 8601

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return {"ref": self.ref, **d}


def parse_name(ref: str) -> tuple[str, str]:
    """`"name[:tag]"` -> `(name, tag)`; the tag defaults to "latest"."""
    name, sep, tag = ref.partition(":")
    if not sep:
        tag = DEFAULT_TAG
    check_name(name, tag)
    return name, tag


def check_name(name: str, tag: str) -> None:
    for what, part in (("name", name), ("tag", tag)):
        if not _NAME_RE.fullmatch(part):
            raise LlmdeskError(f"bad model {what} {part!r}: use {NAME_RULE} (as in 'name' or 'name:tag')")


# the quantization at the end of a GGUF file name: "-Q4_K_M", ".q8_0", "-IQ2_XXS", "-UD-Q4_K_XL", "-F16"
_QUANT_SUFFIX = re.compile(
    r"[.\-_](?P<quant>(?:ud-)?(?:i?q\d(?:_[a-z0-9]+)*|tq\d_\d|mxfp4(?:_moe)?|bf16|fp?16|fp?32))$"
)


def names_from_filename(filename: str) -> tuple[str, str]:
    """A store name and tag for a model file: the stem, lowercased, with a quantization suffix
    split off as the tag. "TinyLlama-1.1B-Chat-v1.0.Q4_K_M.gguf" -> ("tinyllama-1.1b-chat-v1.0",
    "q4_k_m"); "model.gguf" -> ("model", "latest")."""
    stem = Path(filename.replace("\\", "/")).name
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    stem = stem.lower()
    m = _QUANT_SUFFIX.search(stem)
    name, tag = (stem[: m.start()], m["quant"]) if m else (stem, DEFAULT_TAG)
    # whatever else is not allowed in a name becomes "-"
    name = re.sub(r"[^a-z0-9._-]+", "-", name).strip("._-")[:128] or "model"
    tag = re.sub(r"[^a-z0-9._-]+", "-", tag)[:128]
    return name, tag


# ---------------------------------------------------------------------------------------------
# reading


def _entry(row: sqlite3.Row) -> ModelEntry:
    fields = {k: row[k] for k in row.keys() if k != "id"}
    fields["path"] = paths.home() / fields["path"]  # stored relative to the user dir
    return ModelEntry(**fields)


def get(name: str, tag: str = DEFAULT_TAG, *, conn: sqlite3.Connection | None = None) -> ModelEntry | None:
    with db.using(conn) as c:
        row = c.execute("SELECT * FROM models WHERE name = ? AND tag = ?", (name, tag)).fetchone()
    return _entry(row) if row else None


def list_models(*, conn: sqlite3.Connection | None = None) -> list[ModelEntry]:
    leftovers.clean_quietly()
    with db.using(conn) as c:
        rows = c.execute("SELECT * FROM models ORDER BY name, tag").fetchall()
    return [_entry(r) for r in rows]


def find_by_source(source: str, *, conn: sqlite3.Connection | None = None) -> ModelEntry | None:
    """The entry most recently added from `source` (e.g. an `hf:` reference), if any."""
    with db.using(conn) as c:
        row = c.execute("SELECT * FROM models WHERE source = ? ORDER BY added DESC, id DESC LIMIT 1", (source,)).fetchone()
    return _entry(row) if row else None


# ---------------------------------------------------------------------------------------------
# writing


def add_file(
    src_path: str | os.PathLike,
    name: str,
    tag: str = DEFAULT_TAG,
    source: str | None = None,
    *,
    conn: sqlite3.Connection | None = None,
    progress: bool = True,
) -> ModelEntry:
    """Validate a GGUF file and store it as `name:tag`, replacing any entry of that name.

    The blob is a hard link to `src_path` when both are on one filesystem (no copy, no extra
    space; do not then edit the original in place), else a copy.
    """
    from ..formats.gguf import read_gguf

    check_name(name, tag)
    src = Path(src_path).expanduser()
    info = read_gguf(src)  # BadModelFile / ModelNotFound before anything is written
    leftovers.clean_quietly()

    blobs = paths.blobs_dir()
    staged, digest = _stage(src, blobs, progress)
    try:
        blob = blobs / f"sha256-{digest}.gguf"
        size = staged.stat().st_size
        with db.using(conn) as c, db.transaction(c):
            if not (blob.exists() and blob.stat().st_size == size):
                os.replace(staged, blob)
                fsync_dir(blobs)
            old = c.execute("SELECT sha256 FROM models WHERE name = ? AND tag = ?", (name, tag)).fetchone()
            c.execute(
                """
                INSERT INTO models (name, tag, path, sha256, size, architecture, parameters,
                                    file_type, context_length, source, added)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (name, tag) DO UPDATE SET
                    path = excluded.path, sha256 = excluded.sha256, size = excluded.size,
                    architecture = excluded.architecture, parameters = excluded.parameters,
                    file_type = excluded.file_type, context_length = excluded.context_length,
                    source = excluded.source, added = excluded.added
                """,
                (
                    name,
                    tag,
                    str(blob.relative_to(paths.home())),
                    digest,
                    size,
                    info.architecture,
                    info.parameter_count,
                    info.file_type,
                    info.context_length,
                    source,
                    db.now(),
                ),
            )
            if old and old["sha256"] != digest:
                _drop_blob_if_unused(c, old["sha256"])
            entry = get(name, tag, conn=c)
    finally:
        staged.unlink(missing_ok=True)
    assert entry is not None
    return entry


def remove(ref: str, *, conn: sqlite3.Connection | None = None) -> ModelEntry:
    """Remove `name[:tag]` from the store; its blob too when no other name uses it."""
    name, tag = parse_name(ref)
    leftovers.clean_quietly()
    with db.using(conn) as c, db.transaction(c):
        entry = get(name, tag, conn=c)
        if entry is None:
            raise ModelNotFound(f"model '{name}:{tag}' is not in the store; run 'llmdesk list' to see local models")
        c.execute("DELETE FROM models WHERE name = ? AND tag = ?", (name, tag))
        _drop_blob_if_unused(c, entry.sha256)
    return entry


def _drop_blob_if_unused(c: sqlite3.Connection, digest: str) -> None:
    # called inside the write transaction, so no other process can start using the blob meanwhile
    if c.execute("SELECT 1 FROM models WHERE sha256 = ? LIMIT 1", (digest,)).fetchone() is None:
        (paths.blobs_dir() / f"sha256-{digest}.gguf").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# files


def _stage(src: Path, blobs: Path, progress: bool) -> tuple[Path, str]:
    """Put the bytes of `src` at a temporary name in `blobs` (hard link, else copy) and hash
    them. Returns (temporary path, sha256 hex). The caller renames or deletes it."""
    tmp = unique_part_path(blobs, "import")  # .import-<random>.<pid>.part
    try:
        try:
            os.link(src.resolve(), tmp)
            linked = True
        except OSError:  # another filesystem, no hard links there, or not allowed
            linked = False
        with open(src if not linked else tmp, "rb") as fin, _Progress(src, progress) as bar:
            h = hashlib.sha256()
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            if linked:
                while n := fin.readinto(buf):
                    h.update(view[:n])
                    bar.advance(n)
            else:
                with open(tmp, "xb") as fout:
                    while n := fin.readinto(buf):
                        h.update(view[:n])
                        fout.write(view[:n])
                        bar.advance(n)
                    fout.flush()
                    os.fsync(fout.fileno())
                shutil.copymode(src, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest()


def sha256_file(path: str | os.PathLike, progress: bool = True) -> str:
    """The sha256 of a file, with a progress bar on stderr when it is big."""
    path = Path(path)
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f, _Progress(path, progress) as bar:
        while n := f.readinto(buf):
            h.update(view[:n])
            bar.advance(n)
    return h.hexdigest()


class _Progress:
    """A rich progress bar on stderr for big files; nothing for small ones."""

    def __init__(self, path: Path, enabled: bool):
        size = path.stat().st_size
        self.progress = None
        if enabled and size >= PROGRESS_MIN_BYTES:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = self.progress.add_task(f"importing {path.name}", total=size)

    def __enter__(self) -> _Progress:
        if self.progress:
            self.progress.start()
        return self

    def advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()
