"""The checks of the quantization issue on a model trained by `llmdesk.train` (a random model's
distributions say nothing about what quantization costs a real one):

- perplexity of the f16 GGUF matches what transformers computes on the HF checkpoint, on the same
  tokens and windows, within 1%;
- KL divergence from the f16 orders Q8_0 < Q4_K_M < Q2_K.

The model is 1 x 256 wide (rows of 256, so the K-quants really apply: llama.cpp falls back to
other types for rows that are not a multiple of 256), trained for 50 steps on the demo
model's corpus.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402  (the train extra: missing, this fails)
import transformers  # noqa: E402

from llmdesk.eval.kld import compute_base, kl_divergence  # noqa: E402
from llmdesk.eval.ppl import perplexity, plan_windows  # noqa: E402
from llmdesk.quantize.core import quantize_file  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One llama.cpp thread: these models are tiny, and on a busy machine llama.cpp's spinning
    thread pool makes two threads ten times slower than one."""
    import llmdesk.runtime.llama as rl

    monkeypatch.setattr(rl, "default_threads", lambda: 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from llmdesk.demo.corpus import conversations, write_corpus
    from llmdesk.train.config import TrainConfig
    from llmdesk.train.loop import render_chatml, train

    d = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(d / "corpus.jsonl", seed=0, per_fact=6)
    cfg = TrainConfig(n_embd=256, n_layer=1, n_head=4, n_head_kv=2, n_ff=512, vocab_size=512, seq_len=64,
                      batch=8, steps=50, lr=5e-3, eval_interval=25, preset="test")
    r = train([corpus], d / "out", cfg)
    # held-out text: other paraphrases of the same facts (another seed)
    text = "".join(render_chatml(m) for m in conversations(seed=1, per_fact=1))[:4000]
    return {"gguf": Path(r.gguf), "hf": Path(r.hf_dir), "text": text, "dir": d}


def hf_nll(hf_dir: Path, tokens: list[int], ctx: int, stride: int) -> np.ndarray:
    """Per-token NLL from transformers over exactly the windows llmdesk uses."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for begin, end, first in plan_windows(len(tokens), ctx, stride):
            logits = model(torch.tensor([tokens[begin:end]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            out += [-logp[t - 1 - begin, tokens[t]].item() for t in range(first, end)]
    return np.asarray(out)


def gguf_tokens(path: Path, text: str) -> list[int]:
    from llmdesk.runtime.llama import LlamaModel

    m = LlamaModel(path)
    try:
        return m.tokenize(text, add_special=True)
    finally:
        m.close()


def test_f16_perplexity_matches_transformers(trained):
    gguf, text = trained["gguf"], trained["text"]
    toks = gguf_tokens(gguf, text)
    ctx = 64  # the model's training context
    r = perplexity(gguf, text, ctx=ctx)
    ref = hf_nll(trained["hf"], toks, ctx, ctx // 2)
    assert r.tokens == ref.size
    assert r.ppl == pytest.approx(math.exp(ref.mean()), rel=0.01)
    # one window over a text no longer than the context: exp(mean NLL) of every token after the first
    from llmdesk.runtime.llama import LlamaModel

    m = LlamaModel(gguf)
    short = m.detokenize(toks[:ctx])
    m.close()
    s = perplexity(gguf, short, ctx=ctx)
    short_toks = gguf_tokens(gguf, short)
    ref1 = hf_nll(trained["hf"], short_toks, len(short_toks), len(short_toks))
    assert s.windows == 1 and s.tokens == len(short_toks) - 1 == ref1.size
    assert s.ppl == pytest.approx(math.exp(ref1.mean()), rel=0.01)


def test_kld_orders_q8_q4km_q2k(trained):
    gguf, text, d = trained["gguf"], trained["text"], trained["dir"]
    base = compute_base(gguf, text, ctx=64)
    kld = {}
    for t in ("Q8_0", "Q4_K_M", "Q2_K"):
        q = quantize_file(gguf, d / f"m-{t}.gguf", t)
        kld[t] = kl_divergence(base, q, text)
    assert kld["Q8_0"].mean_kld < kld["Q4_K_M"].mean_kld < kld["Q2_K"].mean_kld
    assert kld["Q8_0"].same_top_token >= kld["Q4_K_M"].same_top_token >= kld["Q2_K"].same_top_token
    assert kld["Q8_0"].ppl_ratio == pytest.approx(1.0, abs=0.01)


def test_quantize_a_checkpoint_folder(trained, capsys):
    """An HF folder is converted to f16 first (registered as NAME:f16), then quantized."""
    import json

    from llmdesk.cli.main import main
    from llmdesk.store import catalog

    code = main(["quantize", str(trained["hf"]), "Q8_0", "--json"])
    o, e = capsys.readouterr()
    assert code == 0, e
    assert "converting" in e
    assert json.loads(o)["ref"] == "hf:q8_0"
    assert catalog.get("hf", "f16").file_type == "F16"
    assert catalog.get("hf", "q8_0").file_type == "Q8_0"
