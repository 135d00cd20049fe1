"""`llmdesk pull hf:OWNER/REPO/FILE.gguf[@REVISION]`: download a GGUF file from the Hugging Face
Hub and add it to the store.

huggingface_hub does the transfer: retries and resumes within a run (HTTP ranges, or Xet chunks),
checks the size, shows a progress bar, writes to a temporary name and renames. It downloads into
llmdesk's own cache (`home()/cache/huggingface`); the file is moved out of the cache at once to
a temporary name carrying our pid, validated and registered with `catalog.add_file` (a hard
link, so no second copy), and the temporary name dropped, so the store is the one owner of the
bytes and `llmdesk rm` frees the space. What a pull killed with -9 leaves (huggingface_hub's
`.incomplete` file, or our temporary name) goes at the next store operation (leftovers.py).

Every part of the reference (owner, repository, file path, revision) is checked against the
Hub's own rules before any request, the endpoint's answers before the download, and the path
huggingface_hub returns after it: nothing is written outside llmdesk's cache and store.

Pulling a model that is already in the store asks the Hub for the file's ETag (the sha256 of an
LFS file) and downloads only when it changed. `HF_HUB_OFFLINE=1` pulls nothing: a model already
in the store is returned, anything else is an error (and the Hub is not contacted at all). `HF_ENDPOINT` (a mirror) and `HF_TOKEN`
(gated and private repositories) are read when `pull` is called.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..atomic import unique_part_path
from ..errors import BadModelFile, LlmdeskError
from . import catalog, leftovers, paths

PREFIX = "hf:"
SYNTAX = "hf:OWNER/REPO/FILE.gguf (optionally @REVISION), e.g. hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"
REVISION_SYNTAX = (
    "hf:OWNER/REPO/FILE.gguf@REVISION with a branch or tag name (e.g. main, v1.0), "
    "a 40-hex commit id or refs/pr/N"
)
_TRUE = {"1", "on", "yes", "true"}

# Every part of a reference ends up in a file path: huggingface_hub stores the file under
# `snapshots/<commit>/<FILE>` and the revision under `refs/<REVISION>` in its cache, and the
# endpoint's answers name `blobs/<etag>`. So each part is held to the Hub's own rules, and
# anything that could leave the cache (`..`, absolute paths, backslashes, encoded forms) is
# refused before any request is made.

# owner and repository names: huggingface_hub's validate_repo_id (REPO_ID_REGEX, and no "--",
# "..", or ".git" at the end), ASCII as the Hub's server enforces it
_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
NAME_MAX = 96
# a file path inside a repository: a name is at most 255 bytes on common filesystems; the whole
# path has to fit in the cache below the user directory too
FILE_SEGMENT_MAX = 255
FILE_PATH_MAX = 1024
REVISION_MAX = 255
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_PR_RE = re.compile(r"refs/pr/[0-9]+")
_PERCENT_RE = re.compile(r"%[0-9A-Fa-f]{2}")
# `git check-ref-format`: characters a branch or tag name may not contain
_REF_FORBIDDEN = "~^:?*[\\"


@dataclass(frozen=True)
class HfRef:
    repo_id: str  # "owner/repo"
    filename: str  # path inside the repository, "/"-separated
    revision: str | None  # branch, tag or commit; None = main

    @property
    def source(self) -> str:
        """The canonical reference, as recorded in the catalog's `source` column."""
        return f"{PREFIX}{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")

    @property
    def page(self) -> str:
        return f"{_endpoint()}/{self.repo_id}"


def parse_hf_ref(ref: str) -> HfRef:
    """`hf:OWNER/REPO/FILE.gguf[@REVISION]` -> HfRef; anything else is a one-line LlmdeskError
    saying which part is wrong and why."""
    if not isinstance(ref, str) or not ref.startswith(PREFIX):
        raise LlmdeskError(f"bad Hugging Face reference {_q(ref)}: write {SYNTAX}")
    path, at, revision = ref[len(PREFIX):].partition("@")
    parts = path.split("/")
    if len(parts) < 3:
        raise LlmdeskError(f"bad Hugging Face reference {_q(ref)}: it needs an owner, a repository and a file; write {SYNTAX}")
    owner, repo, filename = parts[0], parts[1], "/".join(parts[2:])
    _check_name("owner", owner)
    _check_name("repository name", repo)
    _check_filename(filename)
    if at:
        _check_revision(revision)
    return HfRef(f"{owner}/{repo}", filename, revision if at else None)


def _bad(part: str, value: str, why: str, syntax: str = SYNTAX) -> LlmdeskError:
    return LlmdeskError(f"bad {part} {_q(value)} in a Hugging Face reference: {why}; write {syntax}")


def _q(value: object, limit: int = 80) -> str:
    """A user-typed value, quoted and escaped onto one line, cut to a readable length."""
    text = str(value)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _first_unprintable(text: str) -> str | None:
    return next((c for c in text if not c.isprintable()), None)


def _check_name(part: str, name: str) -> None:
    if not name:
        raise _bad(part, name, "it is empty")
    if _PERCENT_RE.search(name):
        raise _bad(part, name, "it is percent-encoded (give the characters themselves)")
    if len(name) > NAME_MAX:
        raise _bad(part, name, f"it is {len(name)} characters long (the Hub allows {NAME_MAX})")
    if not _NAME_RE.fullmatch(name):
        if not all(c.isascii() and (c.isalnum() or c in "._-") for c in name):
            raise _bad(part, name, "the Hub allows only letters, digits, '-', '_' and '.' in it")
        raise _bad(part, name, "it may not start or end with '-' or '.'")
    if "--" in name or ".." in name:
        raise _bad(part, name, "it may not contain '--' or '..'")
    if part == "repository name" and name.lower().endswith(".git"):
        raise _bad(part, name, "it may not end in '.git'")


def _check_filename(filename: str) -> None:
    part = "file path"
    if not filename:
        raise _bad(part, filename, "it is empty")
    bad_char = _first_unprintable(filename)
    if bad_char is not None:
        raise _bad(part, filename, f"it contains the control character {bad_char!r}")
    if _PERCENT_RE.search(filename):
        raise _bad(part, filename, "it is percent-encoded (give the characters themselves)")
    if filename.startswith("/"):
        raise _bad(part, filename, "it is an absolute path (give the path inside the repository)")
    if "\\" in filename:
        raise _bad(part, filename, "it contains a backslash (separate folders with '/')")
    if len(filename) > FILE_PATH_MAX:
        raise _bad(part, filename, f"it is {len(filename)} characters long (at most {FILE_PATH_MAX})")
    for seg in filename.split("/"):
        if seg == "":
            raise _bad(part, filename, "it has an empty folder name ('//' or a '/' at the end)")
        if seg in (".", ".."):
            raise _bad(part, filename, f"it has a {seg!r} segment (give the path inside the repository)")
        if len(seg.encode("utf-8")) > FILE_SEGMENT_MAX:
            raise _bad(part, filename, f"a name in it is longer than {FILE_SEGMENT_MAX} bytes")
        if re.match(r"[A-Za-z]:", seg):
            raise _bad(part, filename, f"{seg[:2]!r} reads as a Windows drive (give the path inside the repository)")
    if not filename.lower().endswith(".gguf"):
        raise _bad(part, filename, "llmdesk pulls GGUF files, whose names end in .gguf")


def _check_revision(rev: str) -> None:
    """A branch or tag name by `git check-ref-format`'s rules, a 40-hex commit, or refs/pr/N."""
    part, syntax = "revision", REVISION_SYNTAX
    if _COMMIT_RE.fullmatch(rev) or _PR_RE.fullmatch(rev):
        return
    if not rev:
        raise _bad(part, rev, "nothing follows '@'", syntax)
    bad_char = _first_unprintable(rev)
    if bad_char is not None:
        raise _bad(part, rev, f"it contains the control character {bad_char!r}", syntax)
    if _PERCENT_RE.search(rev):
        raise _bad(part, rev, "it is percent-encoded (give the characters themselves)", syntax)
    if len(rev) > REVISION_MAX:
        raise _bad(part, rev, f"it is {len(rev)} characters long (at most {REVISION_MAX})", syntax)
    if rev.startswith("refs/pr/"):
        raise _bad(part, rev, "a pull request is refs/pr/N, with N its number", syntax)
    why = None
    forbidden = next((c for c in rev if c in _REF_FORBIDDEN or c == " "), None)
    if forbidden is not None:
        why = f"git does not allow {forbidden!r} in branch and tag names"
    elif ".." in rev:
        why = "it contains '..'"
    elif "@{" in rev or rev == "@":
        why = "git does not allow '@{' or a lone '@' in branch and tag names"
    elif rev.startswith("/") or rev.endswith("/") or "//" in rev:
        why = "it starts or ends with '/' or has '//'"
    elif rev.startswith("-"):
        why = "it starts with '-'"
    elif rev.endswith("."):
        why = "it ends with '.'"
    elif any(seg.startswith(".") for seg in rev.split("/")):
        why = "a part of it starts with '.'"
    elif any(seg.endswith(".lock") for seg in rev.split("/")):
        why = "a part of it ends in '.lock'"
    if why is not None:
        raise _bad(part, rev, why, syntax)


def pull(ref: str, *, progress: bool = True) -> catalog.ModelEntry:
    """Download `hf:OWNER/REPO/FILE.gguf[@REVISION]` (if not already in the store, up to date)
    and register it; returns the catalog entry."""
    spec = parse_hf_ref(ref)
    existing = catalog.find_by_source(spec.source)
    if existing is not None and not existing.path.is_file():
        existing = None

    if _offline():
        if existing is not None:
            return existing
        raise LlmdeskError(
            f"cannot pull {spec.source}: HF_HUB_OFFLINE is set and the model is not in the store; "
            "unset HF_HUB_OFFLINE to download it, or run 'llmdesk list' to see local models"
        )
    leftovers.clean_quietly()
    etag = _remote_etag(spec)
    if existing is not None and etag == existing.sha256:
        return existing  # up to date
    name, tag = catalog.names_from_filename(spec.filename)
    staged = _download(spec, progress)
    try:
        return catalog.add_file(staged, name, tag, source=spec.source, progress=progress)
    except BadModelFile as e:
        why = str(e).replace(staged.name, PurePosixPath(spec.filename).name)
        raise BadModelFile(f"{spec.source} is not a usable GGUF model: {why}") from None
    finally:
        staged.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# talking to the Hub


def _endpoint() -> str:
    import huggingface_hub.constants as hc

    return (os.environ.get("HF_ENDPOINT") or hc.ENDPOINT).rstrip("/")


def _offline() -> bool:
    import huggingface_hub.constants as hc

    return hc.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hf_cache() -> Path:
    return leftovers.hf_cache()


def _remote_etag(spec: HfRef) -> str | None:
    """The file's ETag (for LFS files, the sha256 of its content). One quick HEAD request, no
    retries, so that an unreachable Hub fails fast with a clear message."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(spec.repo_id, spec.filename, revision=spec.revision, endpoint=_endpoint())
    with _hub_errors(spec):
        meta = get_hf_file_metadata(url, endpoint=_endpoint())
    _check_answer(spec, meta.etag, meta.commit_hash)
    return meta.etag


def _check_answer(spec: HfRef, etag: str | None, commit: str | None) -> None:
    """Refuse an endpoint whose answer would become a path outside the cache: huggingface_hub
    names the file `blobs/<etag>` and its folder `snapshots/<commit>`."""
    bad = None
    if commit is not None and not _COMMIT_RE.fullmatch(commit):
        bad = f"a commit id {_q(commit)} that is not 40 hex digits"
    elif etag is not None and (
        etag in ("", ".", "..") or any(c in etag for c in "/\\") or _first_unprintable(etag) or len(etag) > 255
    ):
        bad = f"an ETag {_q(etag)} that is not a plain name"
    if bad:
        raise LlmdeskError(
            f"{_endpoint()} answered {bad} for {spec.source}; nothing was downloaded "
            "(is HF_ENDPOINT a Hugging Face Hub or a faithful mirror?)"
        )


def _download(spec: HfRef, progress: bool) -> Path:
    """Download into llmdesk's Hub cache, then move the file out of the cache's bookkeeping to a
    temporary name carrying this process's pid (`.pull-<random>.<pid>.part`), so that if we are
    killed before the import finishes, the next store operation knows it can be removed."""
    from huggingface_hub import hf_hub_download

    for attempt in (1, 2):
        with _hub_errors(spec):
            got = Path(
                hf_hub_download(
                    spec.repo_id,
                    spec.filename,
                    revision=spec.revision,
                    cache_dir=_hf_cache(),
                    endpoint=_endpoint(),
                    library_name="llmdesk",
                    tqdm_class=None if progress else _silent_tqdm(),
                )
            )
        _check_inside_cache(spec, got)
        staged = unique_part_path(_hf_cache(), "pull")
        try:
            os.replace(os.path.realpath(got), staged)
        except FileNotFoundError:
            # another pull of the same file took the cached copy between its download and ours
            # returning: download it again (once)
            if attempt == 2:
                raise LlmdeskError(f"the download of {spec.source} vanished from the cache twice; try again") from None
            continue
        finally:
            _unlink_quietly(got)  # the snapshot link to it
        return staged
    raise AssertionError("unreachable")


def _check_inside_cache(spec: HfRef, got: Path) -> None:
    """Defence in depth: the file huggingface_hub returns must be in llmdesk's Hub cache, link
    and target. The reference and the endpoint's answers are checked before, so this means a
    client bug or a hostile endpoint: remove what it returned and refuse."""
    root = _hf_cache()
    pairs = ((os.path.abspath(got), os.path.abspath(root)), (os.path.realpath(got), os.path.realpath(root)))
    if all(os.path.commonpath([p, r]) == r for p, r in pairs):
        return
    # unlink, not follow: a link pointing outside is removed, never the file it points to
    _unlink_quietly(got)
    raise LlmdeskError(
        f"refused {spec.source}: the Hub client put it outside llmdesk's download cache; "
        "nothing was added (check HF_ENDPOINT and the huggingface_hub version)"
    )


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # only a cache entry; never fail a pull over it


class _hub_errors:
    """Turn huggingface_hub's exceptions into one-line LlmdeskErrors saying what to do."""

    def __init__(self, spec: HfRef):
        self.spec = spec

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype, e, tb) -> bool:
        if e is None or not isinstance(e, Exception) or isinstance(e, LlmdeskError):
            return False
        msg = self.message(e)
        if msg is None:
            return False
        raise LlmdeskError(msg) from None

    def message(self, e: Exception) -> str | None:
        from huggingface_hub import errors as he

        try:  # huggingface_hub's HTTP client (>= 1.0); connection failures come from it
            import httpx2

            transport: tuple[type[BaseException], ...] = (httpx2.TransportError,)
        except ImportError:  # pragma: no cover - another huggingface_hub generation
            transport = (ConnectionError, TimeoutError)

        s, ep = self.spec, _endpoint()
        where = f"{s.repo_id}" + (f" at revision {s.revision!r}" if s.revision else "")
        token_hint = "log in with 'hf auth login' or set HF_TOKEN"
        if isinstance(e, he.GatedRepoError):
            return f"{s.repo_id} is a gated repository: accept its terms at {s.page} and {token_hint}"
        if isinstance(e, he.RepositoryNotFoundError):
            return (
                f"repository {s.repo_id} not found on {ep} (if it is private or gated, {token_hint}); "
                f"check the name in {s.source}"
            )
        if isinstance(e, he.DisabledRepoError):
            return f"repository {s.repo_id} has been disabled on {ep}"
        if isinstance(e, he.RevisionNotFoundError):
            return f"revision {s.revision!r} not found in {s.repo_id}; check the branch, tag or commit at {s.page}"
        if isinstance(e, he.RemoteEntryNotFoundError):
            return f"file {s.filename!r} not found in {where}; see the files at {s.page}/tree/{s.revision or 'main'}"
        if isinstance(e, (*transport, he.LocalEntryNotFoundError, he.OfflineModeIsEnabled)):
            return (
                f"cannot reach {ep} to pull {s.source} ({_short(e)}); check your network connection "
                "(and HF_ENDPOINT / proxy settings), or use a model already in the store ('llmdesk list')"
            )
        if isinstance(e, he.FileMetadataError):
            return f"{ep} did not answer like the Hugging Face Hub ({_short(e)}); check HF_ENDPOINT and proxy settings"
        if isinstance(e, he.HfHubHTTPError):
            status = e.response.status_code if e.response is not None else "?"
            if status == 401 or status == 403:
                return f"access to {s.source} was refused (HTTP {status}); {token_hint} with a token that can read {s.repo_id}"
            return f"the Hub answered HTTP {status} for {s.source}; try again later"
        if isinstance(e, he.HFValidationError):
            return f"bad Hugging Face reference {s.source!r} ({_short(e)}): write {SYNTAX}"
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            return f"not enough disk space in {paths.display(_hf_cache())} to download {s.source}; free some space"
        return None


def _short(e: BaseException) -> str:
    """An exception as a short single line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
