"""`llmdesk tune` in two CPU processes (gloo), started by `--processes 2` and by `accelerate
launch`: two processes with --batch 4 take the same steps as one process with --batch 8 (the same
losses and validation losses, the same adapter, within float noise); only the first process
writes (one adapter, one results row, one line of output, one error line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import llmdesk_exe
from safetensors.torch import load_file
from test_tune import base, data  # noqa: F401  (the tiny Llama and the words task)

from llmdesk.errors import LlmdeskError
from llmdesk.store import results
from llmdesk.train.tune import TuneConfig, tune

SETTINGS = dict(steps=6, rank=4, lr=5e-3, dropout=0.0, eval_every=3, seed=3)
ARGS = ["--steps", "6", "--rank", "4", "--lr", "5e-3", "--dropout", "0", "--eval-every", "3", "--seed", "3"]


def run(argv: list[str], home) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "LLMDESK_HOME": str(home)})


@pytest.mark.timeout(900)  # three processes load torch on a shared machine
def test_two_processes_of_batch_4_train_as_one_of_batch_8(base, data, tmp_path, user_dir):  # noqa: F811
    one = tune(base, [data], tmp_path / "one", TuneConfig(batch=8, **SETTINGS))
    out = tmp_path / "two"
    r = run([llmdesk_exe(), "tune", str(base), str(data), "-o", str(out), "--processes", "2", "--batch", "4",
             *ARGS, "--json"], user_dir)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.strip().splitlines()  # the first process speaks for both
    two = json.loads(line)
    history = json.loads((out / "metrics.json").read_text())["history"]
    losses_one = [h["loss"] for h in one.history[1:]]
    assert losses_one[-1] < losses_one[0] - 0.5  # it learns: the comparison is not of two flat lines
    assert [h["loss"] for h in history[1:]] == pytest.approx(losses_one, rel=1e-4)
    evals = lambda hs: [h["val_loss"] for h in hs if "val_loss" in h]  # noqa: E731 (steps 0, 3, 6)
    assert len(evals(history)) == 3 and evals(history) == pytest.approx(evals(one.history), rel=1e-4)
    assert [h["tokens"] for h in history[1:]] == [h["tokens"] for h in one.history[1:]]  # the same rows
    assert two["tokens_seen"] == one.tokens_seen and two["steps"] == 6
    a = load_file(one.adapter / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert min(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # B starts at zero: trained
    for k in a:
        assert float((a[k] - b[k]).abs().max()) < 1e-4, k
    # one set of outputs, written once
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint.pt", "loss.png", "metrics.json"]
    assert [row["settings"]["out_dir"] for row in results.query("tune")].count(str(out)) == 1
    # its checkpoint continues only with as many processes
    with pytest.raises(LlmdeskError, match="was trained by 2 processes, not 1"):
        tune(base, [data], out, TuneConfig(batch=4, **SETTINGS), resume=True)


def test_an_fsdp_or_deepspeed_launch_is_refused_in_one_line(base, data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LlmdeskError, match="FSDP is not supported"):
        tune(base, [data], tmp_path / "o", TuneConfig(steps=1))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LlmdeskError, match="DeepSpeed is not supported"):
        tune(base, [data], tmp_path / "o", TuneConfig(steps=1))
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(900)
def test_accelerate_launch_runs_it_and_an_error_is_one_line(base, data, tmp_path, user_dir):  # noqa: F811
    out = tmp_path / "acc"
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--num_cpu_threads_per_process", "1", "--main_process_port", "0", "-m", "llmdesk.cli.main", "tune",
             str(base), str(data), "-o", str(out), "--batch", "4", *ARGS[2:], "--steps", "2", "--json"], user_dir)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.strip().splitlines()
    assert json.loads(line)["steps"] == 2
    import torch

    assert torch.load(out / "checkpoint.pt", weights_only=False)["processes"] == 2
    # a mistake found by both processes (rows longer than --seq-len) is said once, without a traceback
    r = run([llmdesk_exe(), "tune", str(base), str(data), "-o", str(tmp_path / "e"), "--processes", "2",
             "--seq-len", "8"], user_dir)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "--seq-len" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
