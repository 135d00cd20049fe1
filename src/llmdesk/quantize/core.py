"""Quantize a GGUF model with llama.cpp's quantizer (`llama_model_quantize`), safely.

    from llmdesk.quantize.core import quantize_file, QUANT_TYPES
    quantize_file("model-f16.gguf", "model-Q4_K_M.gguf", "Q4_K_M")

The quantizer runs in a child process (`python -m llmdesk.quantize._worker`) because
`llama_model_quantize` has no progress callback and cannot be stopped once started: the child
reports llama.cpp's per-tensor log lines (`[  12/ 201] blk.0.attn_q.weight ...`) as progress, and
the parent can kill it at any moment. The child writes to a hidden temporary name in the
destination folder, `.NAME.gguf.<parent pid>.part`; only the parent renames it into place, after
the whole file is written, fsynced and validated. So:

- Ctrl-C (or any exception) in the parent: the child is killed and the temporary file removed.
- kill -9 of the parent: the child notices its parent is gone within a fraction of a second,
  removes the temporary file and exits.
- kill -9 of both: a `.part` file whose owner pid is dead remains; the next quantization into
  that folder removes it. Nothing ever has the output's name until it is complete.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

from ..atomic import clean_stale_parts, fsync_dir, part_path
from ..errors import LlmdeskError


class QuantType(NamedTuple):
    ftype: int  # llama.h enum llama_ftype
    description: str  # llama.cpp's own (tools/quantize/quantize.cpp QUANT_OPTIONS)
    needs_imatrix: bool  # llama.cpp refuses to quantize without one (llama-quant.cpp tensor_requires_imatrix)


# name -> QuantType. The ftype numbers are llama.h's `enum llama_ftype` (stable: they are stored in
# every GGUF's general.file_type). needs_imatrix follows llama-quant.cpp tensor_requires_imatrix:
# IQ1/IQ2 targets, IQ3_XXS and the Q2_K tensors of a Q2_K_S file are refused without one; the
# other IQ types (IQ3_XS/S/M, IQ4_NL/XS) work without but are better with one.
QUANT_TYPES: dict[str, QuantType] = {
    "F32": QuantType(0, "32-bit float, no quantization", False),
    "F16": QuantType(1, "16-bit float; 14.00G, +0.0020 ppl @ Mistral-7B", False),
    "BF16": QuantType(32, "bfloat16; 14.00G, -0.0050 ppl @ Mistral-7B", False),
    "Q8_0": QuantType(7, "8.5 bpw; 7.96G, +0.0026 ppl @ Llama-3-8B", False),
    "Q6_K": QuantType(18, "6.56 bpw; 6.14G, +0.0217 ppl @ Llama-3-8B", False),
    "Q5_K_M": QuantType(17, "5.33G, +0.0569 ppl @ Llama-3-8B", False),
    "Q5_K_S": QuantType(16, "5.21G, +0.1049 ppl @ Llama-3-8B", False),
    "Q5_1": QuantType(9, "5.65G, +0.1062 ppl @ Llama-3-8B", False),
    "Q5_0": QuantType(8, "5.21G, +0.1316 ppl @ Llama-3-8B", False),
    "Q4_K_M": QuantType(15, "4.58G, +0.1754 ppl @ Llama-3-8B", False),
    "Q4_K_S": QuantType(14, "4.37G, +0.2689 ppl @ Llama-3-8B", False),
    "Q4_1": QuantType(3, "4.78G, +0.4511 ppl @ Llama-3-8B", False),
    "Q4_0": QuantType(2, "4.34G, +0.4685 ppl @ Llama-3-8B", False),
    "IQ4_NL": QuantType(25, "4.50 bpw non-linear quantization", False),
    "IQ4_XS": QuantType(30, "4.25 bpw non-linear quantization", False),
    "Q3_K_L": QuantType(13, "4.03G, +0.5562 ppl @ Llama-3-8B", False),
    "Q3_K_M": QuantType(12, "3.74G, +0.6569 ppl @ Llama-3-8B", False),
    "Q3_K_S": QuantType(11, "3.41G, +1.6321 ppl @ Llama-3-8B", False),
    "IQ3_M": QuantType(27, "3.66 bpw quantization mix", False),
    "IQ3_S": QuantType(26, "3.44 bpw quantization", False),
    "IQ3_XS": QuantType(22, "3.3 bpw quantization", False),
    "IQ3_XXS": QuantType(23, "3.06 bpw quantization", True),
    "Q2_K": QuantType(10, "2.96G, +3.5199 ppl @ Llama-3-8B", False),
    "Q2_K_S": QuantType(21, "2.96G, +3.1836 ppl @ Llama-3-8B", True),
    "IQ2_M": QuantType(29, "2.7 bpw quantization", True),
    "IQ2_S": QuantType(28, "2.5 bpw quantization", True),
    "IQ2_XS": QuantType(20, "2.31 bpw quantization", True),
    "IQ2_XXS": QuantType(19, "2.06 bpw quantization", True),
    "IQ1_M": QuantType(31, "1.75 bpw quantization", True),
    "IQ1_S": QuantType(24, "1.56 bpw quantization", True),
    "TQ2_0": QuantType(37, "2.06 bpw ternarization (for ternary models only)", False),
    "TQ1_0": QuantType(36, "1.69 bpw ternarization (for ternary models only)", False),
}
# llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

GGML_TYPE_F16 = 1  # ggml.h enum ggml_type

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, tensor name)


def quant_type(type_name: str) -> tuple[str, QuantType]:
    """The canonical name and QuantType for a user-typed name (any case, aliases allowed)."""
    name = type_name.strip().upper()
    name = ALIASES.get(name, name)
    qt = QUANT_TYPES.get(name)
    if qt is None:
        plain = [n for n, q in QUANT_TYPES.items() if not q.needs_imatrix]
        need = [n for n, q in QUANT_TYPES.items() if q.needs_imatrix]
        raise LlmdeskError(
            f"unknown quantization type {type_name!r}: valid types are {', '.join(plain)}; "
            f"and with an importance matrix (--imatrix) {', '.join(need)}"
        )
    return name, qt


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    type_name: str,
    *,
    imatrix: str | os.PathLike | None = None,
    threads: int | None = None,
    keep_output_f16: bool = False,
    allow_requantize: bool = False,
    progress: Progress | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Quantize the GGUF model `src` to `type_name`, writing `dst` atomically. Returns `dst`.

    `imatrix`: an importance matrix file (GGUF or legacy .dat, from `llmdesk imatrix` or
    llama-imatrix); required for the types whose QUANT_TYPES entry says so. `keep_output_f16`
    keeps the output projection (or the tied embeddings) in F16. `progress(done, total, name)` is
    called per tensor. `before_rename(tmp)` is called with the complete, validated temporary
    file just before it is renamed to `dst` (the store registers it there, so that a model never
    has its final name without its catalog entry). Raises LlmdeskError (one line) for bad input
    or a failed quantization.
    """
    from ..formats.gguf import read_gguf

    name, qt = quant_type(type_name)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    info = read_gguf(src)  # a bad or missing file is a one-line error before anything runs
    if qt.needs_imatrix and imatrix is None:
        raise LlmdeskError(
            f"{name} needs an importance matrix: make one with 'llmdesk imatrix MODEL TEXT -o imatrix.gguf' "
            f"and pass --imatrix imatrix.gguf (or choose a type such as Q4_K_M, IQ4_XS or Q3_K_M)"
        )
    quantized = sorted({t.type_name for t in info.tensors if len(t.shape) >= 2} - {"F32", "F16", "BF16"})
    if quantized and not allow_requantize:
        raise LlmdeskError(
            f"{src.name} is already quantized ({info.file_type or ', '.join(quantized)}); "
            "quantize from the F16/BF16/F32 model instead (requantizing loses more quality)"
        )
    if imatrix is not None:
        from .imatrix_file import load_imatrix

        load_imatrix(imatrix)  # a bad file is a one-line error here, not a failure in the child
    if dst.exists() and dst.is_dir():
        raise LlmdeskError(f"{dst}: is a directory; give the output file name (e.g. {dst / (src.stem + '-' + name + '.gguf')})")
    if dst.resolve() == src.resolve():
        raise LlmdeskError(f"{dst}: the output would overwrite the input; choose another -o")
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_parts(dst.parent)

    tmp = part_path(dst)
    job = {
        "src": str(src), "tmp": str(tmp), "ftype": qt.ftype, "type": name,
        "imatrix": str(Path(imatrix).expanduser()) if imatrix is not None else None,
        "threads": threads or 0, "keep_output_f16": keep_output_f16,
        "allow_requantize": allow_requantize, "parent": os.getpid(),
    }
    rfd, wfd = os.pipe()
    proc = None
    # the child's stderr goes to a file, not a pipe: a pipe nobody reads while we follow the
    # messages could fill up and stall it
    errlog = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmdesk.quantize._worker", json.dumps(job), str(wfd)],
            pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
            # its own session: a Ctrl-C in the terminal reaches only the parent, which stops it
            start_new_session=True,
        )
        os.close(wfd)
        wfd = -1
        error = _follow(proc, rfd, progress)
        rc = proc.wait()
        errlog.seek(0)
        stderr = errlog.read().decode("utf-8", "replace")
        if rc != 0 or error:
            why = error or (stderr.strip().splitlines() or [f"the quantizer exited with code {rc}"])[-1]
            raise LlmdeskError(f"{src.name}: llama.cpp could not quantize it to {name}: {why}")
        read_gguf(tmp)  # the result is a valid GGUF before it gets its name
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        errlog.close()
    return dst


def _follow(proc: subprocess.Popen, rfd: int, progress: Progress | None) -> str:
    """Read the child's messages until it closes the pipe. Returns its error message, if any."""
    error = ""
    total = 0
    buf = b""
    with os.fdopen(os.dup(rfd), "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "progress" in msg and progress is not None:
                    done, total, tensor = msg["progress"]
                    progress(done, total, tensor)
                elif "done" in msg and progress is not None and total:
                    progress(total, total, "")
                elif "error" in msg:
                    error = msg["error"]
    return error


def default_output(src: Path, type_name: str) -> Path:
    """`model-f16.gguf` + Q4_K_M -> `model-Q4_K_M.gguf` next to it (a known type suffix is replaced)."""
    stem = src.name[:-5] if src.name.lower().endswith(".gguf") else src.name
    m = re.search(r"[.\-_](f32|f16|bf16|fp16|fp32|i?q\d(_[a-z0-9]+)*)$", stem, re.IGNORECASE)
    if m:
        stem = stem[: m.start()]
    return src.with_name(f"{stem}-{type_name}.gguf")
