"""The models a server holds: found by name, loaded on first use, unloaded after `keep_alive`.

    manager = ModelManager(config, metrics)
    lease = await manager.acquire("tiny.gguf", keep_alive=300)   # loads it if needed
    ... lease.model.model (a runtime Model), lease.loaded.gate ...
    lease.release()                                              # starts its keep-alive clock

A request names a model the server was started with (`-m`, by its name, file name or stem) or a
model in the store (`NAME[:TAG]`); never a path or a URL, so a client cannot make the server
open arbitrary files. Before a load, the memory it needs is compared with the memory left
(`memory.estimate_load_bytes`); idle models are unloaded (least recently used first) to make
room, and a load that still would not fit is refused with a clear error.

The embedding model of a collection (a chat request's `collection`, a search, an upload) is held
the same way (`acquire_embedder`): it counts against --max-memory, is listed with the other
loaded models, unloaded after `keep_alive`, made room for or refused by the same rule. An
encoder (BERT) is loaded with at most the context it was trained on: its positions end there.

LoRA adapters (`--lora NAME=PATH.gguf[:SCALE]`) are loaded once with each model they were made
for (`adapters_for`: llama.cpp's checks, from the files' headers), beside its weights; an adapter
no -m model can take stops the start. A request chooses them by model name (`BASE+NAME`,
`BASE+A+B`) or by an `adapters` field; `lease.adapters` is then the set its Engine requests
carry (`scheduler.start` attaches it), and other requests go on with the base in the same
batches (docs/lora.md).

Every method runs on the event loop; loads and unloads happen in a worker thread under one lock,
so two loads never race for the same memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from ..errors import LlmdeskError
from ..formats.gguf import GGUFInfo, read_gguf
from ..store import catalog
from ..store.paths import redact
from ..store.refs import ModelRef, from_entry, looks_like_path, resolve
from .config import ServeConfig
from .errors import APIError
from .memory import LoadEstimate, available_memory_bytes, estimate_load_bytes
from .metrics import Metrics

log = logging.getLogger("llmdesk.serve")

from ..formats.shape import DEFAULT_CTX  # noqa: E402  (one default for fit, the Engine and the server)


class Gate:
    """The bounded queue in front of an Engine: at most `n_slots + max_queue` generations in
    flight (running or waiting). Entered on the event loop, left from engine pump threads."""

    def __init__(self, n_slots: int, max_queue: int):
        self.n_slots = n_slots
        self.capacity = n_slots + max_queue
        self.inflight = 0
        self._lock = threading.Lock()
        self.avg_seconds = 2.0  # moving average of a generation's duration, for Retry-After

    def try_enter(self, n: int) -> bool:
        with self._lock:
            if self.inflight + n > self.capacity:
                return False
            self.inflight += n
            return True

    def leave(self, seconds: float | None = None) -> None:
        with self._lock:
            self.inflight -= 1
            if seconds is not None and seconds > 0:
                self.avg_seconds = 0.8 * self.avg_seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served n_slots at a time."""
        waves = max(1.0, (self.inflight - self.n_slots + 1) / self.n_slots)
        return int(min(60, max(1, math.ceil(self.avg_seconds * waves))))


@dataclass
class LoadedModel:
    source: ModelRef
    model: object  # runtime.model.Model
    estimate: LoadEstimate
    info: GGUFInfo
    gate: Gate
    keep_alive: float  # seconds after the last request; < 0: forever
    loaded_at: float = field(default_factory=time.time)
    active: int = 0  # leases held: requests using the model right now
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # time.monotonic(); None: never

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def expires_wall(self) -> float | None:
        if self.expires_at is None:
            return None
        return time.time() + (self.expires_at - time.monotonic())

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.expires_at = None if self.keep_alive < 0 else self.last_used + self.keep_alive


def variant_name(base: str, chosen: list) -> str:
    """What a model with LoRA adapters chosen ([(name, scale or None)]) answers as: BASE+A+B."""
    return base + "".join(f"+{n}" for n, _ in chosen)


class Lease:
    """A request's hold on a loaded model: the model is not unloaded while any lease is held."""

    def __init__(self, manager: "ModelManager", loaded: LoadedModel, chosen: list | None = None):
        self.manager = manager
        self.loaded = loaded
        self.released = False
        chosen = chosen or []  # [(adapter name, scale or None)]
        # the LoRA set for this request's Engine work (None: the base), and the name it answers as
        self.adapters = loaded.model.adapter_set(chosen) if chosen else None
        self.name = variant_name(loaded.name, chosen)

    @property
    def model(self):
        return self.loaded.model

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.loaded.active -= 1
        self.loaded.touch()
        self.manager.wake()


class ModelManager:
    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.sources: dict[str, ModelRef] = {}  # alias -> source, for the -m models
        self.started: list[ModelRef] = []  # the -m models, in order
        self.default: ModelRef | None = None
        self.loaded: dict[str, LoadedModel] = {}
        # --lora: name -> (path, scale), loaded with each model it fits (adapters_for)
        self.lora: dict[str, tuple] = dict(config.lora or {})
        self._fits: dict[str, dict[str, tuple]] = {}  # model name -> the --lora adapters it takes
        self._load_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task | None = None

    # -- names ---------------------------------------------------------------------------------
    def add_startup_model(self, ref: str) -> ModelRef:
        """Register a model given with -m (or the default model): any reference `resolve` takes."""
        found = resolve(ref)
        src = dataclasses.replace(found, path=found.path.resolve())
        self.started.append(src)
        for alias in {ref, found.name, found.path.name, found.path.stem}:
            self.sources.setdefault(alias, src)
        if found.entry is not None and found.entry.tag == catalog.DEFAULT_TAG:
            self.sources.setdefault(found.entry.name, src)
        if self.default is None:
            self.default = src
        return src

    def find(self, name: str | None) -> ModelRef:
        """The model a request names. Raises APIError 404 (400 when none is named and there is no default)."""
        if not name:
            if self.default is None:
                raise APIError(400, "no model named, and this server has no default model: set 'model' "
                                    "(GET /v1/models lists them)", param="model", code="model_not_found")
            return self.default
        if not isinstance(name, str) or len(name) > 512:
            raise APIError(400, "'model' must be a model name", param="model")
        for key in (name, name.removesuffix(":" + catalog.DEFAULT_TAG)):
            if key in self.sources:
                return self.sources[key]
            if key in self.loaded:  # a collection's embedding model, loaded from its file
                return self.loaded[key].source
        if not name.startswith("hf:") and not looks_like_path(name):
            try:
                n, tag = catalog.parse_name(name)
            except LlmdeskError:
                n, tag = None, None
            entry = catalog.get(n, tag) if n else None
            if entry is not None and entry.path.is_file():
                return from_entry(entry)
        raise APIError(404, f"model '{name}' not found: GET /v1/models (or /api/tags) lists the models "
                            "this server has", param="model", code="model_not_found")

    def find_variant(self, name: str | None, adapters=None, param: str = "adapters") -> tuple[ModelRef, list]:
        """The model and LoRA adapters a request names: `BASE+A+B` and/or an `adapters` field
        (["A", ...] or [{"name": "A", "scale": 0.5}, ...]); [(name, scale or None)] in order.
        Raises APIError 404 for a name that is not served, 400 for a malformed field."""
        names: list[str] = [] if name else list(self.config.default_adapters)  # -m BASE+ADAPTER first
        try:
            src = self.find(name)
        except APIError:
            if not isinstance(name, str) or "+" not in name:
                raise
            base, *names = name.split("+")
            src = self.find(base)
        chosen = [(n, None) for n in names] + self._adapter_field(adapters, param)
        have = list(self.adapters_for(src))
        for i, (n, _) in enumerate(chosen):
            if n not in have:
                served = (f"it has {', '.join(have)}" if have else
                          f"it takes none of {', '.join(self.lora)}" if self.lora else
                          "serve with --lora NAME=ADAPTER.gguf to load one")
                where = (f"model '{name}' not found: '{src.name}' has no LoRA adapter '{n}'" if i < len(names)
                         else f"'{param}': '{src.name}' has no LoRA adapter '{n}'")
                raise APIError(404 if i < len(names) else 400, f"{where} ({served}; GET /v1/models lists them)",
                               param="model" if i < len(names) else param, code="adapter_not_found")
            if any(m == n for m, _ in chosen[:i]):
                raise APIError(400, f"LoRA adapter '{n}' is chosen twice (in the model name and '{param}'?)",
                               param=param)
        return src, chosen

    @staticmethod
    def _adapter_field(value, param: str) -> list:
        if value is None:
            return []
        shape = f"'{param}' must be a list of adapter names or of {{\"name\": ..., \"scale\": ...}} objects"
        if not isinstance(value, list):
            raise APIError(400, shape, param=param)
        out = []
        for item in value:
            if isinstance(item, str):
                out.append((item, None))
            elif isinstance(item, dict) and isinstance(item.get("name"), str) and set(item) <= {"name", "scale"}:
                scale = item.get("scale")
                if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                          or not math.isfinite(scale)):
                    raise APIError(400, f"'{param}': the scale of '{item['name']}' must be a finite number",
                                   param=param)
                out.append((item["name"], scale))
            else:
                raise APIError(400, shape, param=param)
        return out

    def variants(self, src: ModelRef) -> list[str]:
        """The `BASE+NAME` names a request may use for `src`'s adapters."""
        return [f"{src.name}+{n}" for n in self.adapters_for(src)]

    def adapters_for(self, src: ModelRef) -> dict[str, tuple]:
        """The --lora adapters `src` takes ({name: (path, scale)}): those made for a model of its
        architecture and tensor shapes (formats.lora_gguf.lora_mismatch)."""
        if not self.lora:
            return {}
        if src.name not in self._fits:
            from ..formats.lora_gguf import lora_mismatch

            try:
                info = read_gguf(src.path)
            except LlmdeskError:
                return {}
            self._fits[src.name] = {n: (p, sc) for n, (p, sc) in self.lora.items()
                                    if lora_mismatch(read_gguf(p), info, (p.name, src.name)) is None}
        return self._fits[src.name]

    def check_lora(self) -> None:
        """Every --lora adapter fits some -m model, or the start stops in one line saying why not."""
        from ..formats.lora_gguf import lora_mismatch

        for name, (path, _scale) in self.lora.items():
            if not any(name in self.adapters_for(s) for s in self.started):
                info = read_gguf(path)
                why = "; ".join(lora_mismatch(info, read_gguf(s.path), (path.name, s.name)) or ""
                                for s in self.started)
                raise LlmdeskError(f"--lora {name}={path}: no -m model can take it as a LoRA adapter ({why})")

    def available(self) -> list[ModelRef]:
        """Every model a request may name: the -m models first (the default first of all), then the
        store, then the models loaded from elsewhere (a collection's embedding model, from its file)."""
        out = list(self.started)
        names = {s.name for s in out}
        for entry in catalog.list_models():
            if entry.ref not in names and entry.path.is_file():
                out.append(from_entry(entry))
                names.add(entry.ref)
        out += [lm.source for lm in list(self.loaded.values()) if lm.name not in names]
        return out

    def embedder_source(self, ref: str, sha256: str) -> ModelRef:
        """The embedding model a collection was built with (its reference as the collection keeps
        it, NAME:TAG or a file, and its sha256), as this server names it: a -m model or a model in
        the store with the same bytes when there is one (so it is loaded once, under one name),
        else its file. Server-side data, never a client's: a path is allowed here."""
        by_path = {s.path: s for s in self.started}
        for entry in catalog.list_models():
            if entry.sha256 == sha256 and entry.path.is_file():
                return by_path.get(entry.path.resolve()) or from_entry(entry)
        found = resolve(ref)
        path = found.path.resolve()
        if path in by_path:
            return by_path[path]
        if found.entry is None:
            taken = self.sources.get(found.name) or (self.loaded[found.name].source if found.name in self.loaded
                                                     else None)
            if taken is not None and taken.path != path:  # another file of the same name (no path shown)
                return dataclasses.replace(found, name=f"{found.name}@{sha256[:12]}", path=path)
        return dataclasses.replace(found, path=path)

    # -- leases ----------------------------------------------------------------------------------
    async def acquire(self, name: str | None, *, keep_alive: float | None = None, n_ctx: int | None = None,
                      adapters=None, adapters_param: str = "adapters") -> Lease:
        """Hold the model `name` (loading it first if needed). `n_ctx`: the request needs at
        least this many tokens per slot (Ollama's num_ctx): a model loaded with less is
        reloaded when idle. LoRA adapters named in `name` (BASE+NAME) or `adapters` (the
        request's field, `adapters_param` in errors) become `lease.adapters`."""
        src, chosen = self.find_variant(name, adapters, adapters_param)
        return await self._hold(src, chosen, keep_alive=keep_alive, n_ctx=n_ctx, adapters_param=adapters_param)

    async def acquire_embedder(self, ref: str, sha256: str, *, collection: str | None = None) -> Lease:
        """Hold the embedding model a collection was built with (`embedder_source`), loading it
        first if needed, as `acquire` holds a model a request names: counted in --max-memory,
        listed, unloaded after keep_alive. `collection` names it in a refusal."""
        src = await asyncio.to_thread(self.embedder_source, ref, sha256)
        return await self._hold(src, [], purpose=f"the embedding model of collection '{collection}'" if collection
                                else "an embedding model")

    async def _hold(self, src: ModelRef, chosen: list, *, keep_alive: float | None = None, n_ctx: int | None = None,
                    adapters_param: str = "adapters", purpose: str | None = None) -> Lease:
        lm = self.loaded.get(src.name)
        if n_ctx is not None:
            self._check_ctx(src, lm.info if lm is not None else await asyncio.to_thread(read_gguf, src.path), n_ctx)
        if lm is None or (n_ctx is not None and n_ctx > lm.n_ctx):
            async with self._load_lock:
                lm = self.loaded.get(src.name)
                if lm is not None and n_ctx is not None and n_ctx > lm.n_ctx:
                    if lm.active:
                        raise APIError(503, f"model '{src.name}' is loaded with a context of {lm.n_ctx} tokens "
                                            f"and busy; a context of {n_ctx} needs a reload when it is idle",
                                       code="model_busy", headers={"Retry-After": str(lm.gate.retry_after())})
                    await self._unload_locked(lm, "reload")
                    lm = None
                if lm is None:
                    lm = await self._load_locked(src, n_ctx, purpose)
        if keep_alive is not None:
            lm.keep_alive = keep_alive
        lm.active += 1
        try:
            return Lease(self, lm, chosen)
        except LlmdeskError as e:  # a scale out of bounds
            lm.active -= 1
            raise APIError(400, str(e), param=adapters_param) from None

    def _prepare(self, src: ModelRef, n_ctx: int | None) -> tuple[GGUFInfo, int, LoadEstimate]:
        info = read_gguf(src.path)
        if n_ctx is None:
            n_ctx = self.config.ctx or min(info.context_length or DEFAULT_CTX, DEFAULT_CTX)
            if info.metadata.get(f"{info.architecture}.attention.causal") is False and info.context_length:
                n_ctx = min(n_ctx, info.context_length)  # an encoder: no positions past its trained context
        return info, n_ctx, estimate_load_bytes(info, src.path, n_ctx=n_ctx, n_slots=self.config.parallel)

    def _open(self, src: ModelRef, info: GGUFInfo, n_ctx: int, est: LoadEstimate) -> LoadedModel:
        from ..runtime.model import Model

        cfg = self.config
        t0 = time.perf_counter()
        try:
            model = Model(src.path, name=src.name, ctx=n_ctx, threads=cfg.threads, slots=cfg.parallel,
                          template=cfg.template, gpu_layers=cfg.gpu_layers,
                          adapters=self.adapters_for(src) or None)
        except LlmdeskError as e:
            raise APIError(500, f"cannot load model '{src.name}': {redact(str(e))}", code="model_load_failed") from None
        lm = LoadedModel(src, model, est, info, Gate(cfg.parallel, cfg.max_queue), keep_alive=cfg.keep_alive)
        lm.touch()
        self.metrics.inc("llmdesk_model_loads_total", model=src.name)
        room = (f"{cfg.parallel} slots of {model.n_ctx} tokens" if model.llama.causal
                else f"an embedding model, texts of up to {model.n_ctx} tokens")  # an encoder has no slots
        log.info("loaded %s in %.1f s: %s, about %s", src.name, time.perf_counter() - t0, room, est.describe())
        return lm

    @staticmethod
    def _check_ctx(src: ModelRef, info: GGUFInfo, n_ctx: int) -> None:
        # a longer context than the model was trained on only costs memory and gives nonsense
        if info.context_length and n_ctx > info.context_length:
            raise APIError(400, f"num_ctx {n_ctx} is longer than the {info.context_length} tokens '{src.name}' was "
                                "trained on", param="options.num_ctx")

    def preload(self, src: ModelRef) -> LoadedModel:
        """Load a model before the server runs (no event loop needed): errors stop the start-up."""
        info, n_ctx, est = self._prepare(src, None)
        try:
            self._check_fits(src, est, self.free_bytes())
            lm = self._open(src, info, n_ctx, est)
        except APIError as e:  # no HTTP yet: a plain one-line error
            raise LlmdeskError(e.message) from None
        self.loaded[src.name] = lm
        return lm

    async def _load_locked(self, src: ModelRef, n_ctx: int | None, purpose: str | None = None) -> LoadedModel:
        info, n_ctx, est = await asyncio.to_thread(self._prepare, src, n_ctx)
        # idle models make room, least recently used first; but only when unloading them all
        # would make enough: a load that will be refused anyway unloads nothing
        idle = sorted((lm for lm in self.loaded.values() if lm.active == 0), key=lambda lm: lm.last_used)
        free = self.free_bytes()
        if est.total > free + sum(lm.estimate.total for lm in idle):
            self._check_fits(src, est, free, purpose)
        while est.total > self.free_bytes() and idle:
            await self._unload_locked(idle.pop(0), "memory")
        self._check_fits(src, est, self.free_bytes(), purpose)
        lm = await asyncio.to_thread(self._open, src, info, n_ctx, est)
        self.loaded[src.name] = lm
        return lm

    def free_bytes(self) -> int:
        """Memory a new model may take: under --max-memory, what the loaded models leave of it;
        else MemAvailable less the weights of loaded models (mmapped, they count as page cache)."""
        if self.config.max_memory is not None:
            return self.config.max_memory - sum(lm.estimate.total for lm in self.loaded.values())
        return available_memory_bytes() - sum(lm.estimate.weights for lm in self.loaded.values())

    def _check_fits(self, src: ModelRef, est: LoadEstimate, free: int, purpose: str | None = None) -> None:
        if est.total <= free:
            return
        from ..runtime.llama import gpu_offload

        if self.config.gpu_layers and gpu_offload():
            # the estimate is of CPU memory; offloaded layers live on the GPU, which is not checked
            log.info("%s: about %s if it were all in RAM; loading it with %d layers on the GPU",
                     src.name, est.describe(), self.config.gpu_layers)
            return
        from .config import format_bytes

        where = (f"the {format_bytes(self.config.max_memory)} of --max-memory" if self.config.max_memory is not None
                 else "free memory")
        busy = [lm.name for lm in self.loaded.values()]
        others = f" (in use by {', '.join(busy)})" if busy else ""
        self.metrics.inc("llmdesk_rejected_total", model=src.name, reason="memory")
        what = f"{purpose}, '{src.name}'," if purpose else f"model '{src.name}'"
        raise APIError(
            503,
            f"{what} would not fit: it needs about {est.describe()}, but only "
            f"{format_bytes(max(free, 0))} of {where} is left{others}; unload a model (keep_alive 0), "
            "or serve with a smaller --ctx or --parallel, or use a smaller quantization",
            code="insufficient_memory", type="server_error")

    # -- unloading -------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def unload(self, name: str, reason: str = "request") -> bool:
        """Unload `name` now if it is loaded and idle; True when it was unloaded."""
        async with self._load_lock:
            lm = self.loaded.get(name)
            if lm is None or lm.active:
                return False
            await self._unload_locked(lm, reason)
            return True

    async def _unload_locked(self, lm: LoadedModel, reason: str) -> None:
        self.loaded.pop(lm.name, None)
        await asyncio.to_thread(lm.model.close)
        self.metrics.inc("llmdesk_model_unloads_total", model=lm.name, reason=reason)
        log.info("unloaded %s (%s)", lm.name, reason)

    async def _reap(self) -> None:
        while True:
            now = time.monotonic()
            expired = [lm for lm in self.loaded.values()
                       if lm.active == 0 and lm.expires_at is not None and lm.expires_at <= now]
            for lm in expired:
                async with self._load_lock:
                    if self.loaded.get(lm.name) is lm and lm.active == 0:
                        await self._unload_locked(lm, "keep_alive")
            upcoming = [lm.expires_at for lm in self.loaded.values() if lm.expires_at is not None and lm.active == 0]
            timeout = max(0.05, min(upcoming) - time.monotonic()) if upcoming else 3600.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass

    def begin_shutdown(self, why: str = "the server is shutting down") -> None:
        """End every running and waiting request of every model as an error saying `why`, so
        streamed answers finish at once and the server can stop within seconds."""
        for lm in list(self.loaded.values()):
            lm.model.engine.abort_all(why)

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="llmdesk-keep-alive")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):
                pass
        async with self._load_lock:
            for lm in list(self.loaded.values()):
                await self._unload_locked(lm, "shutdown")
