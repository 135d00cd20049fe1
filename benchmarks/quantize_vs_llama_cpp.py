"""llmdesk's quantize_file against llama.cpp's llama_model_quantize called directly, side by side.

    python benchmarks/quantize_vs_llama_cpp.py MODEL-f16.gguf [--types Q8_0,Q4_K_M,Q2_K] [--threads N]

For each type: the wall time of both (llmdesk runs the quantizer in a child process for progress
and safe interruption; this measures what that costs) and whether the two files are identical
byte for byte (they must be: the same C function with the same parameters). Without MODEL a
random 4 x 1024 Llama model is written first. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import tempfile
import time
from pathlib import Path


_quiet = None


def direct(src: Path, dst: Path, ftype: int, threads: int) -> float:
    global _quiet
    import llama_cpp as C

    if _quiet is None:  # llama.cpp's per-tensor log, as llmdesk's worker swallows it too
        _quiet = C.llama_log_callback(lambda level, text, user: None)
        C.llama_log_set(_quiet, ctypes.c_void_p(0))
    C.llama_backend_init()
    p = C.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, threads
    t0 = time.perf_counter()
    rc = C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    return time.perf_counter() - t0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llmdesk.quantize.core import QUANT_TYPES, quant_type, quantize_file

    work = Path(tempfile.mkdtemp(prefix="llmdesk-qbench-"))
    src = args.model
    if src is None:
        from llmdesk.formats.synth import SynthConfig, write_llama_gguf

        src = write_llama_gguf(work / "random-4x1024.gguf",
                               SynthConfig(n_layer=4, n_embd=1024, n_head=8, n_head_kv=4, n_ff=2816, weight_std=0.05))
    size = src.stat().st_size
    print(f"{src.name}: {size / 1e6:.1f} MB, {args.threads} threads")
    print(f"{'type':8} {'llama.cpp s':>12} {'llmdesk s':>10} {'overhead s':>11} {'MB/s (llmdesk)':>15}  identical")
    for t in args.types.split(","):
        name, _ = quant_type(t)
        a, b = work / f"direct-{name}.gguf", work / f"llmdesk-{name}.gguf"
        td = direct(src, a, QUANT_TYPES[name].ftype, args.threads)
        t0 = time.perf_counter()
        quantize_file(src, b, name, threads=args.threads)
        tl = time.perf_counter() - t0
        same = sha(a) == sha(b)
        print(f"{name:8} {td:12.2f} {tl:10.2f} {tl - td:11.2f} {size / 1e6 / tl:15.1f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
