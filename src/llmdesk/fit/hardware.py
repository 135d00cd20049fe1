"""This machine: RAM, CPU (and its peak FLOPS from clock and SIMD width), GPUs (nvidia-smi,
rocm-smi, Apple unified memory) and, measured once and cached, its memory bandwidth.

The bandwidth test is gpt-fast's question asked of the machine itself: how many bytes per second
can it stream? A numpy copy of a 256 MiB array per thread (larger than any cache), best of
several runs, counting the bytes read and written. The result is cached in
`$LLMDESK_HOME/cache/machine.json`, keyed by CPU model, core count and RAM size.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .. import atomic
from .devices import DEVICES, LocalMachine

CACHE_VERSION = 2


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_repacks() -> bool:
    """Whether llama.cpp's CPU backend repacks Q4_0/Q4_K weights here (AVX2 on x86; dotprod on ARM)."""
    flags = cpu_flags()
    return bool(flags & {"avx2", "asimddp"}) or (platform.system() == "Darwin" and platform.machine() == "arm64")


def ram() -> tuple[int, int]:
    """(total, available) bytes. Available is what can be allocated without swapping: Linux's
    MemAvailable (free memory plus the page cache and slabs the kernel can reclaim), and psutil's
    equivalent on other systems."""
    vm = psutil.virtual_memory()
    return vm.total, vm.available


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gpus() -> list[dict[str, Any]]:
    """GPUs with their memory, from nvidia-smi or rocm-smi when present."""
    found: list[dict[str, Any]] = []
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"])
    for line in (out or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            found.append({"vendor": "nvidia", "name": parts[0], "memory_bytes": int(parts[1]) << 20,
                          "free_bytes": int(parts[2]) << 20 if parts[2].isdigit() else int(parts[1]) << 20})
    out = _run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"])
    if out:
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            data = {}
        for card, d in data.items():
            if not isinstance(d, dict):
                continue
            total = int(d.get("VRAM Total Memory (B)", 0) or 0)
            used = int(d.get("VRAM Total Used Memory (B)", 0) or 0)
            if total:
                found.append({"vendor": "amd", "name": d.get("Card Series") or d.get("Card model") or card,
                              "memory_bytes": total, "free_bytes": total - used})
    return found


def apple_chip(cpu: str) -> str | None:
    """The catalog key of an Apple silicon chip ("m2-pro") from its brand string, if it is one."""
    m = re.match(r"Apple (M\d)(?: (Pro|Max|Ultra))?", cpu)
    if not m:
        return None
    key = m.group(1).lower() + (f"-{m.group(2).lower()}" if m.group(2) else "")
    return key if key in DEVICES else None


# ---------------------------------------------------------------------------------------------
# measured once, cached


def measure_bandwidth(threads: int | None = None, mib_per_thread: int = 256, repeats: int = 8) -> float:
    """Memory bandwidth in GB/s (10^9 bytes/s): numpy copies, one array per thread, read + write
    counted, best of `repeats`. Without `threads`: the best of one thread and all cores (one core
    can often stream as much as all of them, and a busy machine disturbs the parallel run more)."""
    if threads is None:
        n_all = os.cpu_count() or 1
        return max(measure_bandwidth(1, mib_per_thread, repeats),
                   measure_bandwidth(n_all, mib_per_thread, repeats) if n_all > 1 else 0.0)
    import numpy as np

    n = threads
    size = mib_per_thread << 20
    srcs = [np.ones(size, dtype=np.uint8) for _ in range(n)]
    dsts = [np.zeros(size, dtype=np.uint8) for _ in range(n)]
    best = float("inf")
    for _ in range(repeats):
        barrier = threading.Barrier(n + 1)

        def work(i: int) -> None:
            barrier.wait()
            np.copyto(dsts[i], srcs[i])  # numpy releases the GIL for the copy

        ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * size / best / 1e9


def cpu_peak_gflops(cores: int | None = None) -> float:
    """Peak FP32 FLOPS of the CPU, GFLOPS: cores x clock x FLOPs per cycle (two FMA units of the
    widest SIMD: 32 with AVX2/AVX-512 as Zen 4 issues it, 16 with NEON, 8 otherwise). llama.cpp's
    quantized matmuls use integer dot products (VNNI, dotprod), so prompt processing can exceed it."""
    n = cores or os.cpu_count() or 1
    mhz = 0.0
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            mhz = int(f.read().strip()) / 1000
    except (OSError, ValueError):
        pass
    if not mhz:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("cpu mhz"):
                        mhz = float(line.split(":", 1)[1])
                        break
        except (OSError, ValueError):
            pass
    mhz = mhz or 2500.0
    flags = cpu_flags()
    per_cycle = 32 if flags & {"avx2", "avx512f"} else 16 if flags & {"asimd", "neon"} or platform.machine() in ("arm64", "aarch64") else 8
    return n * mhz / 1000 * per_cycle


def _cache_path() -> Path:
    from ..store import paths

    return paths.cache_dir() / "machine.json"


def machine(measure: bool = True, again: bool = False) -> LocalMachine:
    """This machine. With `measure`, the bandwidth is measured on first use (a few seconds) and
    read from the cache afterwards (`again`: measure anew)."""
    cpu = cpu_name()
    cores = os.cpu_count() or 1
    total, avail = ram()
    key = f"{cpu}|{cores}|{total >> 30}"
    bw = gf = 0.0
    try:
        cache = json.loads(_cache_path().read_text())
        if cache.get("version") == CACHE_VERSION and cache.get("key") == key:
            bw, gf = float(cache["bandwidth_gbs"]), float(cache["fp32_gflops"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if again:
        bw = gf = 0.0
    if measure and not bw:
        bw, gf = measure_bandwidth(), cpu_peak_gflops()
        try:
            p = _cache_path()
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(p, json.dumps({"version": CACHE_VERSION, "key": key, "bandwidth_gbs": bw,
                                       "fp32_gflops": gf, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}))
        except OSError:
            pass
    return LocalMachine(cpu=cpu, cores=cores, ram_bytes=total, available_bytes=avail, bandwidth_gbs=bw,
                        fp32_gflops=gf, gpus=gpus(), apple_chip=apple_chip(cpu))
