"""Quantization: llama.cpp's quantizer through quantize_file, importance matrices, the CLI, and
interruption at any moment leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import llmdesk_exe, sigint_as_a_terminal_sends_it

from llmdesk.cli.main import main
from llmdesk.errors import LlmdeskError
from llmdesk.formats.gguf import read_gguf
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.quantize.core import QUANT_TYPES, clean_stale_parts, default_output, quant_type, quantize_file
from llmdesk.quantize.imatrix import compute_imatrix, load_imatrix, save_imatrix
from llmdesk.store import catalog, results

TEXT = (Path(__file__).parents[1] / "src" / "llmdesk" / "formats" / "synth.py").read_text()


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One llama.cpp thread: these models are tiny, and on a busy machine llama.cpp's spinning
    thread pool makes two threads ten times slower than one."""
    import llmdesk.runtime.llama as rl

    monkeypatch.setattr(rl, "default_threads", lambda: 1)


@pytest.fixture(scope="module")
def model256(tmp_path_factory) -> Path:
    """A random model whose rows are 256 wide, so that the K and IQ quants apply (blocks of 256)."""
    cfg = SynthConfig(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, weight_std=0.1)
    return write_llama_gguf(tmp_path_factory.mktemp("q") / "m256.gguf", cfg)


@pytest.fixture(scope="module")
def im256(model256):
    return compute_imatrix(model256, TEXT[:2500], n_ctx=128, dataset="calib.txt", threads=1)


@pytest.fixture(scope="module")
def imatrix_file(im256, tmp_path_factory) -> Path:
    return save_imatrix(im256, tmp_path_factory.mktemp("im") / "imatrix.gguf")


def no_debris(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------------
# the type table


def test_quant_types_match_llama_cpp():
    import llama_cpp as C

    for name, qt in QUANT_TYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(C, const) == qt.ftype, name
    needs = {n for n, q in QUANT_TYPES.items() if q.needs_imatrix}
    assert needs == {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
    assert quant_type("q4_k") == ("Q4_K_M", QUANT_TYPES["Q4_K_M"])  # llama-quantize's alias, any case


def test_unknown_type_lists_valid_and_imatrix_types(tiny_gguf, tmp_path):
    with pytest.raises(LlmdeskError) as e:
        quantize_file(tiny_gguf, tmp_path / "x.gguf", "Q9_K")
    msg = str(e.value)
    assert "\n" not in msg and "'Q9_K'" in msg and "Q4_K_M" in msg
    assert msg.index("importance matrix") < msg.index("IQ2_XXS")


def test_type_needing_imatrix_without_one(tiny_gguf, tmp_path):
    with pytest.raises(LlmdeskError, match="IQ2_XXS needs an importance matrix"):
        quantize_file(tiny_gguf, tmp_path / "x.gguf", "IQ2_XXS")
    assert list(tmp_path.iterdir()) == []


def test_default_output_name():
    assert default_output(Path("/m/model-f16.gguf"), "Q4_K_M") == Path("/m/model-Q4_K_M.gguf")
    assert default_output(Path("model.gguf"), "Q8_0") == Path("model-Q8_0.gguf")


# ---------------------------------------------------------------------------------------------
# quantize_file


def test_quantize_q8_0(tiny_gguf, tmp_path):
    seen = []
    out = quantize_file(tiny_gguf, tmp_path / "t-Q8_0.gguf", "Q8_0", threads=1,
                        progress=lambda d, n, name: seen.append((d, n, name)))
    info = read_gguf(out)
    assert info.file_type == "Q8_0"
    assert set(info.tensor_type_mix) == {"Q8_0", "F32"}  # norms stay f32
    assert 8 < info.bits_per_weight < 9
    assert sorted(t.name for t in info.tensors) == sorted(t.name for t in read_gguf(tiny_gguf).tensors)
    n = len(info.tensors)
    assert seen[-1] == (n, n, "") and {s[1] for s in seen} == {n}
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    no_debris(tmp_path)


def test_k_quants_and_keep_output_f16(model256, tmp_path):
    q4 = read_gguf(quantize_file(model256, tmp_path / "q4.gguf", "Q4_K_M"))
    q2 = read_gguf(quantize_file(model256, tmp_path / "q2.gguf", "Q2_K", keep_output_f16=True))
    assert q4.file_type == "Q4_K_M" and "Q4_K" in q4.tensor_type_mix
    assert q2.file_type == "Q2_K" and "Q2_K" in q2.tensor_type_mix
    assert {t.name: t.type_name for t in q2.tensors}["output.weight"] == "F16"
    assert q2.bits_per_weight < q4.bits_per_weight


def test_refuses_to_requantize(tiny_gguf, tmp_path):
    q8 = quantize_file(tiny_gguf, tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(LlmdeskError, match="already quantized"):
        quantize_file(q8, tmp_path / "q4.gguf", "Q4_0")


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(LlmdeskError) as e:
        quantize_file(bad, tmp_path / "out.gguf", "Q8_0")
    assert "\n" not in str(e.value) and "bad.gguf" in str(e.value)
    with pytest.raises(LlmdeskError, match="no such file"):
        quantize_file(tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q8_0")
    assert not (tmp_path / "out.gguf").exists()


def test_stale_part_of_a_dead_process_is_cleaned(tiny_gguf, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".old.gguf.{dead.pid}.part"
    stale.write_bytes(b"half a model")
    mine = tmp_path / f".other.gguf.{os.getpid()}.part"  # a live process's: left alone
    mine.write_bytes(b"in progress")
    quantize_file(tiny_gguf, tmp_path / "new.gguf", "Q8_0")
    assert not stale.exists() and mine.exists()
    assert clean_stale_parts(tmp_path) == []


def test_ctrl_c_kills_the_quantizer_and_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMDESK_TEST_QUANTIZE_PAUSE", "0.2")

    def interrupt(done, total, name):
        if done == 3:
            assert any(p.name.endswith(".part") for p in tmp_path.iterdir())  # work under way
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_file(tiny_gguf, tmp_path / "out.gguf", "Q8_0", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# importance matrices


def test_imatrix_collects_every_layer_matrix(im256):
    im = im256
    names = {f"blk.{i}.{w}.weight" for i in range(2) for w in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(im.entries) == names
    sums, counts = im.entries["blk.0.ffn_down.weight"]
    assert sums.shape == (1, 512) and counts[0] == im.chunk_count * 128  # every token, every chunk
    assert sums.min() > 0
    assert im.entries["blk.0.attn_q.weight"][0].shape == (1, 256)


def test_imatrix_sums_are_the_squared_inputs(tiny_gguf):
    """blk.0.attn_q's input is the first RMS-normed embedding: check the sums against numpy."""
    import gguf

    from llmdesk.runtime.llama import LlamaModel

    text = TEXT[:1200]
    im = compute_imatrix(tiny_gguf, text, n_ctx=32)
    m = LlamaModel(tiny_gguf)
    tokens = m.tokenize(text, add_special=False)
    m.close()
    r = gguf.GGUFReader(str(tiny_gguf))
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    emb, norm = t["token_embd.weight"], t["blk.0.attn_norm.weight"]  # (vocab, n_embd), (n_embd,)
    x = emb[np.asarray(tokens[: im.chunk_count * 32])].astype(np.float64)
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + 1e-5) * norm
    sums, counts = im.entries["blk.0.attn_q.weight"]
    assert counts[0] == len(x)
    np.testing.assert_allclose(sums[0], (x**2).sum(axis=0), rtol=1e-4)


def test_imatrix_files_round_trip(im256, tmp_path):
    im = im256
    g = load_imatrix(save_imatrix(im, tmp_path / "im.gguf"))
    d = load_imatrix(save_imatrix(im, tmp_path / "im.dat"))  # llama.cpp's legacy format
    assert g.datasets == ["calib.txt"] and g.chunk_count == im.chunk_count and g.chunk_size == 128
    for k, v in im.values().items():
        np.testing.assert_allclose(g.values()[k], v, rtol=1e-6)
        np.testing.assert_allclose(d.values()[k], v, rtol=1e-5)
    with pytest.raises(LlmdeskError, match="no such importance matrix"):
        load_imatrix(tmp_path / "nope.gguf")


def test_imatrix_enables_iq_types(model256, imatrix_file, tmp_path):
    info = read_gguf(quantize_file(model256, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=imatrix_file))
    assert info.file_type == "IQ2_XXS" and "IQ2_XXS" in info.tensor_type_mix
    assert info.get("quantize.imatrix.file") == "imatrix.gguf"
    assert info.get("quantize.imatrix.entries_count") == 14


def test_llama_cpp_failure_is_one_line(tiny_gguf, imatrix_file, tmp_path):
    """An importance matrix of another model: llama.cpp refuses, and says why, in one line."""
    with pytest.raises(LlmdeskError) as e:
        quantize_file(tiny_gguf, tmp_path / "x.gguf", "Q4_0", imatrix=imatrix_file)
    msg = str(e.value)
    assert "\n" not in msg and "llama.cpp could not quantize it to Q4_0" in msg
    assert "imatrix size 256 is different from tensor size 64" in msg
    assert list(tmp_path.iterdir()) == []


def test_imatrix_changes_the_quantization(model256, imatrix_file, tmp_path):
    """llama.cpp really receives the matrix: IQ4_XS weights differ with and without it."""
    import gguf

    a = quantize_file(model256, tmp_path / "a.gguf", "IQ4_XS")
    b = quantize_file(model256, tmp_path / "b.gguf", "IQ4_XS", imatrix=imatrix_file)
    ta = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(b)).tensors}
    assert ta["blk.0.attn_q.weight"] != tb["blk.0.attn_q.weight"]
    assert ta["blk.0.attn_norm.weight"] == tb["blk.0.attn_norm.weight"]


# ---------------------------------------------------------------------------------------------
# the CLI


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    o, e = capsys.readouterr()
    return code, o, e


def one_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_quantize_registers_in_the_store(tiny_gguf, tmp_path, capsys):
    code, o, e = run(capsys, "quantize", tiny_gguf, "Q8_0", "--json")
    assert code == 0, e
    r = json.loads(o)
    assert r["ref"] == "tiny:q8_0" and r["type"] == "Q8_0" and 8 < r["bits_per_weight"] < 9
    entry = catalog.get("tiny", "q8_0")
    assert entry.file_type == "Q8_0" and entry.sha256 == r["sha256"]
    rows = results.query("quantize")
    assert rows[0]["model"] == "tiny:q8_0" and rows[0]["metrics"]["bits_per_weight"] == pytest.approx(r["bits_per_weight"], abs=1e-3)
    assert rows[0]["model_sha256"] == entry.sha256
    # from the store, to a file too, named by that file
    code, o, e = run(capsys, "quantize", "tiny:q8_0", "Q4_0")
    one_error(code, e)  # already quantized
    code, o, e = run(capsys, "quantize", tiny_gguf, "q4_0", "-o", tmp_path / "tiny-Q4_0.gguf")
    assert code == 0, e
    assert "tiny:q4_0" in o and read_gguf(tmp_path / "tiny-Q4_0.gguf").file_type == "Q4_0"
    assert catalog.get("tiny", "q4_0").sha256 == catalog.sha256_file(tmp_path / "tiny-Q4_0.gguf")


def test_cli_bad_input(tiny_gguf, tmp_path, capsys):
    assert "Q4_K_M" in one_error(*run(capsys, "quantize", tiny_gguf, "Q7")[::2])
    assert "importance matrix" in one_error(*run(capsys, "quantize", tiny_gguf, "IQ2_XS")[::2])
    assert "MODEL and TYPE" in one_error(*run(capsys, "quantize", tiny_gguf)[::2])
    assert "--text" in one_error(*run(capsys, "quantize", tiny_gguf, "--sweep", "Q8_0")[::2])
    assert "no such importance matrix" in one_error(
        *run(capsys, "quantize", tiny_gguf, "IQ2_XS", "--imatrix", tmp_path / "none.gguf")[::2])
    assert catalog.list_models() == []


def test_cli_types(capsys):
    code, o, _ = run(capsys, "quantize", "--types")
    assert code == 0 and "IQ2_XXS" in o and "required" in o


def test_cli_imatrix_then_quantize(model256, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT[:1500])
    code, o, e = run(capsys, "imatrix", model256, text, "-o", tmp_path / "im.gguf", "--ctx", "128")
    assert code == 0, e
    assert "14 weight matrices" in o
    code, o, e = run(capsys, "quantize", model256, "Q4_K_M", "--imatrix", tmp_path / "im.gguf", "--json")
    assert code == 0, e
    r = json.loads(o)
    assert r["ref"] == "m256:q4_k_m"
    assert read_gguf(r["path"]).get("quantize.imatrix.file") == "im.gguf"
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "fewer than one chunk" in one_error(*run(capsys, "imatrix", model256, short, "-o", tmp_path / "x.gguf")[::2])


# ---------------------------------------------------------------------------------------------
# interrupting the real command


def _start(args, pause="0.3"):
    env = dict(os.environ, LLMDESK_TEST_QUANTIZE_PAUSE=pause)
    return subprocess.Popen([llmdesk_exe(), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=sigint_as_a_terminal_sends_it)


def _wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".part")] if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_interrupted_quantization_leaves_nothing(tiny_gguf, tmp_path, how):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start(["quantize", tiny_gguf, "Q8_0", "-o", out_dir / "tiny-Q8_0.gguf"])
    # mid-way: the worker is writing its temporary file
    _wait_for(lambda: any(p.stat().st_size > 0 for p in _parts(out_dir)) or proc.poll() is not None,
              "the quantization to start")
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    rc = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    assert "Traceback" not in stderr
    # the orphaned worker notices and removes its file (kill -9), or the parent does (Ctrl-C)
    _wait_for(lambda: not _parts(out_dir), "the temporary file to go")
    assert list(out_dir.iterdir()) == []
    assert catalog.list_models() == []
    assert results.query("quantize") == []
    blobs = catalog.paths.blobs_dir()
    assert [p for p in blobs.iterdir()] == []
    if how == "ctrl-c":
        assert rc == 130
        assert stderr.strip().splitlines()[-1] == "interrupted"
    else:
        assert rc == -signal.SIGKILL


@pytest.mark.slow
def test_interrupted_quantization_into_the_store(tiny_gguf, tmp_path):
    proc = _start(["quantize", tiny_gguf, "Q8_0"])
    scratch = catalog.paths.cache_dir() / "quantize"
    _wait_for(lambda: bool(_parts(scratch)) or proc.poll() is not None, "the quantization to start")
    proc.kill()
    proc.wait(timeout=60)
    _wait_for(lambda: not _parts(scratch), "the temporary file to go")
    assert list(scratch.iterdir()) == []
    assert catalog.list_models() == []


# ---------------------------------------------------------------------------------------------
# the sweep


def test_cli_sweep_report_plot_and_results(tiny_gguf, tmp_path, capsys):
    import shutil

    text = tmp_path / "t.txt"
    text.write_text(TEXT[:800])
    other = shutil.copy(tiny_gguf, tmp_path / "second.gguf")  # a second model on the same picture
    code, o, e = run(capsys, "quantize", tiny_gguf, other, "--sweep", "q4_0", "--text", text, "--ctx", "64",
                     "--report", tmp_path / "r.md", "--plot", tmp_path / "p.png", "--json")
    assert code == 0, e
    pts = json.loads(o)["points"]
    assert [(p["model"], p["type"]) for p in pts] == [
        ("tiny.gguf", "F32"), ("tiny.gguf", "Q4_0"), ("second.gguf", "F32"), ("second.gguf", "Q4_0")]
    base, q4 = pts[:2]
    assert base["mean_kld"] == 0 and base["ppl_ratio"] == 1
    assert base["size"] > q4["size"] and base["bits_per_weight"] > q4["bits_per_weight"]
    assert 0 < q4["mean_kld"] and all(p["tokens_per_second"] > 0 for p in pts)
    md = (tmp_path / "r.md").read_text()
    assert "| Q4_0 |" in md and "### second.gguf" in md and "mean KLD" in md
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert catalog.get("tiny", "q4_0") is not None and catalog.get("second", "q4_0") is not None
    rows = results.query("sweep")
    assert len(rows) == 4 and rows[0]["metrics"]["type"] == "Q4_0" and rows[0]["settings"]["base"] == "second.gguf"
    code, o, e = run(capsys, "results", "--kind", "sweep")
    assert code == 0 and "tok/s" in o


def test_sweep_bad_input(tiny_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:1500])
    assert "Q4_K_M" in one_error(*run(capsys, "quantize", tiny_gguf, "--sweep", "Q8_0,Q5", "--text", text)[::2])
    assert "importance matrix" in one_error(*run(capsys, "quantize", tiny_gguf, "--sweep", "IQ2_XXS", "--text", text)[::2])
    short = tmp_path / "s.txt"
    short.write_text("short")
    assert "two windows" in one_error(*run(capsys, "quantize", tiny_gguf, "--sweep", "Q8_0", "--text", short)[::2])
    assert catalog.list_models() == []
