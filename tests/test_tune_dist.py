"""`llmdesk tune` in two CPU processes (gloo), started by `--processes 2` and by `accelerate
launch`: two processes with --batch 4 take the same steps as one process with --batch 8 (the same
losses and validation losses, the same adapter, within float noise); only the first process
writes (one adapter, one results row, one line of output, one error line). Sharded (`--fsdp`,
accelerate's `--use_fsdp`), each process holds half the weights and the run is still the
one-process run: LoRA interrupted and resumed, and all weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import llmdesk_exe, sigint_as_a_terminal_sends_it
from safetensors.torch import load_file
from test_tune import base, data  # noqa: F401  (the tiny Llama and the words task)

from llmdesk.errors import LlmdeskError
from llmdesk.store import results
from llmdesk.train.tune import TuneConfig, tune

SETTINGS = dict(steps=6, rank=4, lr=5e-3, dropout=0.0, eval_every=3, seed=3)
ARGS = ["--steps", "6", "--rank", "4", "--lr", "5e-3", "--dropout", "0", "--eval-every", "3", "--seed", "3"]


def run(argv: list[str], home) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "LLMDESK_HOME": str(home)})


@pytest.fixture(scope="module")
def one(base, data, tmp_path_factory):  # noqa: F811
    """The one-process run (--batch 8) the runs of two processes (--batch 4) are compared with."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMDESK_HOME", str(tmp_path_factory.mktemp("home")))
        return tune(base, [data], tmp_path_factory.mktemp("one") / "one", TuneConfig(batch=8, **SETTINGS))


def interrupt_at(cmd: list[str], user_dir, line_start: str) -> None:
    """Run `cmd` (a tune of several processes) and press Ctrl-C when a line of its output starts
    with `line_start`: every process stops, and the run says once where it can resume."""
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "LLMDESK_HOME": str(user_dir)}, preexec_fn=sigint_as_a_terminal_sends_it)
    for line in p.stderr:
        if line.startswith(line_start):
            os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches every process
            break
    rest = p.stderr.read()
    assert p.wait(timeout=600) == 130, rest
    assert rest.count("continue with --resume") == 1 and "Traceback" not in rest, rest  # said once, by rank 0
    assert rest.count("interrupted") == 1, rest  # and not again by the launcher


def same_adapter(a_dir, b_dir, tol: float = 1e-4) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert min(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # B starts at zero: trained
    for k in a:
        assert float((a[k] - b[k]).abs().max()) < tol, k


@pytest.mark.timeout(900)  # three processes load torch on a shared machine
def test_two_processes_of_batch_4_train_as_one_of_batch_8(base, data, one, tmp_path, user_dir):  # noqa: F811
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
    assert two["param_bytes"] == one.param_bytes  # each holds the whole model
    same_adapter(one.adapter, out / "adapter")
    # one set of outputs, written once
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint.pt", "loss.png", "metrics.json"]
    assert [row["settings"]["out_dir"] for row in results.query("tune")].count(str(out)) == 1
    # its checkpoint continues only with as many processes
    with pytest.raises(LlmdeskError, match="was trained by 2 processes, not 1"):
        tune(base, [data], out, TuneConfig(batch=4, **SETTINGS), resume=True)


@pytest.mark.slow  # three runs of two processes (one interrupted, one refused, one resumed)
@pytest.mark.timeout(900)
def test_fsdp_holds_half_the_weights_in_each_and_resumes_as_one_run(base, data, one, tmp_path, user_dir):  # noqa: F811
    """`--processes 2 --fsdp`, interrupted by Ctrl-C after its first checkpoint, then resumed: the
    same losses and adapter as the uninterrupted one-process run, half the weights in each."""
    out = tmp_path / "fsdp"
    cmd = [llmdesk_exe(), "tune", str(base), str(data), "-o", str(out), "--processes", "2", "--fsdp", "--batch", "4",
           *ARGS, "--eval-every", "1"]  # a checkpoint every step: the interrupt stops at one
    interrupt_at(cmd, user_dir, "step 1: validation loss")
    import torch

    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    step = ckpt["step"]
    assert 1 <= step < 6 and ckpt["processes"] == 2 and not (out / "adapter").exists()
    # a shard a process: rank 0's in checkpoint.pt, rank 1's beside it, each half the rows of a weight
    other = torch.load(out / f"checkpoint.rank1.step{step}.pt", weights_only=False)
    whole = torch.load(one.out_dir / "checkpoint.pt", weights_only=False)["weights"]  # one process's
    assert ckpt["weights"].keys() == other["weights"].keys() == whole.keys()
    for k, w in whole.items():
        assert torch.cat([ckpt["weights"][k], other["weights"][k]]).shape == w.shape, k
        assert ckpt["weights"][k].shape[0] == (w.shape[0] + 1) // 2, k
    # resumed without --fsdp, it says how it was trained
    r = run([*cmd[:cmd.index("--fsdp")], *cmd[cmd.index("--fsdp") + 1:], "--resume"], user_dir)
    assert r.returncode != 0 and "was trained with --fsdp" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run([*cmd, "--resume", "--json"], user_dir)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["fsdp"] and res["processes"] == 2
    assert abs(res["param_bytes"] / one.param_bytes - 0.5) < 0.02  # each process holds half
    history = json.loads((out / "metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history if h["step"] > 0]
    assert losses == pytest.approx([h["loss"] for h in one.history[1:]], rel=1e-4)
    same_adapter(one.adapter, out / "adapter")
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint.pt", "checkpoint.rank1.step6.pt"]


def test_deepspeed_is_refused_and_fsdp_needs_processes(base, data, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(LlmdeskError, match="--fsdp shards the model over several processes: add --processes N"):
        tune(base, [data], tmp_path / "o", TuneConfig(steps=1), fsdp=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LlmdeskError, match="does not run DeepSpeed.*use FSDP: '--fsdp'"):
        tune(base, [data], tmp_path / "o", TuneConfig(steps=1))
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(900)
def test_accelerate_launch_with_fsdp_trains_all_weights_as_one_process(base, data, tmp_path, user_dir):  # noqa: F811
    """accelerate's FSDP launch (--use_fsdp: ACCELERATE_USE_FSDP) of --method full: the merged model
    is the one-process run's, and each process held half the weights."""
    full = dict(method="full", steps=2, lr=1e-3, dropout=0.0, eval_every=1, seed=3)
    one = tune(base, [data], tmp_path / "one", TuneConfig(batch=8, **full))
    out = tmp_path / "acc"
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
             "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--num_cpu_threads_per_process", "1", "--main_process_port", "0", "-m", "llmdesk.cli.main", "tune",
             str(base), str(data), "-o", str(out), "--batch", "4", "--method", "full", "--steps", "2", "--lr", "1e-3",
             "--eval-every", "1", "--seed", "3", "--json"], user_dir)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.strip().splitlines()
    res = json.loads(line)
    assert res["steps"] == 2 and res["fsdp"] and abs(res["param_bytes"] / one.param_bytes - 0.5) < 0.02
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in history[1:]] == pytest.approx([h["loss"] for h in one.history[1:]], rel=1e-4)
    a = load_file(one.merged / "model.safetensors")
    b = load_file(out / "merged" / "model.safetensors")  # gathered from the shards: the same file
    assert a.keys() == b.keys()
    base_w = load_file(base / "model.safetensors")
    assert max(float((a[k] - base_w[k]).abs().max()) for k in a) > 1e-3  # trained
    for k in a:
        assert float((a[k] - b[k]).abs().max()) < 1e-4, k
    # a mistake found by both processes (rows longer than --seq-len) is said once, without a traceback
    r = run([llmdesk_exe(), "tune", str(base), str(data), "-o", str(tmp_path / "e"), "--processes", "2",
             "--seq-len", "8"], user_dir)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "--seq-len" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
