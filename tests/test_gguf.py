"""GGUF validation: real files read back right; broken and hostile files give one-line BadModelFile."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmdesk.errors import BadModelFile, ModelNotFound
from llmdesk.formats import synth
from llmdesk.formats.gguf import GGUFInfo, read_gguf, summary
from llmdesk.formats.synth import SynthConfig, write_llama_gguf

F32, Q4_0 = 0, 2

# ---------------------------------------------------------------------------------------------
# helpers: hand-crafted GGUF bytes (layout in llmdesk/formats/gguf.py)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv_u32(key: str | bytes, v: int) -> bytes:
    return gstr(key) + u32(4) + u32(v)


def kv_str(key: str | bytes, v: str | bytes) -> bytes:
    return gstr(key) + u32(8) + gstr(v)


def tinfo(name: str, shape: tuple[int, ...], gtype: int = F32, offset: int = 0) -> bytes:
    return gstr(name) + u32(len(shape)) + b"".join(u64(d) for d in shape) + u32(gtype) + u64(offset)


def craft(kvs=(), tinfos=(), data: bytes = b"", version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    head = b"GGUF" + u32(version) + u64(len(tinfos) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tinfos)
    return head + bytes(-len(head) % alignment) + data


# two f32 tensors of 8 elements (32 bytes each), back to back
ARCH = kv_str("general.architecture", "llama")
GOOD_TENSORS = [tinfo("a", (8,), F32, 0), tinfo("b", (8,), F32, 32)]
GOOD_DATA = bytes(64)


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def bad(path: Path, *fragments: str) -> str:
    """Assert reading `path` raises a one-line BadModelFile naming the file and saying `fragments`."""
    with pytest.raises(BadModelFile) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and path.name in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# valid files


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", SynthConfig())


def expected_params(cfg: SynthConfig) -> tuple[int, int]:
    tokens, _ = synth.train_bpe(synth._BPE_TEXT, cfg.n_merges)
    n_vocab = len(tokens) + len(synth.SPECIAL_TOKENS) + len(cfg.extra_tokens)
    e, kv = cfg.n_embd, cfg.n_head_kv * (cfg.n_embd // cfg.n_head)
    layer = 2 * e + 2 * e * e + 2 * kv * e + 3 * cfg.n_ff * e  # norms, q+o, k+v, gate+up+down
    return n_vocab, n_vocab * e * (1 if cfg.tied_embeddings else 2) + cfg.n_layer * layer + e


def test_synthetic_model_reads_back(model):
    cfg = SynthConfig()
    n_vocab, n_params = expected_params(cfg)
    info = read_gguf(model)
    assert isinstance(info, GGUFInfo)
    assert info.version == 3 and info.alignment == 32 and info.file_size == model.stat().st_size
    assert info.architecture == "llama" and info.name == cfg.name
    assert info.parameter_count == n_params
    assert info.bits_per_weight == 32.0
    assert info.file_type == "F32"
    assert info.tensor_type_mix == {"F32": len(info.tensors)}
    assert info.tensor_type_bytes == {"F32": 4 * n_params}
    assert info.context_length == cfg.n_ctx_train
    assert info.block_count == cfg.n_layer
    assert info.head_count == cfg.n_head and info.head_count_kv == cfg.n_head_kv
    assert info.embedding_length == cfg.n_embd and info.feed_forward_length == cfg.n_ff
    assert info.vocab_size == n_vocab
    assert info.tokenizer_model == "gpt2"
    assert info.special_tokens == {"bos": "<s>", "eos": "<|im_end|>"}
    assert info.chat_template == synth.CHATML_TEMPLATE
    assert info.get("llama.rope.freq_base") == cfg.rope_freq_base
    assert info.get("no.such.key", 7) == 7
    q = next(t for t in info.tensors if t.name == "blk.0.attn_q.weight")
    assert q.shape == (cfg.n_embd, cfg.n_embd) and q.type_name == "F32" and q.nbytes == 4 * cfg.n_embd**2
    assert q.offset % info.alignment == 0 and q.offset >= info.data_offset
    emb = info.tensors[0]
    assert emb.name == "token_embd.weight" and emb.shape == (cfg.n_embd, n_vocab)  # ggml order: ne0 first

    s = summary(info)
    json.dumps(s)
    assert s["parameters"] == n_params and s["layers"] == cfg.n_layer and s["kv_heads"] == cfg.n_head_kv
    assert s["file_type"] == "F32" and s["bits_per_weight"] == 32.0 and s["vocab_size"] == n_vocab
    assert s["path"] == str(model) and s["size_bytes"] == info.file_size


def test_matches_the_gguf_package_reader(model):
    info = read_gguf(model)
    ref = gguf.GGUFReader(model)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert info.metadata == ref_meta
    mine = [(t.name, t.shape, t.ggml_type, t.offset, t.n_elements, t.nbytes) for t in info.tensors]
    theirs = [(t.name, tuple(t.shape.tolist()), int(t.tensor_type), t.data_offset, t.n_elements, t.n_bytes) for t in ref.tensors]
    assert mine == theirs


def test_quantized_types_alignment_and_value_types(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_custom_alignment(64)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_head_count(8)  # no head_count_kv: defaults to head_count
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_key_value("test.f64", 2.25, gguf.GGUFValueType.FLOAT64)
    w.add_key_value("test.i8", -3, gguf.GGUFValueType.INT8)
    w.add_token_list(["<unk>", "a", "b"])
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_eos_token_id(99)  # outside the vocabulary: ignored, as llama.cpp does
    rng = np.random.default_rng(0)
    # quantized tensors given as raw bytes: 4 rows of 256 elements
    w.add_tensor("q4k", rng.integers(0, 255, (4, 144), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("q80", rng.integers(0, 255, (4, 8 * 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("f16", np.ones((3, 5), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    info = read_gguf(tmp_path / "q.gguf")
    assert info.alignment == 64 and info.data_offset % 64 == 0
    assert info.file_type == "Q4_K_M" and info.architecture == "qwen2"
    assert [(t.type_name, t.shape, t.nbytes) for t in info.tensors] == [
        ("Q4_K", (256, 4), 4 * 144), ("Q8_0", (256, 4), 4 * 8 * 34), ("F16", (5, 3), 30)]
    assert info.parameter_count == 2 * 1024 + 15
    assert info.bits_per_weight == pytest.approx(8 * (576 + 1088 + 30) / 2063)
    assert info.tensor_type_mix == {"Q4_K": 1, "Q8_0": 1, "F16": 1}
    assert info.head_count == info.head_count_kv == 8
    assert info.context_length is None and info.chat_template is None
    assert info.special_tokens == {"unk": "<unk>", "pad": "b"}
    assert info.get("test.bools") == [True, False, True]
    assert info.get("test.nested") == [[1, 2], [3]]
    assert info.get("test.floats") == [0.5, 1.5]
    assert info.get("test.f64") == 2.25 and info.get("test.i8") == -3


def test_crafted_baseline_is_valid(tmp_path):
    info = read_gguf(write(tmp_path, craft([ARCH], GOOD_TENSORS, GOOD_DATA)))
    assert [t.name for t in info.tensors] == ["a", "b"] and info.parameter_count == 16
    assert info.tensors[1].offset == info.data_offset + 32


def test_invalid_utf8_in_token_texts_is_replaced_not_refused(tmp_path):
    # llama.cpp loads such vocabularies; keys, tensor names and single string values stay strict
    tokens = gstr("tokenizer.ggml.tokens") + u32(9) + u32(8) + u64(2) + gstr("ok") + gstr(b"\xff")
    info = read_gguf(write(tmp_path, craft([ARCH, tokens], GOOD_TENSORS, GOOD_DATA)))
    assert info.get("tokenizer.ggml.tokens") == ["ok", "\ufffd"]


def test_big_vocabulary_header_is_fast(tmp_path):
    n = 150_000
    tokens = [f"tok{i}" for i in range(n)]
    merges = [f"t ok{i}" for i in range(n)]
    kvs = [
        ARCH,
        gstr("tokenizer.ggml.tokens") + u32(9) + u32(8) + u64(n) + b"".join(gstr(t) for t in tokens),
        gstr("tokenizer.ggml.merges") + u32(9) + u32(8) + u64(n) + b"".join(gstr(t) for t in merges),
        gstr("tokenizer.ggml.token_type") + u32(9) + u32(5) + u64(n) + np.ones(n, "<i4").tobytes(),
        gstr("tokenizer.ggml.scores") + u32(9) + u32(6) + u64(n) + np.zeros(n, "<f4").tobytes(),
        kv_u32("tokenizer.ggml.bos_token_id", 1),
    ]
    path = write(tmp_path, craft(kvs, GOOD_TENSORS, GOOD_DATA))
    info = read_gguf(path)
    assert info.vocab_size == n and info.get("tokenizer.ggml.merges")[-1] == merges[-1]
    assert info.special_tokens == {"bos": "tok1"}


# ---------------------------------------------------------------------------------------------
# missing, foreign and broken files


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelNotFound, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ModelNotFound, match="directory"):
        read_gguf(tmp_path / "dir.gguf")


def test_empty_and_foreign_files(tmp_path):
    bad(write(tmp_path, b"", "empty.gguf"), "empty")
    bad(write(tmp_path, b"GG", "short.gguf"), "truncated")
    bad(write(tmp_path, b"hello, world\n" * 10, "notes.txt"), "not a GGUF file", "b'hell'")
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as z:
        z.writestr("data.pkl", b"x" * 100)
    bad(tmp_path / "model.zip", "not a GGUF file", "zip")
    bad(write(tmp_path, b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "lfs.gguf"), "LFS")
    header = b'{"w": {"dtype": "F32"}}'
    bad(write(tmp_path, u64(len(header)) + header, "m.safetensors"), "safetensors")


@pytest.mark.parametrize("version, says", [(1, "version 1 is not supported"), (4, "unknown GGUF version 4"),
                                           (3 << 24, "big-endian")])
def test_wrong_version(tmp_path, version, says):
    bad(write(tmp_path, craft([ARCH], GOOD_TENSORS, GOOD_DATA, version=version)), says)


def test_version_2_is_read(tmp_path):
    assert read_gguf(write(tmp_path, craft([ARCH], GOOD_TENSORS, GOOD_DATA, version=2))).version == 2


def test_truncated_anywhere(model, tmp_path):
    raw = model.read_bytes()
    info = read_gguf(model)
    kv_end = raw.index(b"token_embd.weight") - 8  # the first tensor info
    cuts = {1, 3, 4, 6, 10, 16, 20, 23, 24}  # magic, version, counts
    cuts |= {int(x) for x in np.linspace(25, kv_end, 8)}  # metadata
    cuts |= {int(x) for x in np.linspace(kv_end, info.data_offset, 5)}  # tensor infos and padding
    cuts |= {info.data_offset + 1, info.tensors[3].offset + 5, (info.data_offset + len(raw)) // 2, len(raw) - 1}
    assert len(cuts) >= 20
    for cut in sorted(cuts):
        path = write(tmp_path, raw[:cut], f"cut{cut}.gguf")
        msg = bad(path)
        assert "truncated" in msg or "empty" in msg, msg
    msg = bad(write(tmp_path, raw[: len(raw) - 1], "cut.gguf"))
    assert f"ends at byte {len(raw)} but the file has {len(raw) - 1} bytes" in msg and "pull it again" in msg


def test_huge_lengths_and_counts_fail_at_once(tmp_path):
    bad(write(tmp_path, craft([u64(2**60) + b"general.x"], GOOD_TENSORS, GOOD_DATA)), f"needs {2**60} bytes")
    bad(write(tmp_path, craft([gstr("general.name") + u32(8) + u64(2**63)], GOOD_TENSORS, GOOD_DATA)), "general.name")
    huge_array = gstr("tokenizer.ggml.tokens") + u32(9) + u32(8) + u64(2**62)
    bad(write(tmp_path, craft([ARCH, huge_array], GOOD_TENSORS, GOOD_DATA)), "tokenizer.ggml.tokens")
    huge_u8_array = gstr("x.y") + u32(9) + u32(0) + u64(2**62)
    bad(write(tmp_path, craft([huge_u8_array], GOOD_TENSORS, GOOD_DATA)), "x.y")
    bad(write(tmp_path, craft([ARCH], GOOD_TENSORS, GOOD_DATA, n_tensors=2**62)), "tensor infos")
    bad(write(tmp_path, craft([ARCH], GOOD_TENSORS, GOOD_DATA, n_kv=2**62)), "metadata entries")
    bad(write(tmp_path, craft([ARCH], [tinfo("a" * 64, (8,))], GOOD_DATA)), "at most 63 allowed")


@pytest.mark.parametrize("kvs, says", [
    ([gstr("general.x") + u32(13) + u32(0)], "unknown value type 13"),
    ([gstr("general.x") + u32(9) + u32(99) + u64(1) + u32(0)], "unknown value type 99"),
    ([ARCH, ARCH], "duplicate metadata key 'general.architecture'"),
    ([kv_str(b"general.\xff\xfe", "x")], "not valid UTF-8"),
    ([kv_str("general.name", b"\xc3\x28")], "not valid UTF-8"),
    ([gstr("") + u32(4) + u32(1)], "empty"),
    ([kv_u32("general.alignment", 24)], "power of two"),
    ([kv_u32("general.alignment", 0)], "power of two"),
    # arrays nested 4 deep
    ([gstr("x.y") + u32(9) + (u32(9) + u64(1)) * 3 + u32(4) + u64(1) + u32(1)], "nests arrays"),
])
def test_bad_metadata(tmp_path, kvs, says):
    bad(write(tmp_path, craft(kvs, GOOD_TENSORS, GOOD_DATA)), says)


@pytest.mark.parametrize("tinfos, says", [
    ([tinfo("a", (8,) * 99)], "99 dimensions"),
    ([gstr("a") + u32(99)], "99 dimensions"),
    ([tinfo("a", (8,), gtype=99)], "unknown ggml type 99"),
    ([tinfo("a", (8,), gtype=4)], "unknown ggml type 4"),  # Q4_2, long removed
    ([tinfo("a", (8, 0))], "zero dimension"),
    ([tinfo("a", (2**32,) * 4)], "overflows"),
    ([tinfo("a", (16,), gtype=Q4_0)], "not a multiple of its block size 32"),
    ([tinfo("a", (8,), offset=4096)], "past the end of the file"),
    ([tinfo("a", (8,), offset=2**63)], "past the end of the file"),
    ([tinfo("a", (32,), offset=0)], "truncated"),  # 128 bytes of data, 64 in the file
    ([tinfo("a", (8,), offset=16)], "not a multiple of the alignment 32"),
    ([tinfo("a", (16,), offset=0), tinfo("b", (8,), offset=32)], "overlap"),
    ([tinfo("a", (8,)), tinfo("a", (8,), offset=32)], "duplicate tensor name 'a'"),
    ([tinfo("", (8,))], "empty name"),
    ([gstr(b"\x80abc") + u32(1) + u64(8) + u32(0) + u64(0)], "not valid UTF-8"),
])
def test_bad_tensor_infos(tmp_path, tinfos, says):
    bad(write(tmp_path, craft([ARCH], tinfos, GOOD_DATA)), says)


def test_fuzzed_headers_read_or_fail_cleanly(model, tmp_path):
    raw = model.read_bytes()
    info = read_gguf(model)
    kv_end = raw.index(b"token_embd.weight") - 8
    rng = random.Random(1234)
    outcomes = {"ok": 0, "bad": 0}
    path = tmp_path / "fuzz.gguf"
    for i in range(200):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            # half the flips hit the fixed header and tensor infos, where they matter most
            pos = rng.randrange(0, 24) if rng.random() < 0.2 else (
                rng.randrange(kv_end, info.data_offset) if rng.random() < 0.5 else rng.randrange(0, info.data_offset))
            data[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        path.write_bytes(data)
        try:
            read_gguf(path)
            outcomes["ok"] += 1
        except BadModelFile as e:
            assert "\n" not in str(e) and "fuzz.gguf" in str(e), f"variant {i}: {e}"
            outcomes["bad"] += 1
    assert outcomes["bad"] > 50, outcomes


def test_module_does_not_import_llama_cpp():
    code = "import sys, llmdesk.formats.gguf; assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
