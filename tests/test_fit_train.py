"""`fit --train` against real `tune` runs: the estimate is near the measured peak memory of the
process, and both grow by the same amount with the sequence length and the batch.

A tiny random-weight Llama with a real 32,000-token vocabulary: at 2,048 tokens a step the
logits' three fp32 arrays are ~750 MiB, far above what the model itself takes, so the difference
between two runs checks the estimate's per-token terms and not just the process's constant."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import torch  # noqa: E402  (the train extra: missing, this fails)
import transformers  # noqa: E402

from llmdesk.cli.main import main  # noqa: E402
from llmdesk.fit.presets import resolve_shape  # noqa: E402
from llmdesk.fit.training import estimate_training  # noqa: E402
from llmdesk.train.tokenizer import save_hf_tokenizer, train_bpe  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "fit_train_vs_tune.py"
WORDS = "the model learns memory tokens from rows of text while a quick fox jumps".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fit-train") / "base"
    rng = random.Random(0)
    tok = train_bpe([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(50)], 300)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    save_hf_tokenizer(tok, folder)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(1500))} for _ in range(8)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def measured_peak(base: Path, tmp: Path, *, seq_len: int, batch: int) -> int:
    """The peak RSS of a real tune run (2 LoRA steps) in a fresh process."""
    spec = {"method": "lora", "rank": 8, "seq_len": seq_len, "batch": batch, "steps": 2, "base": str(base),
            "data": str(base / "data.jsonl"), "out": str(tmp / f"out-{seq_len}-{batch}")}
    r = subprocess.run([sys.executable, str(BENCH), "--child", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, "LLMDESK_HOME": str(tmp / "home")}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def test_estimate_follows_the_measured_peak_of_tune(base, tmp_path):
    shape = resolve_shape(str(base)).shape
    small, large = dict(seq_len=256, batch=1), dict(seq_len=1024, batch=2)
    est_small = estimate_training(shape, "lora", lora_rank=8, **small).total_bytes
    est_large = estimate_training(shape, "lora", lora_rank=8, **large).total_bytes
    got_small = measured_peak(base, tmp_path, **small)
    got_large = measured_peak(base, tmp_path, **large)
    assert got_large > got_small + 500 * 2**20  # the logits grow with the tokens: ~690 MiB more here
    # the peak of the small run measured 683 MiB inside a full test run and ~560 MiB alone; the
    # likely cause is file-backed pages (torch's libraries), of which a fault maps more when the
    # page cache is warm. So the whole is held to 25%, and the difference below, which such pages
    # cancel out of, to 15%
    for est, got in ((est_small, got_small), (est_large, got_large)):
        assert abs(est - got) / got < 0.25, (est / 2**20, got / 2**20)
    # what the extra tokens cost: estimated and measured within 15% of each other
    assert abs((est_large - est_small) / (got_large - got_small) - 1) < 0.15, (est_large - est_small, got_large - got_small)


def test_estimate_moves_with_each_setting():
    from llmdesk.fit import PRESETS

    s = PRESETS["smollm2-135m"]
    e = estimate_training(s, "lora")
    assert (e.seq_len, e.batch, e.lora_rank) == (1024, 4, 16)  # tune's defaults
    assert estimate_training(s, "lora", seq_len=2048).total_bytes > e.total_bytes
    assert estimate_training(s, "lora", batch=8).total_bytes > e.total_bytes
    assert estimate_training(s, "lora", lora_rank=64).total_bytes > e.total_bytes
    assert estimate_training(s, "lora", lora_rank=64).trainable_params == 4 * e.trainable_params
    full = estimate_training(s, "full")
    assert full.trainable_params == full.n_params and full.optimizer_bytes == 8 * full.n_params
    # LoRA's dropout keeps an output and a mask per adapted linear: more activations than full
    assert e.activations_bytes > full.activations_bytes
    assert e.gpu.device == "cuda" and e.gpu.weights_bytes < e.weights_bytes  # bf16 base on a GPU, fp32 here
    q = estimate_training(s, "qlora")
    assert q.device == "cuda" and q.gpu is None and q.checkpointing


def test_cli_takes_tunes_options(capsys):
    assert main(["fit", "smollm2-135m", "--train", "lora", "--rank", "8", "--seq-len", "512", "--batch", "2",
                 "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["training"]
    assert (t["method"], t["lora_rank"], t["seq_len"], t["batch"], t["device"]) == ("lora", 8, 512, 2, "cpu")
    assert t["gpu"]["device"] == "cuda" and t["total_bytes"] > t["weights_bytes"]
    assert main(["fit", "smollm2-135m", "--train", "full", "--seq-len", "256"]) == 0
    o = capsys.readouterr().out
    assert "training (full, seq 256, batch 4)" in o and "CPU (fp32)" in o and "peak" in o
    assert "llmdesk tune on this CPU: " in o and " available" in o  # against this machine's free RAM
