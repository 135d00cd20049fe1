"""GGUF validation and metadata, in pure Python, before llama.cpp ever opens the file.

llama.cpp trusts the lengths and counts in a GGUF header: a truncated download or a hostile file can
make it crash or try to allocate without bound. This module reads only the header (never the tensor
data), checks every length and count against the bytes left in the file before it allocates or
loops, and checks each tensor's type, shape, alignment and extent. Every problem is one line:
`BadModelFile("model.gguf: <what is wrong> (<what to do>)")`.

File layout (GGUF v2/v3, little-endian; spec: ggml/docs/gguf.md, C reader: ggml/src/gguf.cpp):

    magic          4 bytes   b"GGUF"
    version        uint32    2 or 3 (version 1 had 32-bit counts; llama.cpp no longer reads it)
    tensor_count   uint64
    kv_count       uint64
    kv_count x     key: string, value_type: uint32, value
    tensor_count x name: string, n_dims: uint32, ne: n_dims x uint64 (ne0 first),
                   ggml_type: uint32, offset: uint64 (relative to the data start)
    padding        up to a multiple of general.alignment (default 32)
    tensor data    tensor i at data_start + offset_i, offset_i % alignment == 0

    string = uint64 byte length + utf-8 bytes (no NUL)
    value  = a scalar of value_type (0..12, below), a string, or
             an array: item_type uint32, count uint64, count items (arrays may nest, boundedly)
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from llmdesk.errors import BadModelFile, ModelNotFound

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml_tensor.name is char[64], so a tensor name has at most 63 bytes
MAX_KEY_BYTES = 65535  # the spec: a key is at most 2**16 - 1 bytes
MAX_ARRAY_DEPTH = 3  # llama.cpp reads no nested arrays at all; allow a little, never unbounded
MAX_ARRAY_ITEMS = 1 << 24  # 16M items: ~60x the largest tokenizer vocabulary in use
MAX_KV_COUNT = 1 << 20
MAX_TENSOR_COUNT = 1 << 24
INT64_MAX = (1 << 63) - 1

# Smallest possible encodings, used to bound counts by the bytes left before looping over them.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8  # name length, 1-byte name, n_dims = 0, type, offset

# GGUF value types (gguf.GGUFValueType, the ids the spec gives): id -> (name, little-endian struct
# format). STRING and ARRAY are variable-length and read by hand.
VT = gguf.GGUFValueType
STRING, ARRAY, BOOL = int(VT.STRING), int(VT.ARRAY), int(VT.BOOL)
SCALARS: dict[int, tuple[str, struct.Struct]] = {
    int(vtype): (vtype.name.lower(), struct.Struct("<" + fmt))
    for vtype, fmt in [
        (VT.UINT8, "B"), (VT.INT8, "b"), (VT.UINT16, "H"), (VT.INT16, "h"), (VT.UINT32, "I"), (VT.INT32, "i"),
        (VT.FLOAT32, "f"), (VT.BOOL, "?"), (VT.UINT64, "Q"), (VT.INT64, "q"), (VT.FLOAT64, "d"),
    ]
}
# arrays of scalars are read with one read + numpy (bools as bytes: any nonzero byte is true)
ARRAY_DTYPES = {vtype: np.dtype("<" + ("B" if vtype == BOOL else st.format[1])) for vtype, (_, st) in SCALARS.items()}

# ggml tensor types: id -> (name, elements per block, bytes per block), from the gguf package
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES
}

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")

# what to do, appended to each problem
TRUNCATED = "the download may be incomplete; pull it again"
CORRUPT = "the file is corrupt; download or convert it again"
TRUNCATED_OR_CORRUPT = "the file is truncated or corrupt; pull it again"

# first bytes of files people mistake for GGUF models
FOREIGN_FORMATS = [
    (b"PK\x03\x04", "a zip archive, e.g. a PyTorch checkpoint; convert it to GGUF first"),
    (b"lmgg", "an old GGML model, which llama.cpp no longer reads; convert the original weights to GGUF"),
    (b"fmgg", "an old GGMF model, which llama.cpp no longer reads; convert the original weights to GGUF"),
    (b"tjgg", "an old GGJT model, which llama.cpp no longer reads; convert the original weights to GGUF"),
    (b"version https://git-lfs", "a Git LFS pointer, not the model; download the real file"),
    (b"<!DOCTYPE", "a web page, not a model; check the download URL"),
    (b"<html", "a web page, not a model; check the download URL"),
    (b"{", "a JSON file, not a model; give the path of the .gguf file"),
]


def _shown(path: str | Path) -> str:
    """A path for a one-line message: as is, or escaped if it has newlines or other controls."""
    return str(path) if str(path).isprintable() else repr(str(path))


def _q(s: str, limit: int = 80) -> str:
    """A file-supplied string, quoted, escaped onto one line and cut to a readable length."""
    return repr(s if len(s) <= limit else s[: limit - 3] + "...")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the contiguous dimension) first
    type_name: str  # "F32", "Q4_K", ...
    ggml_type: int
    offset: int  # absolute offset of the tensor's data in the file
    n_elements: int
    nbytes: int


@dataclass
class GGUFInfo:
    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int  # absolute offset of the tensor data section
    metadata: dict[str, Any] = field(repr=False)  # arrays as lists
    tensors: list[TensorInfo] = field(repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _str(self, key: str) -> str | None:
        v = self.metadata.get(key)
        return v if isinstance(v, str) else None

    def _arch_int(self, name: str) -> int | None:
        """`{arch}.{name}` as an int; per-layer arrays (e.g. OpenELM's head counts) give their largest."""
        arch = self.architecture
        v = self.metadata.get(f"{arch}.{name}") if arch else None
        if isinstance(v, list):
            v = max((x for x in v if type(x) is int), default=None)
        return v if type(v) is int else None

    @property
    def architecture(self) -> str | None:
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        return self._str("general.name")

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def file_type(self) -> str | None:
        """general.file_type as llama.cpp's quantization name: "F32", "F16", "Q8_0", "Q4_K_M", ..."""
        v = self.metadata.get("general.file_type")
        if type(v) is not int:
            return None
        try:
            name = gguf.LlamaFileType(v).name
        except ValueError:
            return f"unknown ({v})"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")

    @property
    def bits_per_weight(self) -> float:
        n = self.parameter_count
        return 8 * sum(t.nbytes for t in self.tensors) / n if n else 0.0

    @property
    def tensor_type_mix(self) -> dict[str, int]:
        """Tensor type name -> number of tensors of that type, most common first."""
        mix: dict[str, int] = {}
        for t in self.tensors:
            mix[t.type_name] = mix.get(t.type_name, 0) + 1
        return dict(sorted(mix.items(), key=lambda kv: -kv[1]))

    @property
    def tensor_type_bytes(self) -> dict[str, int]:
        """Tensor type name -> bytes of tensor data of that type, largest first."""
        mix: dict[str, int] = {}
        for t in self.tensors:
            mix[t.type_name] = mix.get(t.type_name, 0) + t.nbytes
        return dict(sorted(mix.items(), key=lambda kv: -kv[1]))

    @property
    def context_length(self) -> int | None:
        return self._arch_int("context_length")

    @property
    def block_count(self) -> int | None:
        return self._arch_int("block_count")

    @property
    def head_count(self) -> int | None:
        return self._arch_int("attention.head_count")

    @property
    def head_count_kv(self) -> int | None:
        kv = self._arch_int("attention.head_count_kv")
        return kv if kv is not None else self.head_count

    @property
    def embedding_length(self) -> int | None:
        return self._arch_int("embedding_length")

    @property
    def feed_forward_length(self) -> int | None:
        return self._arch_int("feed_forward_length")

    @property
    def vocab_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return len(tokens) if isinstance(tokens, list) else self._arch_int("vocab_size")

    @property
    def tokenizer_model(self) -> str | None:
        return self._str("tokenizer.ggml.model")

    @property
    def special_tokens(self) -> dict[str, str]:
        """{"bos": "<s>", "eos": "</s>", ...} from the tokenizer.ggml.*_token_id keys that name a real token."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            return {}
        short = {"unknown": "unk", "seperator": "sep", "separator": "sep", "padding": "pad"}
        out: dict[str, str] = {}
        for key, v in self.metadata.items():
            if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
                role = key[len("tokenizer.ggml.") : -len("_token_id")]
                # like llama.cpp, an id outside the vocabulary is ignored, not an error
                if type(v) is int and 0 <= v < len(tokens) and isinstance(tokens[v], str):
                    out[short.get(role, role)] = tokens[v]
        return out

    @property
    def chat_template(self) -> str | None:
        return self._str("tokenizer.chat_template")


# ---------------------------------------------------------------------------------------------
# The bounded reader: every read is checked against the bytes left in the file first


class _Reader:
    def __init__(self, f: BinaryIO, size: int, name: str):
        self.f, self.size, self.name, self.pos = f, size, name, 0

    def fail(self, problem: str, hint: str = CORRUPT) -> BadModelFile:
        return BadModelFile(f"{self.name}: {problem} ({hint})")

    def need(self, n: int, what: str) -> None:
        """Fail unless `n` more bytes are left: call before reading, allocating or looping."""
        if n > self.size - self.pos:
            # more than the whole file is an absurd length or count, not just a cut download
            absurd = n > self.size
            raise self.fail(f"{'corrupt or truncated' if absurd else 'truncated'}: {what} needs {n} bytes "
                            f"at byte {self.pos} but the file has {self.size} bytes",
                            TRUNCATED_OR_CORRUPT if absurd else TRUNCATED)

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise self.fail(f"truncated: the file ended at byte {self.pos + len(data)} while reading {what}", TRUNCATED)
        self.pos += n
        return data

    def u32(self, what: str) -> int:
        return U32.unpack(self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return U64.unpack(self.read(8, what))[0]

    def string(self, what: str, limit: int | None = None, strict: bool = True) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            self.need(n, what)  # a length past the end is reported as such
            raise self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if not strict:  # token texts: llama.cpp does not validate them, neither do we
                return raw.decode("utf-8", errors="replace")
            raise self.fail(f"{what} is not valid UTF-8 ({raw[:32]!r})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in SCALARS:
            st = SCALARS[vtype][1]
            return st.unpack(self.read(st.size, what))[0]
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype} (GGUF types are 0..12)")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        itype = self.u32(f"item type of {what}")
        count = self.u64(f"item count of {what}")
        if itype in SCALARS:
            item_bytes = SCALARS[itype][1].size
        elif itype in (STRING, ARRAY):
            item_bytes = 8 if itype == STRING else 12  # at least a length, or a type and a count
        else:
            raise self.fail(f"{what} is an array of unknown value type {itype} (GGUF types are 0..12)")
        self.need(count * item_bytes, f"{what} ({count} items)")
        if count > MAX_ARRAY_ITEMS:
            raise self.fail(f"{what} has {count} items (at most {MAX_ARRAY_ITEMS} allowed)")
        if itype in SCALARS:  # one read for the whole array
            arr = np.frombuffer(self.read(count * item_bytes, what), dtype=ARRAY_DTYPES[itype])
            return (arr != 0).tolist() if itype == BOOL else arr.tolist()
        if itype == STRING:
            return [self.string(what, strict=False) for _ in range(count)]
        return [self.value(ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Reading and checking a file


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Read and validate a GGUF file's header; raise BadModelFile or ModelNotFound (one line)."""
    path = Path(path)
    with _open(path) as f:
        r = _Reader(f, os.fstat(f.fileno()).st_size, _shown(path.name))
        try:
            return _parse(r, path)
        except BadModelFile:
            raise
        except OSError as e:
            raise r.fail(f"cannot read the file at byte {r.pos}: {e.strerror or e}",
                         "check the disk and pull it again") from None
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, IndexError, MemoryError) as e:
            # not expected after the checks above; still a bad file, never a traceback
            raise r.fail(f"unreadable header at byte {r.pos} ({type(e).__name__}: {e})") from None


def _open(path: Path) -> BinaryIO:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFound(f"{_shown(path)}: no such file (check the path, or pull the model first)") from None
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"{_shown(path)}: cannot access the file ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelNotFound(f"{_shown(path)}: is a directory, not a GGUF file (give the path of the .gguf file in it)")
    if not stat.S_ISREG(st.st_mode):
        raise BadModelFile(f"{_shown(path.name)}: not a regular file (give the path of a .gguf file)")
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as e:
        msg = f"{_shown(path)}: cannot open the file ({e.strerror or e}; check its permissions)"
        raise ModelNotFound(msg) from None


def _parse(r: _Reader, path: Path) -> GGUFInfo:
    # -- magic, version, counts
    head = r.f.read(32)
    if not head.startswith(GGUF_MAGIC):
        if not head:
            raise r.fail("empty file (0 bytes), not a GGUF model", TRUNCATED)
        if GGUF_MAGIC.startswith(head):
            raise r.fail(f"truncated: the file has only {len(head)} bytes", TRUNCATED)
        hint = next((h for prefix, h in FOREIGN_FORMATS if head.startswith(prefix)), "give the path of a .gguf model")
        if head[8:10] == b'{"':  # a little-endian header length, then JSON
            hint = "a safetensors file; convert it to GGUF first"
        raise r.fail(f"not a GGUF file (starts with {head[:4]!r}; expected {GGUF_MAGIC!r})", hint)
    r.f.seek(4)
    r.pos = 4
    version = r.u32("the GGUF version")
    if version not in SUPPORTED_VERSIONS:
        if version == 1:
            raise r.fail("GGUF version 1 is not supported", "llama.cpp reads versions 2 and 3; convert the model again")
        if version in (2 << 24, 3 << 24):
            raise r.fail("big-endian GGUF is not supported", "use the little-endian file of this model")
        raise r.fail(f"unknown GGUF version {version} (expected 2 or 3)", TRUNCATED_OR_CORRUPT)
    tensor_count = r.u64("the tensor count")
    kv_count = r.u64("the metadata count")
    r.need(kv_count * MIN_KV_BYTES, f"{kv_count} metadata entries")
    r.need(tensor_count * MIN_TENSOR_INFO_BYTES, f"{tensor_count} tensor infos")
    if kv_count > MAX_KV_COUNT:
        raise r.fail(f"{kv_count} metadata entries (at most {MAX_KV_COUNT} allowed)")
    if tensor_count > MAX_TENSOR_COUNT:
        raise r.fail(f"{tensor_count} tensors (at most {MAX_TENSOR_COUNT} allowed)")

    # -- metadata: key, value type, value
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = r.string(f"metadata key #{i}", limit=MAX_KEY_BYTES)
        if not key:
            raise r.fail(f"metadata key #{i} is empty")
        if key in metadata:
            raise r.fail(f"duplicate metadata key {_q(key)}")
        vtype = r.u32(f"value type of {_q(key)}")
        metadata[key] = r.value(vtype, f"metadata {_q(key)}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment is {repr(alignment)[:40]}; it must be a power of two")

    # -- tensor infos: name, n_dims, ne[n_dims], ggml type, offset relative to the data start
    r.need(tensor_count * MIN_TENSOR_INFO_BYTES, f"{tensor_count} tensor infos")  # again, after the metadata
    infos: list[tuple[str, tuple[int, ...], int, int, int, int]] = []
    names: set[str] = set()
    for i in range(tensor_count):
        name = r.string(f"name of tensor #{i}", limit=GGML_MAX_NAME - 1)
        if not name:
            raise r.fail(f"tensor #{i} has an empty name")
        if name in names:
            raise r.fail(f"duplicate tensor name {_q(name)}")
        names.add(name)
        label = f"tensor {_q(name)}"
        n_dims = r.u32(f"dimension count of {label}")
        if n_dims > GGML_MAX_DIMS:
            raise r.fail(f"{label} has {n_dims} dimensions (ggml allows at most {GGML_MAX_DIMS})")
        shape = struct.unpack(f"<{n_dims}Q", r.read(8 * n_dims, f"shape of {label}"))
        ggml_type = r.u32(f"type of {label}")
        offset = r.u64(f"offset of {label}")
        if any(d == 0 for d in shape):
            raise r.fail(f"{label} has a zero dimension (shape {list(shape)})")
        n_elements = math.prod(shape)
        if any(d > INT64_MAX for d in shape) or n_elements > INT64_MAX:
            raise r.fail(f"{label} has shape {list(shape)}, whose element count overflows 64 bits")
        if ggml_type not in GGML_TYPES:
            raise r.fail(f"{label} has unknown ggml type {ggml_type}",
                         "the file is corrupt or needs a newer llmdesk and gguf package")
        type_name, block, type_size = GGML_TYPES[ggml_type]
        ne0 = shape[0] if shape else 1  # a 0-d tensor holds one element
        if ne0 % block:
            raise r.fail(f"{label} of type {type_name} has first dimension {ne0}, "
                         f"not a multiple of its block size {block}")
        if offset % alignment:
            raise r.fail(f"{label} has offset {offset}, not a multiple of the alignment {alignment}")
        infos.append((name, shape, ggml_type, offset, n_elements, n_elements // block * type_size))

    # -- tensor data: starts at the next multiple of the alignment; every tensor inside the file,
    # none overlapping (checked in file order, so a cut file names the first tensor it cuts)
    data_offset = -(-r.pos // alignment) * alignment
    tensors = [TensorInfo(name, shape, GGML_TYPES[gt][0], gt, data_offset + offset, n, nbytes)
               for name, shape, gt, offset, n, nbytes in infos]
    prev: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: t.offset):
        start, end = t.offset, t.offset + t.nbytes
        if prev is not None and start < prev.offset + prev.nbytes:
            raise r.fail(f"tensors {_q(prev.name)} and {_q(t.name)} overlap "
                         f"(bytes {prev.offset}..{prev.offset + prev.nbytes} and {start}..{end})")
        if start > r.size:
            raise r.fail(f"tensor {_q(t.name)} data starts at byte {start}, "
                         f"past the end of the file ({r.size} bytes)", TRUNCATED_OR_CORRUPT)
        if end > r.size:
            raise r.fail(f"truncated: tensor {_q(t.name)} data ends at byte {end} "
                         f"but the file has {r.size} bytes", TRUNCATED)
        prev = t

    return GGUFInfo(path, version, r.size, alignment, data_offset, metadata, tensors)


def summary(info: GGUFInfo) -> dict[str, Any]:
    """What `llmdesk show` prints, as a JSON-serialisable dict."""
    return {
        "path": str(info.path),
        "size_bytes": info.file_size,
        "gguf_version": info.version,
        "architecture": info.architecture,
        "name": info.name,
        "parameters": info.parameter_count,
        "file_type": info.file_type,
        "bits_per_weight": round(info.bits_per_weight, 3),
        "tensor_count": len(info.tensors),
        "tensor_types": info.tensor_type_mix,
        "tensor_type_bytes": info.tensor_type_bytes,
        "context_length": info.context_length,
        "layers": info.block_count,
        "heads": info.head_count,
        "kv_heads": info.head_count_kv,
        "embedding_length": info.embedding_length,
        "feed_forward_length": info.feed_forward_length,
        "vocab_size": info.vocab_size,
        "tokenizer_model": info.tokenizer_model,
        "special_tokens": info.special_tokens,
        "chat_template": info.chat_template,
    }
