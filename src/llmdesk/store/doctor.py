"""`llmdesk doctor`: check the store, and with `fix=True` repair what is safe to repair.

    report = check()            # look only
    report = check(fix=True)    # and remove what is safe to remove
    report.healthy              # True when no problem is left

What is checked, and what fixing does:

| problem            | what it is                                           | fix                         |
| ------------------ | ---------------------------------------------------- | --------------------------- |
| database           | `PRAGMA integrity_check` fails, or it cannot be read | none: a person decides      |
| missing file       | a catalog row whose model file is gone               | the row goes                |
| wrong size         | a model file whose size is not the recorded one      | the row goes (and the file, |
|                    | (cut short, or overwritten)                          | when no other row uses it)  |
| not in the store   | a row whose file is not its `models/blobs` blob      | the row goes                |
| unused file        | a blob no row points at                              | the file goes               |
| leftover           | a temporary file of an interrupted import, pull or   | the file goes               |
|                    | write (see leftovers.py)                             |                             |
| unknown file       | something else in `models/blobs`                     | none: it may be yours       |

Blobs are judged against the catalog only when the database is sound: with a damaged one,
nothing in `models/blobs` is called unused. Removals happen under the database's write lock, so
an import running meanwhile (which renames its blob in and records it in one transaction) is
never mistaken for an unused file.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlmdeskError
from . import db, leftovers, paths

_BLOB_RE = re.compile(r"sha256-(?P<digest>[0-9a-f]{64})\.gguf")


@dataclass
class Problem:
    kind: str  # "database", "missing file", "wrong size", ... (the table above)
    where: str  # a store name (name:tag) or a path inside the user directory
    detail: str  # what is wrong, one line
    size: int | None = None  # bytes on disk it takes, when it is a file
    fix: str | None = None  # what fixing does; None when it needs a person
    fixed: bool = False


@dataclass
class Report:
    home: Path
    models: int = 0  # catalog rows
    blobs: int = 0  # model files in models/blobs
    blob_bytes: int = 0
    database: str = "ok"  # "ok", "none yet", or what is wrong
    problems: list[Problem] = field(default_factory=list)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    @property
    def healthy(self) -> bool:
        return not self.remaining


def check(*, fix: bool = False) -> Report:
    """Check the store in the user directory; with `fix`, remove what is safe to remove."""
    report = Report(home=paths.home())
    _check_leftovers(report, fix)
    if _check_database(report):
        _check_catalog(report, fix)
    else:
        report.blobs, report.blob_bytes = _count_blobs()
    return report


# ---------------------------------------------------------------------------------------------


def _check_leftovers(report: Report, fix: bool) -> None:
    for item in leftovers.find(everywhere=True):
        p = Problem("leftover", item.shown, item.why, size=item.size, fix="remove it")
        if fix:
            p.fixed = leftovers.remove(item)
        report.problems.append(p)


def _check_database(report: Report) -> bool:
    """`PRAGMA integrity_check` on llmdesk.db. True when it is sound (or absent)."""
    path = paths.db_path()
    if not path.exists():
        report.database = "none yet"
        return True
    try:
        # a plain connection, not db.connect(): no migration may write to a damaged file
        conn = sqlite3.connect(path, timeout=db.BUSY_TIMEOUT_S)
    except sqlite3.Error as e:
        return _bad_database(report, f"cannot open it ({e})")
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    except sqlite3.Error as e:
        return _bad_database(report, f"cannot read it ({e})")
    finally:
        conn.close()
    if rows != ["ok"]:
        more = f" (and {len(rows) - 2} more)" if len(rows) > 2 else ""
        return _bad_database(report, "integrity check failed: " + "; ".join(rows[:2]) + more)
    return True


def _bad_database(report: Report, why: str) -> bool:
    report.database = why
    report.problems.append(
        Problem(
            "database",
            paths.db_path().name,
            f"{why}; move it away (or set LLMDESK_HOME to another directory) to start afresh, "
            "then import or pull the models again",
        )
    )
    return False


def _check_catalog(report: Report, fix: bool) -> None:
    blobs = paths.blobs_dir()
    home = paths.home()
    try:
        conn = db.connect()
    except LlmdeskError as e:
        _bad_database(report, str(e))
        return
    try:
        # the write lock from the start when fixing: an import cannot slip in between the look
        # at the catalog and a removal (see the module docstring)
        with db.transaction(conn) if fix else nullcontext():
            rows = conn.execute("SELECT name, tag, path, sha256, size FROM models ORDER BY name, tag").fetchall()
            report.models = len(rows)
            drop_rows: list[tuple[str, str]] = []
            for r in rows:
                ref = f"{r['name']}:{r['tag']}"
                expected = blobs / f"sha256-{r['sha256']}.gguf"
                path = home / r["path"]
                problem = None
                if path != expected:
                    problem = Problem("not in the store", ref, f"its file is {r['path']}, not the store's blob",
                                      fix="remove the entry")
                elif not path.is_file():
                    problem = Problem("missing file", ref, f"{_rel(path)} is gone; pull or import the model again",
                                      fix="remove the entry")
                else:
                    size = path.stat().st_size
                    if size != r["size"]:
                        problem = Problem("wrong size", ref, f"{_rel(path)} has {size} bytes, not {r['size']}; "
                                          "pull or import the model again", size=size,
                                          fix="remove the entry, and the file if no other entry uses it")
                if problem is not None:
                    report.problems.append(problem)
                    drop_rows.append((r["name"], r["tag"]))
                    problem.fixed = fix
            for name, tag in drop_rows if fix else []:
                conn.execute("DELETE FROM models WHERE name = ? AND tag = ?", (name, tag))
            # after fixing, a blob whose rows all went is unused, and is removed below
            used = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM models")}
            _check_blobs(report, blobs, used, fix)
    finally:
        conn.close()


def _check_blobs(report: Report, blobs: Path, used: set[str], fix: bool) -> None:
    for p in sorted(blobs.iterdir()):
        if p.name.startswith("."):
            continue  # temporary files: leftovers (above) or an import in progress
        m = _BLOB_RE.fullmatch(p.name)
        if m and p.is_file() and not p.is_symlink():
            size = p.stat().st_size
            report.blobs += 1
            report.blob_bytes += size
            if m["digest"] in used:
                continue
            problem = Problem("unused file", _rel(p), "no model in the catalog uses it", size=size, fix="remove it")
            if fix:
                try:
                    p.unlink()
                    problem.fixed = True
                except FileNotFoundError:
                    problem.fixed = True
                except OSError as e:
                    problem.detail += f"; cannot remove it ({e.strerror or e})"
            report.problems.append(problem)
        else:
            report.problems.append(
                Problem("unknown file", _rel(p), "not a model file llmdesk made; move it out of the store")
            )


def _count_blobs() -> tuple[int, int]:
    n = size = 0
    for p in paths.blobs_dir().iterdir():
        if _BLOB_RE.fullmatch(p.name) and p.is_file():
            n += 1
            size += p.stat().st_size
    return n, size


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(paths.home()))
    except ValueError:
        return str(p)
