"""`llmdesk train`: the tiny preset end to end (CLI, then `llmdesk run` as a subprocess on its
GGUF), determinism for a seed, exact resume, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import llmdesk_exe

import torch  # noqa: E402, F401  (the train extra: missing, this fails)
import transformers  # noqa: E402, F401

from llmdesk.cli.main import main  # noqa: E402
from llmdesk.errors import LlmdeskError  # noqa: E402
from llmdesk.train.config import make_config  # noqa: E402
from llmdesk.train.loop import train  # noqa: E402

LLMDESK = llmdesk_exe()

TEXT = ("Quantization stores the weights of a model in fewer bits, so the file is smaller and runs "
        "faster. The KV cache holds keys and values. Tokens per second measures speed. ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TEXT * 30)
    (d / "b.md").write_text("# Notes\n\n" + TEXT.upper() * 10)
    with open(d / "c.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"Document {i}: {TEXT}"}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "What is GGUF?"},
                                         {"role": "assistant", "content": "A file format."}]}) + "\n")
    return d


def test_train_cli_then_run(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", str(corpus), "-o", str(out), "--preset", "tiny", "--steps", "12", "--seed", "1"])
    o, e = capsys.readouterr()
    assert code == 0, e
    assert "validation perplexity" in o and "llmdesk run -m" in o
    assert "Writing model shards" not in o + e  # no third-party progress bars in llmdesk's output
    for name in ("model.gguf", "loss.png", "metrics.json", "hf/config.json", "hf/tokenizer.json",
                 "hf/model.safetensors", "checkpoint.pt"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert m["result"]["val_ppl"] > 1 and math.isfinite(m["result"]["val_ppl"])
    assert len(m["history"]) == 12 and any("val_loss" in h for h in m["history"])
    # the exported GGUF runs in llmdesk itself, as a separate process
    r = subprocess.run([LLMDESK, "run", "-m", str(out / "model.gguf"), "Quantization stores", "-n", "8",
                        "-t", "0", "--no-log"], capture_output=True, text=True, timeout=120,
                       env={"LLMDESK_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def _losses(corpus, out, **kw):
    cfg = make_config("tiny", steps=8, checkpoint_interval=4, eval_interval=4, **kw)
    return [h["loss"] for h in train([corpus], out, cfg, export_type=None).history]


@pytest.mark.slow
def test_deterministic_for_a_seed(corpus, tmp_path):
    a = _losses(corpus, tmp_path / "a", seed=3)
    b = _losses(corpus, tmp_path / "b", seed=3)
    c = _losses(corpus, tmp_path / "c", seed=4)
    assert a == b
    assert a != c


def test_resume_continues_exactly(corpus, tmp_path):
    full = _losses(corpus, tmp_path / "full", seed=5)

    class Stop(Exception):
        pass

    def stop_at_6(kind, d):
        if kind == "step" and d["step"] == 6:
            raise Stop  # interrupted after the checkpoint at step 4

    cfg = make_config("tiny", steps=8, checkpoint_interval=4, eval_interval=4, seed=5)
    with pytest.raises(Stop):
        train([corpus], tmp_path / "cut", cfg, export_type=None, on_event=stop_at_6)
    resumed = train([corpus], tmp_path / "cut", cfg, export_type=None, resume=True)
    assert [h["loss"] for h in resumed.history] == full


def test_empty_corpus_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    out = tmp_path / "out"
    code = main(["train", str(tmp_path / "empty.txt"), "-o", str(out), "--preset", "tiny"])
    e = capsys.readouterr().err
    assert code == 1 and e.strip().startswith("error: empty corpus") and len(e.strip().splitlines()) == 1
    assert not (out / "model.gguf").exists()
    code = main(["train", str(tmp_path / "missing.txt"), "-o", str(out), "--preset", "tiny"])
    assert code == 1 and "no such file" in capsys.readouterr().err


def test_bad_options(corpus, tmp_path):
    with pytest.raises(LlmdeskError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(LlmdeskError, match="nothing to resume"):
        train([corpus], tmp_path / "none", make_config("tiny"), resume=True)
    assert main(["train", str(corpus), "-o", str(tmp_path / "o"), "--steps", "1", "--tokens", "5"]) == 1


def test_missing_training_extra_says_how_to_install(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for argv in (["train", str(corpus), "-o", str(tmp_path / "o"), "--preset", "tiny"],
                 ["convert", str(tmp_path), "-o", str(tmp_path / "x.gguf")]):
        (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (tmp_path / "model.safetensors").write_bytes(b"")
        (tmp_path / "tokenizer.json").write_text("{}")
        assert main(argv) == 1
        e = capsys.readouterr().err.strip()
        assert len(e.splitlines()) == 1 and "pip install 'llmdesk[train]'" in e, e
