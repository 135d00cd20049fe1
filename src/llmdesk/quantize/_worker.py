"""The child process that runs `llama_model_quantize` for quantize_file (see core.py).

    python -m llmdesk.quantize._worker JOB_JSON FD

Messages to the parent are JSON lines on file descriptor FD: {"progress": [done, total, name]}
per tensor (parsed from llama.cpp's log), {"error": "..."} if llama.cpp fails. A watchdog thread
removes the output and exits as soon as the parent is gone (kill -9), so a killed quantization
leaves nothing behind. LLMDESK_TEST_QUANTIZE_PAUSE=SECONDS slows each tensor down, for the tests
that interrupt a quantization mid-way.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import threading
import time

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FAILED = re.compile(r"failed to quantize: (.*)")


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    out = os.fdopen(int(argv[1]), "w", buffering=1)
    tmp = job["tmp"]
    pause = float(os.environ.get("LLMDESK_TEST_QUANTIZE_PAUSE", "0") or 0)

    def send(msg: dict) -> None:
        try:
            out.write(json.dumps(msg) + "\n")
        except (BrokenPipeError, OSError):
            _die(tmp)

    def watchdog() -> None:
        while True:
            if os.getppid() != job["parent"]:  # reparented: the parent was killed
                _die(tmp)
            time.sleep(0.1)

    threading.Thread(target=watchdog, daemon=True).start()

    import llama_cpp as C

    errors: list[str] = []

    @C.llama_log_callback
    def on_log(level: int, text: bytes, _user) -> None:
        msg = text.decode("utf-8", "replace")
        m = _TENSOR_LINE.match(msg)
        if m:
            send({"progress": [int(m[1]) - 1, int(m[2]), m[3]]})
            if pause:
                time.sleep(pause)
        f = _FAILED.search(msg)
        if f:
            errors.append(f[1].strip())

    C.llama_log_set(on_log, ctypes.c_void_p(0))
    C.llama_backend_init()

    params = C.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = int(job["threads"] or 0)
    params.allow_requantize = bool(job["allow_requantize"])
    if job["keep_output_f16"]:
        params.output_tensor_type = 1  # GGML_TYPE_F16; llama.cpp applies it to tied embeddings too
    keep_alive = []
    if job["imatrix"]:
        keep_alive = _imatrix_params(params, job["imatrix"], C)

    rc = C.llama_model_quantize(job["src"].encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        send({"error": errors[-1] if errors else f"llama_model_quantize returned {rc}"})
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return 1
    send({"done": True})
    del keep_alive
    return 0


def _imatrix_params(params, path: str, C) -> list:
    """Point params.imatrix at an array of llama_model_imatrix_data {name, data, size}, ended by
    a null name (as tools/quantize/quantize.cpp builds it), and record the file in the output's
    metadata (quantize.imatrix.*). Returns what must stay alive until the quantization is done."""
    import numpy as np

    from .imatrix_file import load_imatrix

    im = load_imatrix(path)
    values = im.values()
    arr = (C.llama_model_imatrix_data * (len(values) + 1))()
    keep: list = [arr]
    for i, (name, v) in enumerate(values.items()):
        v = np.ascontiguousarray(v, dtype=np.float32)
        raw = name.encode()
        keep += [v, raw]
        arr[i].name = raw
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(values)].name = None
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))

    kvs = (C.llama_model_kv_override * 4)()
    kvs[0].key = b"quantize.imatrix.file"
    kvs[0].tag = C.LLAMA_KV_OVERRIDE_TYPE_STR
    kvs[0].value.val_str = os.path.basename(path).encode()[:127]
    kvs[1].key = b"quantize.imatrix.entries_count"
    kvs[1].tag = C.LLAMA_KV_OVERRIDE_TYPE_INT
    kvs[1].value.val_i64 = len(values)
    kvs[2].key = b"quantize.imatrix.chunks_count"
    kvs[2].tag = C.LLAMA_KV_OVERRIDE_TYPE_INT
    kvs[2].value.val_i64 = im.chunk_count
    kvs[3].key = b""  # terminator
    params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(C.llama_model_kv_override))
    keep.append(kvs)
    return keep


def _die(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
