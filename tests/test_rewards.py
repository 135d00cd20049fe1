"""DPO and GRPO (train/rewards.py) on the tiny real Llama that tests/test_tune.py builds: the data
checks, a DPO run that moves the model toward the chosen answers (measured here, on the pairs, in
transformers), a GRPO run that logs the reward and each grader's share and measures the held-out
reward before and after, with a grader that raises counted rather than fatal."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from llmdesk.errors import LlmdeskError
from llmdesk.eval.graders import parse_graders
from llmdesk.train.rewards import RewardConfig, read_pairs, read_prompts, run

from test_tune import ASK, WORDS, base  # noqa: F401  (the module's base fixture)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_data_is_one_line(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                     {"prompt": "b", "chosen": "same", "rejected": " same "}])
    with pytest.raises(LlmdeskError, match=r"p.jsonl:2: chosen and rejected are the same text"):
        read_pairs(p)
    p = jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": "x"}])
    with pytest.raises(LlmdeskError, match=r"q.jsonl:1: no 'rejected'"):
        read_pairs(p)
    (tmp_path / "r.jsonl").write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{oops\n')
    with pytest.raises(LlmdeskError, match=r"r.jsonl:2: not JSON"):
        read_pairs(tmp_path / "r.jsonl")
    # the arena's export: extra columns are dropped
    p = jsonl(tmp_path / "arena.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y", "chosen_model": "m1",
                                          "rejected_model": "m2", "source": "web"}])
    assert read_pairs(p) == [{"prompt": "a", "chosen": "x", "rejected": "y"}]
    g, _ = parse_graders("exact:city")
    p = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a", "city": "Oslo"}, {"prompt": "b"}])
    with pytest.raises(LlmdeskError, match=r"prompts.jsonl:2: grader exact:city needs a column 'city'"):
        read_prompts(p, g)
    with pytest.raises(LlmdeskError, match="must be a multiple of --num-generations"):
        RewardConfig(method="grpo", batch=6, num_generations=4)


def logp(model, tok, prompt: str, answer: str) -> float:
    ids = tok(prompt + answer, return_tensors="pt").input_ids
    n = len(tok(prompt).input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(lp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum())


def test_dpo_prefers_the_chosen_answers(base, tmp_path):  # noqa: F811
    pairs = [{"prompt": ASK + w, "chosen": f" [{w.upper()}]", "rejected": f" {w}"} for w in WORDS] * 3
    data = jsonl(tmp_path / "pairs.jsonl", pairs)
    r = run("dpo", base, data, tmp_path / "out", RewardConfig(method="dpo", steps=8, batch=4, lr=2e-3))
    assert (r.adapter / "adapter_config.json").is_file() and r.plot.is_file()
    assert [h["step"] for h in r.history] == list(range(1, 9))
    tok = transformers.AutoTokenizer.from_pretrained(base)
    import peft

    before = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    after = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           str(r.adapter))
    margin = lambda m: sum(logp(m, tok, p["prompt"], p["chosen"]) - logp(m, tok, p["prompt"], p["rejected"])  # noqa: E731
                           for p in pairs[:8]) / 8
    assert margin(after) > margin(before) + 0.5
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["result"]["method"] == "dpo" and saved["config"]["beta"] == 0.1


@pytest.mark.slow
def test_grpo_logs_rewards_and_measures_the_held_out_prompts(base, tmp_path):  # noqa: F811
    rng = random.Random(0)
    rows = [{"prompt": ASK + w, "answer": f"[{w.upper()}]"} for w in (rng.choice(WORDS) for _ in range(24))]
    data = jsonl(tmp_path / "prompts.jsonl", rows)
    grader = tmp_path / "g.py"
    grader.write_text("def flaky(prompts, completions, **kw):\n    raise RuntimeError('down')\n")
    graders, weights = parse_graders([r"regex:\[", f"python:{grader}:flaky"], "1,0.5")
    events = []
    r = run("grpo", base, data, tmp_path / "out",
            RewardConfig(method="grpo", steps=3, batch=8, num_generations=4, max_completion_tokens=8),
            graders=graders, weights=weights, on_event=lambda k, d: events.append((k, d)))
    assert r.val_rows == 2 and r.train_rows == 22
    assert r.reward_before is not None and r.reward_after is not None
    assert set(r.grader_before) == {r"regex:\[", "python:g.py:flaky"}
    assert r.graded_none["python:g.py:flaky"] > 0  # every call raised: counted, the run went on
    steps = [h for h in r.history if "reward" in h]
    assert len(steps) == 3 and all(r"rewards/regex:\[/mean" in h for h in steps)
    assert [d["when"] for k, d in events if k == "reward"] == ["before", "after"]


def test_cli(base, tmp_path, user_dir, capsys):  # noqa: F811
    from llmdesk.cli.main import main
    from llmdesk.store import catalog

    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": ASK + w, "chosen": f"[{w.upper()}]", "rejected": w}
                                             for w in WORDS])
    for argv, needle in (
            (["--method", "grpo"], "--method grpo needs graders"),
            (["--method", "dpo", "--resume"], "--resume is not available with --method dpo"),
            (["--method", "dpo", "--reward", "exact"], "--reward goes with --method grpo"),
            (["--method", "lora", "--reward", "exact"], "--reward goes with --method grpo")):
        assert main(["tune", str(base), str(pairs), "-o", str(tmp_path / "x"), *argv]) == 1
        e = capsys.readouterr().err
        assert e.startswith("error: ") and needle in e and e.count("\n") == 1
    assert main(["tune", str(base), str(pairs), "-o", str(tmp_path / "dpo"), "--method", "dpo", "--steps", "2",
                 "--batch", "4", "--gguf", "f32", "--name", "dpo-tiny"]) == 0
    printed = capsys.readouterr().out
    assert "tuned with dpo for 2 steps" in printed and "run it: llmdesk run -m dpo-tiny:f32" in printed
    assert catalog.get("dpo-tiny", "f32") is not None and (tmp_path / "dpo" / "model-f32.gguf").is_file()
