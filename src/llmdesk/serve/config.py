"""What `llmdesk serve` was asked to do: one flat dataclass, and the small parsers for its values.

Durations follow Ollama's `keep_alive`: a number of seconds, or Go-style text ("5m", "1h30m",
"90s", "-1" = forever, "0" = unload right after the request).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import LlmdeskError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=list)  # -m refs; the first is the default model
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4  # slots per model: requests decoded together in one batch
    ctx: int | None = None  # tokens per slot (default: the model's, at most 4096)
    threads: int | None = None
    gpu_layers: int = 0  # layers offloaded to a GPU
    api_key: str | None = None
    insecure: bool = False  # another address than 127.0.0.1 without an API key
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request; < 0: forever
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 64  # requests per model waiting for a slot; past this: 429
    max_body_bytes: int = 8 * 1024 * 1024
    max_memory: int | None = None  # bytes all loaded models may use together (default: what is free)
    template: str | None = None  # chat template override for every model
    preload: bool = True  # load the default model at start-up
    log_prompts: bool = False  # record prompts and answers in `llmdesk logs`
    # seconds one request may take, queue and prefill included (llama.cpp's server: --timeout 600)
    request_timeout: float = 600.0
    # connection limits (serve/server.py). nginx waits 60 s for headers and 60 s between body reads;
    # shorter here: clients are local or on a LAN and send a request in milliseconds, and a slow
    # body gets more time per byte it sends. 1024 connections: nginx's sample worker_connections.
    header_timeout: float = 10.0  # seconds for a request's headers, from connect or its first byte
    body_timeout: float = 30.0  # seconds for a request's body, plus 1 s per 500 bytes received
    max_connections: int = 1024  # open at once; past it idle ones make room, or 503
    # --lora: LoRA adapters loaded with the default model, chosen per request: name -> (path, scale)
    lora: dict = field(default_factory=dict)
    # -m BASE+ADAPTER first: the --lora names a request that names no model gets (BASE+ADAPTER)
    default_adapters: list[str] = field(default_factory=list)
    # --mcp: MCP servers (tools.mcp_client.ServerConfig) whose tools requests may ask the server
    # to run (serve/agent.py); only allowed tools run: --yes (all), --allow-tool, "alwaysAllow"
    mcp_servers: list = field(default_factory=list)
    allow_tools: list[str] = field(default_factory=list)  # SERVER or SERVER/TOOL
    allow_all_tools: bool = False

    def check(self) -> None:
        """One-line errors for settings that cannot work (the CLI's flags map onto these)."""
        if self.parallel < 1:
            raise LlmdeskError(f"--parallel must be at least 1, got {self.parallel}")
        if self.ctx is not None and self.ctx < 16:
            raise LlmdeskError(f"--ctx must be at least 16 tokens, got {self.ctx}")
        if self.max_queue < 0:
            raise LlmdeskError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise LlmdeskError(f"--port must be between 0 and 65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise LlmdeskError(f"--threads must be at least 1, got {self.threads}")
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise LlmdeskError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise LlmdeskError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
        if self.max_connections < 1:
            raise LlmdeskError(f"--max-connections must be at least 1, got {self.max_connections}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise LlmdeskError("--api-key must be at least 8 characters long")
        if self.lora and not self.models:
            raise LlmdeskError("--lora needs the model its adapters were made for: add -m BASE")
        if (self.allow_tools or self.allow_all_tools) and not self.mcp_servers:
            raise LlmdeskError("--allow-tool and --yes say which MCP tools may run: they go with --mcp CONFIG.json")
        names = [s.name for s in self.mcp_servers]
        for a in self.allow_tools:
            if a.split("/", 1)[0] not in names:
                raise LlmdeskError(f"--allow-tool {a}: the MCP config has no server named {a.split('/', 1)[0]!r} "
                                   f"(its servers: {', '.join(names)}); write SERVER or SERVER/TOOL")
        if not self.is_local and not self.api_key and not self.insecure:
            raise LlmdeskError(
                f"serving on {self.host} lets anyone on the network use it: add --api-key KEY "
                "(or set LLMDESK_API_KEY), or --insecure if you really mean it"
            )

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


# the longest finite duration taken (Go's time.Duration, which Ollama parses, ends at ~292 years)
MAX_DURATION_S = 100 * 365 * 24 * 3600.0


def parse_duration(value: str | int | float | None, what: str = "keep_alive") -> float | None:
    """Seconds from `300`, `"300"`, `"5m"`, `"1h30m"`, `"-1"`; None stays None. Negative = forever."""
    if value is None:
        return None
    seconds = _parse_duration(value, what)
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        raise LlmdeskError(f"{what} must be a finite duration of at most 100 years, or \"-1\" to keep the model "
                           f"loaded forever; got {value!r}")
    return -1.0 if seconds < 0 else seconds


def _parse_duration(value: str | int | float, what: str) -> float:
    if isinstance(value, bool):
        raise LlmdeskError(f"{what} must be a duration like 300, \"5m\" or \"-1\", got {value!r}")
    if isinstance(value, (int, float)):
        return float(value) if abs(value) < 1e300 else float("inf")  # huge ints would overflow float()
    if not isinstance(value, str):
        raise LlmdeskError(f"{what} must be a duration like 300, \"5m\" or \"-1\", got {type(value).__name__}")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, pos = 0.0, 0
    for m in _PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise LlmdeskError(f"{what} must be a duration like 300, \"5m\", \"1h30m\" or \"-1\" (forever), got {value!r}")
    return sign * total


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_lora(specs: list[str]) -> dict:
    """--lora NAME=ADAPTER.gguf[:SCALE] (NAME: the file's stem when left out), each checked
    before any model loads -> {name: (path, scale)}."""
    from ..runtime.model import lora_spec

    out: dict = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or "/" in name or "\\" in name:  # a path (which may hold a '=')
            name, rest = "", spec
        path, scale = lora_spec(rest)
        name = name or path.stem
        if not _ADAPTER_NAME.fullmatch(name):
            raise LlmdeskError(f"--lora {spec}: {name!r} cannot name an adapter (letters, digits, '.', '_' and '-'); "
                               f"write --lora NAME={rest}")
        if name in out:
            raise LlmdeskError(f"--lora: two adapters are named {name!r}; name them apart with --lora NAME=ADAPTER.gguf")
        if not path.is_file():
            raise LlmdeskError(f"--lora {spec}: no such file {path}")
        out[name] = (path.resolve(), scale)
    return out


_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
               "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_size(value: str, what: str) -> int:
    """Bytes from `"8MiB"`, `"512mb"`, `"16G"`, `"1000000"`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise LlmdeskError(f"{what} must be a size like 8MiB, 512MB or 16GB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
