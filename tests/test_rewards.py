"""DPO and GRPO (train/rewards.py) on the tiny real Llama that tests/test_tune.py builds: the data
checks, a DPO run that moves the model toward the chosen answers (measured here, on the pairs, in
transformers), a GRPO run that logs the reward and each grader's share and measures the held-out
reward before and after, with a grader that raises counted rather than fatal."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch
import transformers

from llmdesk.errors import LlmdeskError
from llmdesk.eval.graders import parse_graders
from llmdesk.train.rewards import RewardConfig, last_checkpoint, read_pairs, read_prompts, run

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
    with pytest.raises(LlmdeskError, match="must be a multiple of --generations"):
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


def test_dpo_with_sft_weight_raises_the_chosen_answers_too(base, tmp_path):  # noqa: F811
    """--sft-weight (RPO): the chosen answers' own loss beside DPO's; their log-probability rises
    (plain DPO only widens the margin, and can lower both), and the margin still grows."""
    import peft

    pairs = [{"prompt": ASK + w, "chosen": f" [{w.upper()}]", "rejected": f" {w}"} for w in WORDS] * 3
    data = jsonl(tmp_path / "pairs.jsonl", pairs)
    r = run("dpo", base, data, tmp_path / "out", RewardConfig(method="dpo", steps=8, batch=4, lr=2e-3, sft_weight=1.0))
    tok = transformers.AutoTokenizer.from_pretrained(base)
    before = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    after = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           str(r.adapter))
    chosen = lambda m: sum(logp(m, tok, p["prompt"], p["chosen"]) for p in pairs[:8]) / 8  # noqa: E731
    margin = lambda m: sum(logp(m, tok, p["prompt"], p["chosen"]) - logp(m, tok, p["prompt"], p["rejected"])  # noqa: E731
                           for p in pairs[:8]) / 8
    assert chosen(after) > chosen(before) + 1.0
    assert margin(after) > margin(before) + 0.5


@pytest.mark.slow
def test_grpo_logs_rewards_and_measures_the_held_out_prompts(base, tmp_path):  # noqa: F811
    rng = random.Random(0)
    rows = [{"prompt": ASK + w, "answer": f"[{w.upper()}]"} for w in (rng.choice(WORDS) for _ in range(24))]
    data = jsonl(tmp_path / "prompts.jsonl", rows)
    grader = tmp_path / "g.py"
    grader.write_text("def flaky(prompts, completions, **kw):\n    raise RuntimeError('down')\n")
    specs = [r"regex:e", f"python:{grader}:flaky"]
    graders, weights = parse_graders(specs, "1,0.5")
    events = []
    r = run("grpo", base, data, tmp_path / "out",
            RewardConfig(method="grpo", steps=3, batch=8, num_generations=4, max_completion_tokens=8),
            graders=graders, weights=weights, on_event=lambda k, d: events.append((k, d)))
    assert r.val_rows == 2 and r.train_rows == 22
    assert r.reward_before is not None and r.reward_after is not None
    assert set(r.grader_before) == {r"regex:e", "python:g.py:flaky"}
    assert r.graded_none["python:g.py:flaky"] > 0  # every call raised: counted, the run went on
    steps = [h for h in r.history if "reward" in h]
    assert len(steps) == 3 and all(r"rewards/regex:e/mean" in h for h in steps)
    assert [d["when"] for k, d in events if k == "reward"] == ["before", "after"]

    # Ctrl-C after step 2, then --resume: the sampled completions, so the rewards, are those of the run above
    # (step 3 samples from the weights the resumed run rebuilt)
    def ctrl_c_at_2(kind, d):
        if kind == "step" and d["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = RewardConfig(method="grpo", steps=3, batch=8, num_generations=4, max_completion_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        run("grpo", base, data, tmp_path / "cut", cfg, graders=parse_graders(specs, "1,0.5")[0], weights=weights,
            on_event=ctrl_c_at_2)
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    again = run("grpo", base, data, tmp_path / "cut", cfg, graders=parse_graders(specs, "1,0.5")[0], weights=weights,
                resume=True)
    assert [h[r"rewards/regex:e/mean"] for h in again.history] == [h[r"rewards/regex:e/mean"] for h in steps]
    assert len({h[r"rewards/regex:e/mean"] for h in steps}) > 1  # (the rewards moved: the check is not vacuous)
    assert again.reward_after == r.reward_after


def test_cli(base, tmp_path, user_dir, capsys):  # noqa: F811
    from llmdesk.cli.main import main
    from llmdesk.store import catalog

    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": ASK + w, "chosen": f"[{w.upper()}]", "rejected": w}
                                             for w in WORDS])
    for argv, needle in (
            (["--method", "grpo"], "--method grpo needs graders"),
            (["--method", "dpo", "--resume"], "nothing to resume (no checkpoint in trainer/)"),
            (["--method", "grpo", "--reward", "exact", "--epochs", "2"], "--epochs is not available with --method grpo"),
            (["--method", "dpo", "--reward", "exact"], "--reward goes with --method grpo"),
            (["--method", "lora", "--sft-weight", "1"], "--sft-weight goes with --method dpo"),
            (["--method", "grpo", "--reward", "exact", "--sft-weight", "1"], "--sft-weight goes with --method dpo"),
            (["--method", "lora", "--reward", "exact"], "--reward goes with --method grpo")):
        assert main(["tune", str(base), str(pairs), "-o", str(tmp_path / "x"), *argv]) == 1
        e = capsys.readouterr().err
        assert e.startswith("error: ") and needle in e and e.count("\n") == 1
    assert main(["tune", str(base), str(pairs), "-o", str(tmp_path / "dpo"), "--method", "dpo", "--steps", "2",
                 "--batch", "4", "--gguf", "f32", "--name", "dpo-tiny"]) == 0
    printed = capsys.readouterr().out
    assert "tuned with dpo for 2 steps" in printed and "run it: llmdesk run -m dpo-tiny:f32" in printed
    assert catalog.get("dpo-tiny", "f32") is not None and (tmp_path / "dpo" / "model-f32.gguf").is_file()


def test_dpo_resume_is_exact_after_ctrl_c_and_the_adapter_runs_in_llama_cpp(base, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C after step 3 (between checkpoints at 2 and 4) leaves a whole checkpoint of step 3 and
    no outputs; --resume replays the losses of an uninterrupted run exactly and writes the adapter,
    also as a llama.cpp LoRA GGUF whose logits beside the base's GGUF are peft's."""
    import numpy as np
    import peft

    from llmdesk.formats.convert import convert
    from llmdesk.runtime.llama import LlamaModel, LoraAdapter
    from test_lora import engine_run

    pairs = [{"prompt": ASK + w, "chosen": f" [{w.upper()}]", "rejected": f" {w}"} for w in WORDS] * 3
    data = jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = lambda **kw: RewardConfig(**{"method": "dpo", "steps": 6, "batch": 4, "lr": 2e-3, "save_every": 2,  # noqa: E731
                                       "dropout": 0.1, **kw})
    full = run("dpo", base, data, tmp_path / "full", cfg())

    def ctrl_c_at_3(kind, d):
        if kind == "step" and d["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends: taken when the step in flight ends

    cut = tmp_path / "cut"
    events = []
    with pytest.raises(KeyboardInterrupt):
        run("dpo", base, data, cut, cfg(), on_event=lambda k, d: (events.append((k, d)), ctrl_c_at_3(k, d)))
    assert last_checkpoint(cut).name == "checkpoint-3"
    assert ("interrupted", {"step": 3, "checkpoint": str(cut / "trainer" / "checkpoint-3")}) in events
    assert sorted(p.name for p in cut.iterdir()) == ["run.json", "trainer"]  # no adapter, no metrics, no .part
    with pytest.raises(LlmdeskError, match="pass --resume"):
        run("dpo", base, data, cut, cfg())
    with pytest.raises(LlmdeskError, match="was trained with beta 0.1, not 0.2"):
        run("dpo", base, data, cut, cfg(beta=0.2), resume=True)
    with pytest.raises(LlmdeskError, match="nothing to resume"):
        run("dpo", base, data, tmp_path / "never", cfg(), resume=True)
    resumed = run("dpo", base, data, cut, cfg(), resume=True, lora_gguf=True)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert not (cut / "trainer").exists() and resumed.lora_gguf == cut / "adapter.gguf"

    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = tok(ASK + "stone [STONE]").input_ids
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                               str(resumed.adapter)).eval()
        ref = model(torch.tensor([ids])).logits[0].numpy()
    base_gguf = convert(base, tmp_path / "base-f32.gguf", out_type="f32", check_with=LlamaModel).path
    llama = LlamaModel(base_gguf)
    try:
        got, _ = engine_run(llama, list(ids), lora=[(LoraAdapter(llama, resumed.lora_gguf), 1.0)])
    finally:
        llama.close()
    assert float(np.abs(ref[:-1] - got).max()) < 1e-3


@pytest.mark.parametrize("template, stops", [
    (None, ["<|endoftext|>", "<|im_end|>"]),  # the base's own ChatML: turns end with <|im_end|>, text with eos
    ("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", ["<|endoftext|>"]),  # turns end with eos
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}", ["<|endoftext|>"]),  # no token
])
def test_grpo_sampling_stops_where_sft_trains_the_turn_to_end(base, template, stops):  # noqa: F811
    from llmdesk.train.rewards import _stop_at_end_of_turn

    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    assert tok.eos_token == "<|endoftext|>"
    if template is not None:
        tok.chat_template = template
    _stop_at_end_of_turn(model, tok)
    eos = model.generation_config.eos_token_id
    assert tok.convert_ids_to_tokens(eos if isinstance(eos, list) else [eos]) == stops


def test_grpo_completions_end_with_the_assistant_turn(base, tmp_path):  # noqa: F811
    """The tiny ChatML model's end of text is <|endoftext|>, its turns end with <|im_end|>: once it
    has learnt the task, its sampled completions stop at <|im_end|>, so `exact` can match them
    (they ran on to the token limit, and the held-out reward was 0 for a model that answered right)."""
    from llmdesk.train.tune import TuneConfig, tune

    rng = random.Random(0)
    sft_rows = [{"messages": [{"role": "user", "content": ASK + w}, {"role": "assistant", "content": f"[{w.upper()}]"}]}
                for w in (rng.choice(WORDS) for _ in range(200))]
    sft = tune(base, [jsonl(tmp_path / "sft.jsonl", sft_rows)], tmp_path / "sft",
               TuneConfig(steps=60, lr=1e-2, rank=8, batch=8, dropout=0.0, val_split=0.0), merge=True)
    rows = [{"prompt": ASK + w, "answer": f"[{w.upper()}]"} for w in WORDS * 2]
    r = run("grpo", sft.merged, jsonl(tmp_path / "prompts.jsonl", rows), tmp_path / "grpo",
            RewardConfig(method="grpo", steps=1, batch=8, num_generations=4, max_completion_tokens=8, temperature=0.3,
                         val_split=0.5),
            graders=parse_graders("exact")[0], weights=[1.0])
    assert r.reward_before > 0.3
    assert r.history[0]["completions/clipped_ratio"] < 1.0
