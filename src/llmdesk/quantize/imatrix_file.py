"""Importance-matrix files, as llama.cpp's `llama-imatrix` writes and `llama-quantize` reads them.

An importance matrix holds, for each weight matrix W (n_in x n_out) of the model, the mean of
x_j**2 over the calibration tokens for each input column j: the columns whose inputs are large
matter more, and the IQ/K quantizers weight their rounding error by it.

GGUF format (llama.cpp >= b5900; reader: common/imatrix-loader.cpp, writer: tools/imatrix):

    general.type          "imatrix"
    imatrix.datasets      [str]   calibration files
    imatrix.chunk_count   u32     chunks of text evaluated
    imatrix.chunk_size    u32     tokens per chunk
    <weight>.in_sum2      f32 (n_in, n_mat)   sum of x**2 per input column (n_mat = experts, else 1)
    <weight>.counts       f32 (1, n_mat)      tokens summed

Legacy `.dat` format (little-endian): int32 n_entries, then per entry int32 name length, name,
int32 ncall, int32 n_values, float32 values (mean x**2 times ncall); then optionally int32 chunk
count, int32 dataset-name length, dataset name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import LlmdeskError


@dataclass
class Imatrix:
    # weight name -> (sums (n_mat, n_in) float64, counts (n_mat,) int64)
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self) -> dict[str, np.ndarray]:
        """Weight name -> mean x**2 per input column, flattened, float32: what llama.cpp's
        quantizer takes (quantize.cpp load_imatrix: sums / counts, 1 where nothing was seen)."""
        out: dict[str, np.ndarray] = {}
        for name, (sums, counts) in self.entries.items():
            c = counts.astype(np.float64)[:, None]
            mean = np.where(c > 0, sums / np.where(c > 0, c, 1), 1.0)
            out[name] = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        return out


def save_imatrix(im: Imatrix, path: str | os.PathLike) -> Path:
    """Write `im` in llama.cpp's GGUF imatrix format (or the legacy format for a `.dat` name),
    atomically: a temporary name in the same folder, renamed at the end."""
    import gguf

    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".dat":
            _save_legacy(im, tmp)
        else:
            w = gguf.GGUFWriter(str(tmp), arch="imatrix")
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", list(im.datasets))
            w.add_uint32("imatrix.chunk_count", im.chunk_count)
            w.add_uint32("imatrix.chunk_size", im.chunk_size)
            for name in sorted(im.entries):  # deterministic order, as llama-imatrix
                sums, counts = im.entries[name]
                w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums, dtype=np.float32))
                w.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    return path


def _save_legacy(im: Imatrix, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(im.entries)))
        for name in sorted(im.entries):
            sums, counts = im.entries[name]
            ncall = int(counts.max()) if counts.size else 0
            # the legacy file stores mean * ncall (llama-imatrix's old convention)
            mean = im.values()[name] if ncall else np.ones(sums.size, np.float32)
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw)
            f.write(struct.pack("<ii", max(ncall, 1), sums.size))
            f.write((mean * max(ncall, 1)).astype("<f4").tobytes())
        ds = (im.datasets[0] if im.datasets else "").encode()
        f.write(struct.pack("<ii", im.chunk_count, len(ds)) + ds)


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an importance matrix (GGUF or legacy .dat); raises LlmdeskError in one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LlmdeskError(f"{path}: no such importance matrix file (make one with 'llmdesk imatrix MODEL TEXT -o FILE')")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    except LlmdeskError:
        raise
    except (ValueError, KeyError, IndexError, struct.error, OSError) as e:
        raise LlmdeskError(f"{path}: not a readable importance matrix ({type(e).__name__}: {e})") from None
    if not im.entries:
        raise LlmdeskError(f"{path}: the importance matrix has no entries")
    for name, (sums, _) in im.entries.items():
        if not np.all(np.isfinite(sums)):
            raise LlmdeskError(f"{path}: the importance matrix has non-finite values for {name}; compute it again")
    return im


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(str(path))
    im = Imatrix()
    fields = r.fields
    if "imatrix.datasets" in fields:
        fd = fields["imatrix.datasets"]
        im.datasets = [bytes(fd.parts[i]).decode("utf-8", "replace") for i in fd.data]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if key in fields:
            setattr(im, attr, int(fields[key].parts[fields[key].data[0]][0]))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            n_in = int(t.shape[0])
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float64).reshape(-1, n_in)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.rint(np.asarray(t.data, dtype=np.float64).reshape(-1)).astype(np.int64)
    for name, s in sums.items():
        if name not in counts or counts[name].size != s.shape[0]:
            raise LlmdeskError(f"{path}: mismatched sums and counts for {name}; compute the importance matrix again")
        im.entries[name] = (s, counts[name])
    return im


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    (n,) = take("<i")
    if n < 1 or n > len(data) // 12:
        raise LlmdeskError(f"{path}: neither a GGUF nor a legacy .dat importance matrix")
    im = Imatrix()
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 < ln <= 1024:
            raise LlmdeskError(f"{path}: corrupt legacy importance matrix (name length {ln})")
        name = data[pos : pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise LlmdeskError(f"{path}: corrupt or truncated legacy importance matrix at {name}")
        vals = np.frombuffer(data, "<f4", nval, pos).astype(np.float64)
        pos += 4 * nval
        # stored mean * ncall; as sums/counts that is sums = mean * ncall, counts = ncall
        im.entries[name] = (vals.reshape(1, -1), np.array([max(ncall, 0)], np.int64))
        if ncall <= 0:  # no calls recorded: the values are taken as they are (quantize.cpp)
            im.entries[name] = (vals.reshape(1, -1), np.array([1], np.int64))
    if pos + 8 <= len(data):
        chunks, ln = take("<ii")
        im.chunk_count = chunks
        if 0 < ln <= len(data) - pos:
            im.datasets = [data[pos : pos + ln].decode("utf-8", "replace")]
    return im
