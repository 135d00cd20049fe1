"""Perplexity and KL divergence on small random models: the numbers against direct computations
from llama.cpp's logits, the sliding window, saving the base, the CLI, the results store."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import numpy as np
import pytest

from llmdesk.cli.main import main
from llmdesk.errors import LlmdeskError
from llmdesk.eval.kld import BaseLogits, compute_base, kl_divergence
from llmdesk.eval.ppl import perplexity, plan_windows
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.quantize.core import quantize_file
from llmdesk.store import results

TEXT = (Path(__file__).parents[1] / "src" / "llmdesk" / "formats" / "gguf.py").read_text()[:1400]  # ~1,100 tokens


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One llama.cpp thread: these models are tiny, and on a busy machine llama.cpp's spinning
    thread pool makes two threads ten times slower than one."""
    import llmdesk.runtime.llama as rl

    monkeypatch.setattr(rl, "default_threads", lambda: 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A gentle random model (weights small enough that its distributions are not one-hot), its
    Q8_0 and Q4_0, and a model with another vocabulary."""
    d = tmp_path_factory.mktemp("eval")
    f32 = write_llama_gguf(d / "m.gguf", SynthConfig(n_embd=64, n_ff=128, weight_std=0.05))
    q8 = quantize_file(f32, d / "m-Q8_0.gguf", "Q8_0")
    q4 = quantize_file(f32, d / "m-Q4_0.gguf", "Q4_0")
    other = write_llama_gguf(d / "other.gguf", SynthConfig(n_merges=150, weight_std=0.05))
    return {"f32": f32, "q8": q8, "q4": q4, "other": other}


@pytest.fixture(scope="module")
def base128(models):
    """The f32 model's log-probabilities over TEXT in windows of 128, computed once."""
    return compute_base(models["f32"], TEXT, ctx=128, threads=1)


def shifted_nll(path: Path, text: str) -> np.ndarray:
    """NLL of every token after the first, from one llama.cpp pass over the whole text."""
    import llama_cpp as C

    from llmdesk.runtime.llama import LlamaModel, new_context

    m = LlamaModel(path)
    toks = np.asarray(m.tokenize(text, add_special=True))
    n = len(toks)
    ctx = new_context(m, n_ctx=n, n_batch=n)
    batch = C.llama_batch_init(n, 0, 1)
    for i, t in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, True
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    assert C.llama_decode(ctx, batch) == 0
    logits = np.ctypeslib.as_array(ctypes.cast(C.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float)),
                                   shape=(n, m.n_vocab)).astype(np.float64)
    C.llama_batch_free(batch)
    C.llama_free(ctx)
    m.close()
    mx = logits.max(1, keepdims=True)
    logp = logits - (mx + np.log(np.exp(logits - mx).sum(1, keepdims=True)))
    return -logp[np.arange(n - 1), toks[1:]]


# ---------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 2), (10, 4, 4), (10, 4, 1), (100, 30, 7), (5, 5, 2), (5, 8, 3)])
def test_windows_score_every_token_once(n, ctx, stride):
    w = plan_windows(n, ctx, stride)
    scored = [t for _, end, first in w for t in range(first, end)]
    if stride < ctx or ctx >= n:
        assert scored == list(range(1, n))
    else:  # windows side by side: each window's first token has nothing before it to score it
        assert scored == [t for t in range(1, n) if t % stride]
    for begin, end, first in w:
        assert end - begin <= ctx and begin < first
        if begin > 0:  # every scored token of a later window has at least ctx - stride before it
            assert first - begin >= min(ctx - stride, first)


# ---------------------------------------------------------------------------------------------
# perplexity


def test_one_window_is_exp_mean_nll(models):
    nll = shifted_nll(models["f32"], TEXT)
    r = perplexity(models["f32"], TEXT, ctx=2048)  # the model's training context, more than the text
    assert r.windows == 1 and r.tokens == nll.size == r.text_tokens - 1
    assert r.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    se = math.sqrt(((nll**2).mean() - nll.mean() ** 2) / (nll.size - 1))  # llama-perplexity's formula
    assert r.nll_stderr == pytest.approx(se, rel=1e-4)
    assert r.stderr == pytest.approx(r.ppl * se, rel=1e-4)


def test_sliding_window(models):
    whole = perplexity(models["f32"], TEXT, ctx=2048)
    r = perplexity(models["f32"], TEXT, ctx=128)
    assert r.ctx == 128 and r.stride == 64 and r.tokens == whole.tokens
    assert r.windows == len(plan_windows(r.text_tokens, 128, 64)) > 2
    assert r.ppl != whole.ppl  # less context for most tokens, a different figure
    s = perplexity(models["f32"], TEXT, ctx=128, stride=128)
    assert s.windows < r.windows and s.tokens == r.tokens - (s.windows - 1)  # window starts unscored


def test_text_shorter_than_two_windows(models):
    with pytest.raises(LlmdeskError, match="shorter than two windows of 512") as e:
        perplexity(models["f32"], TEXT[:600])  # default ctx 512
    assert "\n" not in str(e.value)
    with pytest.raises(LlmdeskError, match="shorter than two windows of 300"):
        perplexity(models["f32"], TEXT[:600], ctx=300)
    with pytest.raises(LlmdeskError, match="--stride"):
        perplexity(models["f32"], TEXT, ctx=128, stride=200)


def test_quantization_costs_perplexity_consistently(models):
    f, q8 = perplexity(models["f32"], TEXT, ctx=128), perplexity(models["q8"], TEXT, ctx=128)
    assert f.tokens == q8.tokens
    assert abs(math.log(q8.ppl / f.ppl)) < 0.05


# ---------------------------------------------------------------------------------------------
# KL divergence


def test_kld_of_a_model_with_itself_is_zero(models, base128):
    r = kl_divergence(base128, models["f32"], TEXT)
    # the base's log-probabilities are kept as float32: zero up to their rounding
    assert r.mean_kld == pytest.approx(0, abs=1e-6) and r.max_kld == pytest.approx(0, abs=1e-5)
    assert r.same_top_token == 1.0 and r.rms_delta_p == pytest.approx(0, abs=1e-9)
    assert r.ppl_ratio == pytest.approx(1.0, abs=1e-9)


def test_kld_against_a_direct_computation(models):
    r = kl_divergence(models["f32"], models["q4"], TEXT, ctx=2048)
    # one window: compare with full-vocabulary distributions from a single pass of each model
    nll_b, nll_m = shifted_nll(models["f32"], TEXT), shifted_nll(models["q4"], TEXT)
    assert r.tokens == nll_b.size
    assert r.ppl_ratio == pytest.approx(math.exp(nll_m.mean() - nll_b.mean()), rel=1e-5)
    assert r.ppl_base == pytest.approx(math.exp(nll_b.mean()), rel=1e-5)
    dp = np.exp(-nll_m) - np.exp(-nll_b)
    assert r.mean_delta_p == pytest.approx(dp.mean(), abs=1e-7)
    assert r.rms_delta_p == pytest.approx(math.sqrt((dp**2).mean()), rel=1e-4)
    assert 0 < r.median_kld <= r.p99_kld <= r.max_kld and r.mean_kld > 0
    assert 0 < r.same_top_token < 1


def test_kld_orders_quantizations(models, base128):
    k8 = kl_divergence(base128, models["q8"], TEXT)
    k4 = kl_divergence(base128, models["q4"], TEXT)
    assert k8.mean_kld < k4.mean_kld
    assert k8.same_top_token >= k4.same_top_token


def test_saved_base_is_reused(models, tmp_path):
    first = kl_divergence(models["f32"], models["q4"], TEXT, ctx=128, save_base=tmp_path / "base.npz")
    assert (tmp_path / "base.npz").exists()
    # the base model is not needed any more: a missing BASE path would fail if it were opened
    again = kl_divergence(tmp_path / "missing.gguf", models["q4"], TEXT, ctx=128, save_base=tmp_path / "base.npz")
    assert again.to_dict() == {**first.to_dict()}
    loaded = kl_divergence(tmp_path / "base.npz", models["q8"], TEXT)
    assert loaded.ctx == 128 and loaded.base == "m.gguf"
    with pytest.raises(LlmdeskError, match="another text"):
        kl_divergence(models["f32"], models["q8"], TEXT[:-10], save_base=tmp_path / "base.npz")
    with pytest.raises(LlmdeskError, match="--ctx 128"):
        kl_divergence(models["f32"], models["q8"], TEXT, ctx=256, save_base=tmp_path / "base.npz")


def test_top_k_base_approximates_full(models, base128, tmp_path):
    full = kl_divergence(base128, models["q4"], TEXT)
    top = kl_divergence(models["f32"], models["q4"], TEXT, ctx=128, top_k=32, save_base=tmp_path / "top.npz")
    assert top.top_k == 32 and full.top_k is None
    assert BaseLogits.load(tmp_path / "top.npz").top_ids.shape[1] == 32
    assert top.mean_kld <= full.mean_kld + 1e-9  # grouping the tail can only lose divergence
    assert top.mean_kld == pytest.approx(full.mean_kld, rel=0.2)
    assert top.same_top_token == full.same_top_token and top.ppl_ratio == pytest.approx(full.ppl_ratio)


def test_vocab_mismatch(models):
    with pytest.raises(LlmdeskError, match="different vocabularies") as e:
        kl_divergence(models["f32"], models["other"], TEXT, ctx=128)
    assert "\n" not in str(e.value)


def test_base_logits_round_trip(base128, tmp_path):
    bl = base128
    p = bl.save(tmp_path / "b")  # the suffix is added
    assert p.name == "b.npz"
    back = BaseLogits.load(p)
    np.testing.assert_array_equal(back.logprobs, bl.logprobs)
    assert back.ctx == 128 and back.n_vocab == bl.n_vocab
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LlmdeskError, match="cannot read"):
        BaseLogits.load(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------------
# the CLI and the results store


def run(capsys, *args):
    code = main([str(a) for a in args])
    o, e = capsys.readouterr()
    return code, o, e


def one_error(code, err) -> str:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_ppl_and_kld(models, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:1000])
    code, o, e = run(capsys, "eval", "ppl", models["f32"], text, "--ctx", "128", "--json")
    assert code == 0, e
    r = json.loads(o)
    assert {"ppl", "stderr", "tokens"} <= set(r) and r["ctx"] == 128
    code, o, e = run(capsys, "eval", "ppl", models["f32"], text, "--ctx", "128")
    assert code == 0 and "perplexity" in o and "±" in o
    code, o, e = run(capsys, "eval", "kld", models["f32"], models["q4"], text, "--ctx", "128", "--json",
                     "--save-base", tmp_path / "base.npz")
    assert code == 0, e
    k = json.loads(o)
    assert {"mean_kld", "median_kld", "p99_kld", "max_kld", "same_top_token", "rms_delta_p", "ppl_ratio"} <= set(k)
    code, o, e = run(capsys, "eval", "kld", tmp_path / "base.npz", models["q8"], text)
    assert code == 0, e
    assert "mean KLD" in o and "same top token" in o
    rows = results.query()
    assert [r["kind"] for r in rows] == ["kld", "kld", "ppl", "ppl"]
    assert rows[-1]["model"] == "m.gguf" and rows[-1]["metrics"]["ppl"] == pytest.approx(r["ppl"])
    assert rows[-1]["settings"]["ctx"] == 128 and len(rows[-1]["data_sha256"]) == 64
    assert len(rows[-1]["model_sha256"]) == 64
    code, o, e = run(capsys, "results")
    assert code == 0 and "mean KLD" in o and "ppl" in o
    code, o, e = run(capsys, "results", "--kind", "ppl", "--json")
    assert [r["kind"] for r in json.loads(o)] == ["ppl", "ppl"]


def test_cli_bad_input(models, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:200])
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert "two windows" in one_error(*run(capsys, "eval", "ppl", models["f32"], short)[::2])
    assert "different vocabularies" in one_error(*run(capsys, "eval", "kld", models["f32"], models["other"], text, "--ctx", "128")[::2])
    assert "no such text file" in one_error(*run(capsys, "eval", "ppl", models["f32"], tmp_path / "none.txt")[::2])
    assert "not found" in one_error(*run(capsys, "eval", "ppl", "nosuchmodel", text)[::2])
    assert results.query() == []


def test_results_empty(capsys):
    code, o, e = run(capsys, "results")
    assert code == 0 and o == "" and "no results yet" in e
