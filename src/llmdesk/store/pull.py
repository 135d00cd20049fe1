"""`llmdesk pull hf:OWNER/REPO/FILE.gguf[@REVISION]`: download a GGUF file from the Hugging Face
Hub and add it to the store.

huggingface_hub does the transfer: retries and resumes within a run (HTTP ranges, or Xet chunks),
checks the size, shows a progress bar, writes to a temporary name and renames. It downloads into
llmdesk's own cache (`home()/cache/huggingface`); the file is then validated and registered with
`catalog.add_file` (a hard link, so no second copy) and the cache's copy is dropped, so the store
is the one owner of the bytes and `llmdesk rm` frees the space.

Pulling a model that is already in the store asks the Hub for the file's ETag (the sha256 of an
LFS file) and downloads only when it changed. `HF_HUB_OFFLINE=1` pulls nothing: a model already
in the store is returned, anything else is an error (and the Hub is not contacted at all). `HF_ENDPOINT` (a mirror) and `HF_TOKEN`
(gated and private repositories) are read when `pull` is called.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadModelFile, LlmdeskError
from . import catalog, paths

PREFIX = "hf:"
SYNTAX = "hf:OWNER/REPO/FILE.gguf (optionally @REVISION), e.g. hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"

# the Hub's rule for user, organisation and repository names (huggingface_hub REPO_ID_REGEX)
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REF_RE = re.compile(
    rf"(?P<owner>{_REPO_PART})/(?P<repo>{_REPO_PART})/(?P<file>[^@]*?\.gguf)(?:@(?P<revision>.+))?",
    re.IGNORECASE,
)
_TRUE = {"1", "on", "yes", "true"}


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
    """`hf:OWNER/REPO/FILE.gguf[@REVISION]` -> HfRef; anything else is a one-line LlmdeskError."""
    body = ref.removeprefix(PREFIX) if ref.startswith(PREFIX) else None
    m = _REF_RE.fullmatch(body) if body else None
    if m is None or "--" in m["repo"] or ".." in m["repo"]:
        raise LlmdeskError(f"bad Hugging Face reference {ref!r}: write {SYNTAX}")
    parts = m["file"].split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise LlmdeskError(f"bad file path {m['file']!r} in {ref!r}: write {SYNTAX}")
    return HfRef(f"{m['owner']}/{m['repo']}", m["file"], m["revision"])


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
    etag = _remote_etag(spec)
    if existing is not None and etag == existing.sha256:
        return existing  # up to date
    path = _download(spec, progress)

    name, tag = catalog.names_from_filename(spec.filename)
    try:
        return catalog.add_file(path, name, tag, source=spec.source, progress=progress)
    except BadModelFile as e:
        raise BadModelFile(f"{spec.source} is not a usable GGUF model: {e}") from None
    finally:
        _drop_cached(path)


# ---------------------------------------------------------------------------------------------
# talking to the Hub


def _endpoint() -> str:
    import huggingface_hub.constants as hc

    return (os.environ.get("HF_ENDPOINT") or hc.ENDPOINT).rstrip("/")


def _offline() -> bool:
    import huggingface_hub.constants as hc

    return hc.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hf_cache() -> Path:
    return paths.cache_dir() / "huggingface"


def _remote_etag(spec: HfRef) -> str | None:
    """The file's ETag (for LFS files, the sha256 of its content). One quick HEAD request, no
    retries, so that an unreachable Hub fails fast with a clear message."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(spec.repo_id, spec.filename, revision=spec.revision, endpoint=_endpoint())
    with _hub_errors(spec):
        return get_hf_file_metadata(url, endpoint=_endpoint()).etag


def _download(spec: HfRef, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download

    with _hub_errors(spec):
        got = hf_hub_download(
            spec.repo_id,
            spec.filename,
            revision=spec.revision,
            cache_dir=_hf_cache(),
            endpoint=_endpoint(),
            library_name="llmdesk",
            tqdm_class=None if progress else _silent_tqdm(),
        )
    return Path(got)


def _drop_cached(path: Path) -> None:
    """Remove a downloaded file from llmdesk's Hub cache: the blob and the snapshot link to it."""
    cache = _hf_cache().resolve()
    for p in (path.resolve(), path):  # the blob, then the link (hf_hub_download returns the link)
        if cache in p.parents:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass  # only a cache; never fail a pull over it


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
