"""`llmdesk tune --method dpo|grpo --processes 2`: TRL's trainers data parallel in two CPU
processes (gloo), on the tiny real Llama of tests/test_tune.py. DPO in two processes with --batch 2
takes the steps of one process with --batch 4 (the same losses and adapter, within float noise),
and only the first process writes (one adapter, one merged model, one LoRA GGUF, one line of
output); interrupted by Ctrl-C and resumed, it is still that run. GRPO in two processes scores
both processes' completions: a prompt's group of completions is sampled half in each, with their
own seeds, and the logged reward is the mean over both halves; the held-out reward, sampled in both
and graded in the first, is the one a single process measures. Sharding (--fsdp, accelerate launch
--use_fsdp) is refused in one line that says why."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import llmdesk_exe
from test_tune import ASK, WORDS, base  # noqa: F401  (the tiny Llama)
from test_tune_dist import interrupt_at, same_adapter

from llmdesk.cli.main import main
from llmdesk.errors import LlmdeskError
from llmdesk.eval.graders import parse_graders
from llmdesk.store import results
from llmdesk.train.rewards import RewardConfig, run

DPO = dict(method="dpo", steps=6, rank=4, lr=2e-3, seed=3, save_every=2)
DPO_ARGS = ["--method", "dpo", "--steps", "6", "--rank", "4", "--lr", "2e-3", "--seed", "3", "--eval-every", "2"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def launch(argv: list[str], home) -> subprocess.CompletedProcess:
    return subprocess.run([llmdesk_exe(), "tune", *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LLMDESK_HOME": str(home)})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl",
                 [{"prompt": ASK + w, "chosen": f" [{w.upper()}]", "rejected": f" {w}"} for w in WORDS] * 3)


@pytest.fixture(scope="module")
def one(base, pairs, tmp_path_factory):  # noqa: F811
    """The one-process run (--batch 4) the runs of two processes (--batch 2) are compared with."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMDESK_HOME", str(tmp_path_factory.mktemp("home")))
        return run("dpo", base, pairs, tmp_path_factory.mktemp("one") / "one", RewardConfig(batch=4, **DPO))


def same_run(one, out) -> None:
    """The losses and the adapter of `one`. Two processes average the gradients of their halves of
    each step's pairs where one process takes the mean over all of them, and pad to other lengths:
    the same sums in another order, 1e-7 apart in float32 (measured: 8e-8 on the adapter after 4
    steps, against lora_B entries of 6e-3); 1e-5 leaves room for that and for nothing else."""
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in one.history], abs=1e-5)
    assert one.history[-1]["loss"] < one.history[0]["loss"] - 0.2  # it learns: not two flat lines compared
    same_adapter(one.adapter, out / "adapter", tol=1e-5)


@pytest.mark.timeout(900)  # three processes load torch on a shared machine
def test_dpo_in_two_processes_of_batch_2_trains_as_one_of_batch_4(base, pairs, one, tmp_path, user_dir):  # noqa: F811
    out = tmp_path / "two"
    r = launch([str(base), str(pairs), "-o", str(out), *DPO_ARGS, "--processes", "2", "--batch", "2",
                "--merge", "--lora-gguf", "--json"], user_dir)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.strip().splitlines()  # the first process speaks for both
    res = json.loads(line)
    assert res["processes"] == 2 and res["steps"] == 6 and res["adapter"] == str(out / "adapter")
    same_run(one, out)
    # one set of outputs, written once, and no checkpoints left
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "adapter.gguf", "merged", "metrics.json", "run.json",
                                                     "training.png"]
    assert [row["settings"]["processes"] for row in results.query("dpo")] == [2]


@pytest.mark.slow  # two runs of two processes, one interrupted
@pytest.mark.timeout(900)
def test_dpo_in_two_processes_interrupted_and_resumed_is_the_one_process_run(base, pairs, one, tmp_path,  # noqa: F811
                                                                            user_dir):
    out = tmp_path / "cut"
    cmd = [llmdesk_exe(), "tune", str(base), str(pairs), "-o", str(out), *DPO_ARGS, "--processes", "2", "--batch", "2"]
    interrupt_at(cmd, user_dir, "step 2/6:")
    ckpts = sorted((out / "trainer").glob("checkpoint-*"))
    assert len(ckpts) == 1 and 2 <= int(ckpts[0].name.split("-")[1]) < 6 and not (out / "adapter").exists()
    assert sorted(f.name for f in ckpts[0].glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    with pytest.raises(LlmdeskError, match="was trained by 2 processes, not 1; resume with as many"):
        run("dpo", base, pairs, out, RewardConfig(batch=2, **DPO), resume=True)
    r = launch([*cmd[2:], "--resume"], user_dir)
    assert r.returncode == 0, r.stderr
    same_run(one, out)
    assert not (out / "trainer").exists()


@pytest.mark.timeout(900)
def test_grpo_in_two_processes_scores_both_halves_of_each_group(base, tmp_path, user_dir):  # noqa: F811
    """--batch 2 --generations 4 in two processes: a step is one prompt's four completions, two
    sampled in each process; the grader sees each process's two, and the step's logged reward is
    the mean over all four."""
    rows = [{"prompt": ASK + w, "answer": f"[{w.upper()}]"} for w in WORDS * 3]
    data = jsonl(tmp_path / "prompts.jsonl", rows)
    log = tmp_path / "graded"
    grader = tmp_path / "g.py"
    grader.write_text(
        "import json, os\n"
        "def length(prompts, completions, **kw):\n"
        "    texts = [c if isinstance(c, str) else c[-1]['content'] for c in completions]\n"
        "    scores = [len(t) / 10 for t in texts]\n"
        f"    with open({str(log)!r} + os.environ.get('RANK', '0'), 'a') as f:\n"
        "        f.write(json.dumps({'prompts': [json.dumps(p) for p in prompts], 'completions': texts,"
        " 'scores': scores}) + '\\n')\n"
        "    return scores\n")
    out = tmp_path / "grpo"
    r = launch([str(base), str(data), "-o", str(out), "--method", "grpo", "--reward", f"python:{grader}:length",
                "--processes", "2", "--batch", "2", "--generations", "4", "--steps", "3", "--max-completion", "8",
                "--seed", "1", "--json"], user_dir)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.strip().splitlines()
    res = json.loads(line)
    assert res["processes"] == 2 and res["val_rows"] == 2 and res["reward_before"] is not None
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.json", "run.json", "training.png"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    calls = {rank: [json.loads(x) for x in (tmp_path / f"graded{rank}").read_text().splitlines()] for rank in (0, 1)}
    # rank 0: the held-out prompts before (2 x 4 completions), its half of each of the 3 steps, the held-out after
    assert [len(c["completions"]) for c in calls[0]] == [8, 2, 2, 2, 8]
    assert [len(c["completions"]) for c in calls[1]] == [2, 2, 2]
    history = [h for h in json.loads((out / "metrics.json").read_text())["history"] if "reward" in h]
    assert len(history) == 3
    for step, (a, b) in enumerate(zip(calls[0][1:4], calls[1])):
        assert len(set(a["prompts"] + b["prompts"])) == 1  # one prompt's group, split over the two processes
        assert a["completions"] != b["completions"]  # each process samples with its own seed
        assert history[step]["reward"] == pytest.approx(sum(a["scores"] + b["scores"]) / 4, abs=1e-6)
    assert len({h["reward"] for h in history}) > 1  # (the scores vary: the check is not of constants)
    # the held-out prompts, sampled one in each process and graded by the first: the reward one process measures
    alone = run("grpo", base, data, tmp_path / "alone", RewardConfig(method="grpo", steps=1, batch=4, num_generations=4,
                                                                     max_completion_tokens=8, seed=1),
                graders=parse_graders([f"python:{grader}:length"])[0])
    assert res["reward_before"] == pytest.approx(alone.reward_before, abs=1e-9) and alone.reward_before > 0


def test_settings_that_cannot_run_are_one_line(base, tmp_path, user_dir, capsys, monkeypatch):  # noqa: F811
    data = jsonl(tmp_path / "prompts.jsonl", [{"prompt": ASK + w, "answer": w} for w in WORDS])

    def said(argv: list[str], needle: str) -> None:
        assert main(["tune", str(base), str(data), "-o", str(tmp_path / "x"), "--method", "grpo", "--reward", "exact",
                     *argv]) == 1
        e = capsys.readouterr().err
        assert e.startswith("error: ") and needle in e and e.count("\n") == 1, e

    said(["--batch", "3", "--processes", "2"], "--batch 3 x 2 processes = 6 completions a step must be a multiple of "
                                               "--generations 4 (each prompt's completions are scored together): give "
                                               "--batch a multiple of 2")
    said(["--batch", "2"], "--batch 2 must be a multiple of --generations 4")
    # sharding: TRL's trainers shard only through accelerate, whose FSDP leaves CPU processes data parallel
    said(["--processes", "2", "--fsdp"], "--fsdp is not available with --method grpo: TRL's trainers shard only "
                                         "through accelerate's FSDP, which accelerate applies to GPU processes alone")
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": ASK + w, "chosen": w.upper(), "rejected": w} for w in WORDS])
    assert main(["tune", str(base), str(pairs), "-o", str(tmp_path / "x"), "--method", "dpo", "--processes", "2",
                 "--fsdp"]) == 1
    assert capsys.readouterr().err == ("error: --fsdp is not available with --method dpo: TRL's trainers shard only "
                                       "through accelerate's FSDP, which accelerate applies to GPU processes alone "
                                       "(CPU ones would each hold the whole model) and which is untested with llmdesk "
                                       "on GPUs; train it data parallel, without --fsdp\n")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch or torchrun set it
    monkeypatch.setenv("RANK", "0")
    said(["--processes", "2"], "--processes under accelerate launch (or torchrun): give the processes to one of them")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp: refused, not run unsharded
    with pytest.raises(LlmdeskError, match="^accelerate launch --use_fsdp is not available with --method dpo: .* "
                                           "without --use_fsdp$"):
        run("dpo", base, pairs, tmp_path / "x", RewardConfig(method="dpo"))
    for var in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var)
    assert not (tmp_path / "x").exists()
    # settings made for two processes, run in one: said before any work
    with pytest.raises(LlmdeskError, match="the settings are for 2 processes, and 1 run: start it with "
                                           "'llmdesk tune --processes 2'"):
        run("dpo", base, data, tmp_path / "y", RewardConfig(method="dpo", processes=2))
