"""`llmdesk eval run` and `eval compare` on tiny real models: acc / acc_norm / mc2 / exact_match
against independent computations, per-item log-likelihoods against transformers, resuming an
interrupted run, the results store, the CLI's output and its one-line errors, and the plot."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (the train extra: missing, this fails)
import transformers

from llmdesk.demo import default_model_path
from llmdesk.errors import LlmdeskError
from llmdesk.eval import harness
from llmdesk.eval.compare import compare, plot
from llmdesk.eval.harness import Identity, evaluate, record
from llmdesk.eval.tasks import load_task
from llmdesk.runtime.engine import Engine
from llmdesk.runtime.llama import blas
from llmdesk.runtime.model import Model
from llmdesk.store import results
from llmdesk.store.db import connect

from test_engine_scoring import PARITY, hf, hf_logprobs  # noqa: F401  (hf: the checkpoint and its f32 GGUF)
from test_eval import one_error, run  # the CLI in-process, and its one-line errors

DEMO = default_model_path()


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One llama.cpp thread: the machine is shared and these models are tiny."""
    import llmdesk.runtime.llama as rl

    monkeypatch.setattr(rl, "default_threads", lambda: 1)


# ---------------------------------------------------------------------------------------------
# tasks: the built-in specs over data written here in the public releases' layouts


WORDS = "the fox dog cache keys values tokens speed bits weights quick lazy brown capital".split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mmlu_task(folder: Path, n: int, seed: int = 0):
    """cais/mmlu's columns (question, subject, choices, answer): the built-in `mmlu`."""
    rng = random.Random(seed)

    def rows(k):
        return [{"question": " ".join(rng.choices(WORDS, k=4)) + "?", "subject": "toy",
                 "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 2))) for _ in range(4)],
                 "answer": rng.randrange(4)} for _ in range(k)]

    write_jsonl(folder / "test.jsonl", rows(n))
    write_jsonl(folder / "dev.jsonl", rows(2))
    return load_task("mmlu", data=folder)


def hellaswag_task(folder: Path, n: int, seed: int = 1):
    """Rowan/hellaswag's columns: the built-in `hellaswag` (endings of different lengths, so
    acc_norm differs from acc)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = " ".join(rng.choices(WORDS, k=5)) + ".", " ".join(rng.choices(WORDS, k=2))
        rows.append({"ind": i, "activity_label": rng.choice(WORDS).title(), "ctx_a": a, "ctx_b": b, "ctx": f"{a} {b}",
                     "endings": [" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) + "." for _ in range(4)],
                     "source_id": f"toy~{i}", "split": "val", "split_type": "indomain", "label": str(rng.randrange(4))})
    write_jsonl(folder / "validation.jsonl", rows)
    return load_task("hellaswag", data=folder)


def truthfulqa_task(folder: Path, n: int, seed: int = 2):
    """truthful_qa multiple_choice's columns (question, mc2_targets: several true answers), in a
    task file of the user's with a short prompt (the built-in's six examples outgrow these models)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(3, 5)
        labels = [1] * rng.randint(1, k - 1)
        rows.append({"question": " ".join(rng.choices(WORDS, k=4)) + "?",
                     "mc1_targets": {"choices": ["x"], "labels": [1]},
                     "mc2_targets": {"choices": [" ".join(rng.choices(WORDS, k=3)) + "." for _ in range(k)],
                                     "labels": labels + [0] * (k - len(labels))}})
    write_jsonl(folder / "validation.jsonl", rows)
    spec = folder / "tqa.yaml"
    spec.write_text("name: tqa\nkind: multiple_choice\ndata:\n  files: {validation: validation.jsonl}\n"
                    "split: validation\nfewshot:\n  shots: 0\ntext: \"Q: {{question}}\\nA:\"\n"
                    "choices: \"{{mc2_targets.choices}}\"\nlabels: \"{{mc2_targets.labels}}\"\nmetrics: [mc2]\n")
    return load_task(spec)


def gsm_task(folder: Path, n: int):
    """openai/gsm8k's columns (question, answer with "#### N"): the built-in `gsm8k`, 0-shot."""
    write_jsonl(folder / "test.jsonl", [{"question": f"What is {i} plus {i + 1}?",
                                         "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"} for i in range(n)])
    write_jsonl(folder / "train.jsonl", [{"question": "What is 1 plus 1?", "answer": "1 + 1 = 2\n#### 2"}])
    task = load_task("gsm8k", data=folder)
    task.max_tokens = 24  # the demo model's context is 128 tokens; its answers are short anyway
    return task


def exact_model(path: Path, *, slots: int = 4, unified: bool = True) -> Model:
    """A Model whose Engine keeps an f32 KV cache without flash attention, so that batched and
    one-at-a-time scores agree to float noise (docs/scoring.md: llama.cpp's f16 cache and CPU
    flash attention move them by ~1e-2, enough to swap two close choices)."""
    m = Model(path, slots=1)
    m.engine.close()
    m.engine = Engine(m.llama, n_ctx=m.n_ctx, n_slots=slots, cache_type="f32", flash_attn=False, kv_unified=unified)
    return m


def one_at_a_time(m: Model, item: Item) -> list[float]:
    return [m.loglikelihood(item.context, c)[0] for c in item.choices]


# ---------------------------------------------------------------------------------------------
# the numbers


@pytest.mark.parametrize("make", [mmlu_task, hellaswag_task], ids=["mmlu-layout", "hellaswag-layout"])
def test_acc_and_acc_norm_equal_an_independent_computation(make, hf, tmp_path):
    task = make(tmp_path, 24)
    with exact_model(hf["gguf"]) as m, exact_model(hf["gguf"], slots=1, unified=False) as alone:
        r = evaluate(m, task, shots=0)
        assert r.n == 24 and set(r.metrics) == {"acc", "acc_norm"}
        assert r.stats["context_tokens_reused"] > 0  # choices shared their question's context
        # the decodes computed what was not reused (and the continuations), less than every context
        new = r.stats["context_tokens"] - r.stats["context_tokens_reused"]
        assert new <= r.stats["tokens_computed"] < r.stats["context_tokens"]
        acc, acc_norm = [], []
        for it in task.items(shots=0):
            lls = one_at_a_time(alone, it)
            np.testing.assert_allclose(r.items[it.index]["ll"], lls, rtol=0, atol=1e-4)
            # lm-eval: argmax of ll, and of ll / len(choice) without the target delimiter
            acc.append(float(np.argmax(lls) == it.gold))
            acc_norm.append(float(np.argmax(np.array(lls) / [len(c[1:]) for c in it.choices]) == it.gold))
    assert r.metrics["acc"].value == pytest.approx(np.mean(acc))
    assert r.metrics["acc_norm"].value == pytest.approx(np.mean(acc_norm))
    assert r.metrics["acc"].stderr == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))
    if make is hellaswag_task:
        assert acc != acc_norm  # the normalisation mattered on some item


def test_mc2_is_the_true_choices_probability_mass(hf, tmp_path):
    task = truthfulqa_task(tmp_path, 10)
    with exact_model(hf["gguf"]) as m:
        r = evaluate(m, task)
        want = []
        for it in task.items():
            p = np.exp(one_at_a_time(m, it))
            want.append(p[np.array(it.labels) == 1].sum() / p.sum())
    assert r.metrics["mc2"].value == pytest.approx(np.mean(want), abs=1e-6)
    assert 0 < r.metrics["mc2"].value < 1 and r.metrics["mc2"].stderr > 0


def test_loglikelihoods_match_transformers(hf, tmp_path):
    """Per item and choice: llmdesk's log-likelihood against transformers' on the checkpoint the
    GGUF was converted from, the pair split by the HF tokenizer as lm-eval's HFLM splits it."""
    tok = transformers.AutoTokenizer.from_pretrained(hf["ckpt"])
    task = mmlu_task(tmp_path, 6)
    with exact_model(hf["gguf"]) as m:
        r = evaluate(m, task, shots=1)
    assert r.shots == 1
    worst = 0.0
    for it in task.items(shots=1):
        assert it.context.count("Answer:") == 2
        for c, got in zip(it.choices, r.items[it.index]["ll"]):
            ctx_enc = tok.encode(it.context)  # lm-eval's _encode_pair (no trailing spaces here)
            cont_enc = tok.encode(it.context + c)[len(ctx_enc):]
            lp = hf_logprobs(hf, ctx_enc + cont_enc)
            want = sum(lp[len(ctx_enc) - 1 + j, t] for j, t in enumerate(cont_enc))
            worst = max(worst, abs(got - want))
    assert worst < PARITY


def test_generation_exact_match(tmp_path):
    task = gsm_task(tmp_path, 6)
    # greedy text batched (3 slots) equals it alone on the default build; on a BLAS build (`make
    # mkl`) the prompts' sums differ with the batch and a near tie can flip: one slot there
    with Model(DEMO, slots=3 if blas() is None else 1) as m:
        r = evaluate(m, task, shots=0)
        for it in task.items(shots=0):
            text = m.generate(it.context, max_tokens=task.max_tokens, temperature=0, stop=task.until)
            got = r.items[it.index]
            assert got["output"] == text and got["answer"] == task.extract(text)
            assert got["exact_match"] == float(task.extract(text) == it.target)
    assert r.metrics["exact_match"].value == np.mean([v["exact_match"] for v in r.items.values()])


def test_generation_through_the_chat_template(tmp_path):
    task = gsm_task(tmp_path, 4)
    with Model(DEMO, slots=2) as m:
        r = evaluate(m, task, shots=0, chat=True)
        plain = evaluate(m, task, shots=0)
        assert r.run_key != plain.run_key and r.chat and r.settings()["chat"] is True
        for it in task.items(shots=0):
            text = m.chat([{"role": "user", "content": it.context}], max_tokens=task.max_tokens, temperature=0,
                          stop=task.until)
            assert r.items[it.index]["output"] == text
        with pytest.raises(LlmdeskError, match="--chat asks generate tasks through the chat template"):
            evaluate(m, mmlu_task(tmp_path / "mc", 2), chat=True)


# ---------------------------------------------------------------------------------------------
# resuming


class Stop(Exception):
    pass


def test_an_interrupted_run_resumes_where_it_stopped(hf, monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "CHUNK_PAIRS", 16)  # 4 items a chunk
    task = hellaswag_task(tmp_path, 20)
    ident = Identity("tiny", "0" * 64)
    said: list[str] = []

    def stop_after_two_chunks(done, total):
        if done >= 8:
            raise Stop

    with exact_model(hf["gguf"]) as m:
        with pytest.raises(Stop):
            evaluate(m, task, identity=ident, limit=12, progress=stop_after_two_chunks)
        r = evaluate(m, task, identity=ident, limit=12, say=said.append)
        assert said == ["resuming: 8 of 12 items of hellaswag already scored"]
        assert r.resumed == 8 and r.stats["pairs"] == 4 * 4  # only the rest was scored
        # the limit is not in the run key: a larger one reuses every item scored so far
        r = evaluate(m, task, identity=ident, say=said.append)
        assert said[-1] == "resuming: 12 of 20 items of hellaswag already scored"
        assert r.resumed == 12 and r.stats["pairs"] == 8 * 4 and r.n == 20
        fresh = evaluate(m, task, identity=ident, fresh=True)
        assert fresh.resumed == 0 and fresh.stats["pairs"] == 80
    for k in ("acc", "acc_norm"):
        assert r.metrics[k].value == fresh.metrics[k].value
    for i in r.items:
        np.testing.assert_allclose(r.items[i]["ll"], fresh.items[i]["ll"], atol=1e-4)


def test_another_seed_or_shot_count_is_another_run(hf, tmp_path):
    task = mmlu_task(tmp_path, 4)
    with exact_model(hf["gguf"]) as m:
        evaluate(m, task, shots=1)
        assert evaluate(m, task, shots=1).resumed == 4
        assert evaluate(m, task, shots=1, seed=7).resumed == 0
        assert evaluate(m, task, shots=0).resumed == 0


def test_a_generation_stopped_midway_keeps_what_finished(tmp_path):
    task = gsm_task(tmp_path, 9)

    def stop(done, total):
        if done >= 3:
            raise Stop

    with Model(DEMO, slots=3) as m:
        with pytest.raises(Stop):
            evaluate(m, task, shots=0, progress=stop)
        said: list[str] = []
        r = evaluate(m, task, shots=0, say=said.append)
    assert said == ["resuming: 3 of 9 items of gsm8k already scored"] and r.resumed == 3


# ---------------------------------------------------------------------------------------------
# the results store and compare


def test_compare_pairs_the_items_of_two_runs(hf, tmp_path):
    task = hellaswag_task(tmp_path, 30)
    a, b = Identity("a", "a" * 64), Identity("b", "b" * 64)
    with exact_model(hf["gguf"]) as m:
        ra = evaluate(m, task, identity=a)
        record(ra)
    with Model(DEMO, slots=4, kv_unified=True) as m:
        rb = evaluate(m, task, identity=b)
        record(rb)
    c = compare([a, b], "hellaswag")
    assert [e.model for e in c.entries] == ["a", "b"] and c.metrics == ["acc", "acc_norm"]
    d = c.entries[1].diff["acc"]
    per = np.array([rb.items[i]["acc"] - ra.items[i]["acc"] for i in ra.items])
    assert d.paired and d.n == 30
    assert d.value == pytest.approx(per.mean()) and d.stderr == pytest.approx(per.std(ddof=1) / math.sqrt(30))
    assert d.significant == (abs(d.value) > 1.96 * d.stderr)
    assert c.entries[0].metrics["acc"].value == pytest.approx(ra.metrics["acc"].value)
    (tmp_path / "plots").mkdir()
    png = plot(c, tmp_path / "plots" / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["cmp.png"]  # no temporary file left
    # the first model on fewer items: the other is compared on those, from its stored items
    with exact_model(hf["gguf"]) as m:
        record(evaluate(m, task, identity=a, limit=10))
    e = compare([a, b], "hellaswag").entries[1]
    assert e.n == 10 and e.diff["acc"].paired and e.diff["acc"].n == 10
    assert e.metrics["acc"].value == pytest.approx(np.mean([rb.items[i]["acc"] for i in range(10)]))
    record(ra)
    # the per-item results gone: the difference falls back to the unpaired one
    db = connect()
    db.execute("DELETE FROM eval_items WHERE run_key = ?", (rb.run_key,))
    db.commit()
    db.close()
    d = compare([a, b], "hellaswag").entries[1].diff["acc"]
    assert not d.paired
    assert d.stderr == pytest.approx(math.hypot(ra.metrics["acc"].stderr, rb.metrics["acc"].stderr))


def test_compare_needs_matching_results(hf, tmp_path):
    a, b = Identity("a", "a" * 64), Identity("b", "b" * 64)
    with pytest.raises(LlmdeskError, match="no stored result of a"):
        compare([a, b], "mmlu")
    with exact_model(hf["gguf"]) as m:
        task = mmlu_task(tmp_path, 4)
        record(evaluate(m, task, identity=a, shots=1))
        record(evaluate(m, task, identity=b, shots=0))
    with pytest.raises(LlmdeskError, match="no stored result of b .*shots 1"):
        compare([a, b], "mmlu")
    rows = results.query("eval")
    assert rows[0]["settings"]["task_sha256"] == task.sha256 and rows[0]["model_sha256"] == "b" * 64


# ---------------------------------------------------------------------------------------------
# a remote endpoint, and one that fails in the middle of a run


def demo_server(port: int = 0):
    from llmdesk.serve import BackgroundServer, ServeConfig, create_app

    return BackgroundServer(create_app(ServeConfig(models=[str(DEMO)], parallel=2, ctx=512, threads=1)),
                            port=port).start()


def test_a_remote_model_scores_the_same_items(tmp_path):
    from llmdesk.runtime.remote import RemoteModel

    task = mmlu_task(tmp_path, 8)
    with Model(DEMO, slots=2, kv_unified=True) as m:
        local = evaluate(m, task, shots=1)
    server = demo_server()
    try:
        with RemoteModel(f"openai:{server.url}/v1#{DEMO.name}") as remote:
            r = evaluate(remote, task, shots=1)
    finally:
        server.stop()
    assert r.model == f"openai:{server.url}/v1#{DEMO.name}" and r.model_sha256 is None
    assert set(r.items) == set(local.items) == set(range(8))
    for i in local.items:  # llama.cpp's f16 cache and flash attention: ~1e-2 between batch layouts
        np.testing.assert_allclose(r.items[i]["ll"], local.items[i]["ll"], rtol=1e-2, atol=2e-2)


def test_an_endpoint_that_fails_midway_keeps_what_was_scored(tmp_path):
    from llmdesk.runtime.remote import RemoteModel

    task = gsm_task(tmp_path, 12)
    server = demo_server()
    port = server.port

    stopped: list[bool] = []

    def stop_the_server(done, total):
        if done >= 4 and not stopped:
            server.stop()
            stopped.append(True)

    remote = RemoteModel(f"openai:{server.url}/v1#{DEMO.name}", max_retries=1, max_retry_s=2)
    try:
        with pytest.raises(LlmdeskError) as e:
            evaluate(remote, task, shots=0, progress=stop_the_server)
        kept = int(re.search(r"\((\d+) of 12 items of gsm8k are stored: run it again to resume\)$", str(e.value))[1])
        assert kept >= 4 and "\n" not in str(e.value)
        server = demo_server(port)  # the endpoint is back
        said: list[str] = []
        r = evaluate(remote, task, shots=0, say=said.append)
        assert said == [f"resuming: {kept} of 12 items of gsm8k already scored"] and r.resumed == kept
        assert r.n == 12 and set(r.items) == set(range(12))
    finally:
        remote.close()
        server.stop()


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_run_compare_and_results(hf, tmp_path, capsys):
    mmlu_task(tmp_path / "mmlu", 12)
    args = ("--task", "mmlu", "--data", tmp_path / "mmlu", "--shots", "1", "--slots", "2")
    code, o, e = run(capsys, "eval", "run", DEMO, hf["gguf"], *args, "--limit", "8", "--json")
    assert code == 0, e
    first = json.loads(o)
    assert [(r["model"], r["task"], r["n"], r["shots"]) for r in first] == \
        [(DEMO.name, "mmlu", 8, 1), (hf["gguf"].name, "mmlu", 8, 1)]
    assert set(first[0]["metrics"]) == {"acc", "acc_norm"} and first[0]["metrics"]["acc"]["stderr"] > 0
    code, o, e = run(capsys, "eval", "run", DEMO, hf["gguf"], *args)
    assert code == 0, e
    assert e.count("resuming: 8 of 12 items of mmlu already scored") == 2
    lines = o.splitlines()
    assert lines[0] == "mmlu (1-shot, seed 1234)" and lines[1].split() == ["MODEL", "METRIC", "SCORE", "±", "STDERR", "N"]
    assert [ln.split()[:2] + ln.split()[-1:] for ln in lines[2:]] == [
        [DEMO.name, "acc", "12"], [DEMO.name, "acc_norm", "12"],
        [hf["gguf"].name, "acc", "12"], [hf["gguf"].name, "acc_norm", "12"]]

    plot_file = tmp_path / "cmp.png"
    code, o, e = run(capsys, "eval", "compare", DEMO, hf["gguf"], "--task", "mmlu", "--plot", plot_file)
    assert code == 0, e
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and e.strip() == f"plot: {plot_file}"
    lines = o.splitlines()
    assert lines[0].startswith(f"mmlu (1-shot, seed 1234, task ") and lines[0].endswith(f"differences to {DEMO.name}")
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == [DEMO.name, DEMO.name, hf["gguf"].name, hf["gguf"].name]
    assert rows[2][-1] == "(paired)" and rows[2][-2] in ("yes", "no")
    code, o, e = run(capsys, "eval", "compare", DEMO, hf["gguf"], "--task", "mmlu", "--json")
    c = json.loads(o)
    d = c["models"][1]["difference"]["acc"]
    assert d["paired"] and d["n"] == 12 and c["models"][0]["difference"] == {}
    want = c["models"][1]["metrics"]["acc"]["value"] - c["models"][0]["metrics"]["acc"]["value"]
    assert d["value"] == pytest.approx(want)

    code, o, e = run(capsys, "results", "--kind", "eval")
    assert code == 0 and o.count("mmlu, acc") == 4 and "n 12" in o and "n 8" in o


def on_a_terminal(args: list[str], columns: int) -> str:
    """What a terminal `columns` wide shows of a command (stdout and stderr, escapes removed)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the command has ended and closed its side
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert p.wait(timeout=120) == 0, shown
    return re.sub(r"\x1b\[[0-9;]*m", "", shown.decode().replace("\r\n", "\n"))


def test_cli_compare_fits_long_names_in_the_terminal(hf, tmp_path, capsys):
    """BASE+ADAPTER with a long adapter name on a terminal 100 columns wide: each row is one line,
    the name shortened in the middle (the base and the adapter's end kept), the whole name under
    the table, and the plot's line last; piped, the names are whole."""
    import subprocess

    from conftest import llmdesk_exe
    from llmdesk.formats.lora_gguf import write_lora_gguf
    from test_lora import peft_model

    mmlu_task(tmp_path / "mmlu", 4)
    run_dir = tmp_path / "words-lora-rank16-lr1e-2-steps120-seed0"  # what `tune -o` writes: adapter.gguf
    peft_model(hf["ckpt"]).save_pretrained(tmp_path / "peft")
    write_lora_gguf(tmp_path / "peft", hf["ckpt"], run_dir / "adapter.gguf")
    models = [str(hf["gguf"]), f"{hf['gguf']}+{run_dir}"]
    code, o, e = run(capsys, "eval", "run", *models, "--task", "mmlu", "--data", tmp_path / "mmlu", "--shots", "0")
    assert code == 0, e
    long = f"{hf['gguf'].name}+{run_dir.name}"
    assert f"\n{long}  acc " in o

    compare = [llmdesk_exe(), "eval", "compare", *models, "--task", "mmlu"]
    lines = on_a_terminal([*compare, "--plot", str(tmp_path / "c.png")], 100).splitlines()
    assert max(len(ln) for ln in lines) <= 100, lines
    assert lines[0].startswith("mmlu (0-shot, task ") and lines[1].split()[:2] == ["MODEL", "METRIC"]
    rows = [ln.split() for ln in lines[2:6]]
    assert [r[:2] for r in rows[:2]] == [[hf["gguf"].name, "acc"], [hf["gguf"].name, "acc_norm"]]
    short = rows[2][0]
    assert [r[:2] for r in rows[2:]] == [[short, "acc"], [short, "acc_norm"]] and rows[3][-1] == "(paired)"
    head, tail = short.split("…")
    assert long.startswith(head) and long.endswith(tail) and head.startswith(hf["gguf"].name + "+")
    assert tail.endswith("seed0") and len(short) < len(long)
    assert lines[6:] == [f"{short} = {long}", f"plot: {tmp_path / 'c.png'}"]

    piped = subprocess.run(compare, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert piped.returncode == 0, piped.stderr
    assert [ln.split()[0] for ln in piped.stdout.splitlines()[2:]] == [hf["gguf"].name] * 2 + [long] * 2
    assert "…" not in piped.stdout and len(piped.stdout.splitlines()) == 6


def test_cli_bad_input(tmp_path, capsys):
    mmlu_task(tmp_path / "mmlu", 4)
    data = ("--data", tmp_path / "mmlu")
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    line = one_error(*run(capsys, "eval", "run", fake, "--task", "mmlu", *data)[::2])
    assert "notes.gguf" in line
    line = one_error(*run(capsys, "eval", "run", DEMO, "nosuchmodel:q4", "--task", "mmlu", *data)[::2])
    assert "model 'nosuchmodel:q4' not found" in line  # before the first model is scored
    line = one_error(*run(capsys, "eval", "run", DEMO, "--task", "nosuch")[::2])
    assert "unknown task 'nosuch'" in line
    line = one_error(*run(capsys, "eval", "run", DEMO, "--task", "mmlu", "--data", tmp_path / "none")[::2])
    assert "no such file or folder" in line
    line = one_error(*run(capsys, "eval", "run", DEMO, "--task", "mmlu", *data, "--limit", "0")[::2])
    assert "--limit must be at least 1" in line
    line = one_error(*run(capsys, "eval", "run", DEMO, "--task", "mmlu", *data, "--shots", "5")[::2])
    assert "5-shot needs 5 examples" in line
    line = one_error(*run(capsys, "eval", "compare", DEMO, fake, "--task", "mmlu")[::2])
    assert "no stored result of llmdesk-demo.gguf on task 'mmlu'" in line
    line = one_error(*run(capsys, "eval", "compare", DEMO, "--task", "mmlu")[::2])
    assert "at least two models" in line
    assert results.query("eval") == []


def test_cli_subprocess_one_line_errors(tmp_path):
    """As a user runs it: the installed command, a file that is not a model, an endpoint that is down."""
    import socket
    import subprocess

    from conftest import llmdesk_exe

    mmlu_task(tmp_path / "mmlu", 4)
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for model, says in ((fake, "notes.gguf"), (f"openai:http://127.0.0.1:{port}/v1#m", "connection refused")):
        p = subprocess.run([llmdesk_exe(), "eval", "run", str(model), "--task", "mmlu", "--data",
                            str(tmp_path / "mmlu"), "--threads", "1"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr


def test_ctrl_c_keeps_whole_chunks_and_the_rerun_resumes(tmp_path, user_dir):
    """As a user: Ctrl-C in the middle of `llmdesk eval run`; the items stored are whole chunks,
    the command says one line, and the rerun scores only the rest."""
    import signal
    import subprocess

    from conftest import llmdesk_exe, sigint_as_a_terminal_sends_it
    from test_serve_util import wait_until

    mmlu_task(tmp_path / "mmlu", 300)
    cmd = [llmdesk_exe(), "eval", "run", str(DEMO), "--task", "mmlu", "--data", str(tmp_path / "mmlu"),
           "--shots", "0", "--threads", "1", "--slots", "2"]

    def stored() -> int:
        """Rows in eval_items, read as a bystander (read-only: the command makes and migrates the
        database; while it does, or before, that is 0)."""
        import sqlite3

        path = user_dir / "llmdesk.db"
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM eval_items").fetchone()[0]
        except sqlite3.OperationalError:  # no table yet, or locked while being made
            return 0
        finally:
            db.close()

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                         preexec_fn=sigint_as_a_terminal_sends_it)
    try:
        wait_until(stored, timeout=120)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    kept = stored()
    assert 0 < kept < 300 and kept % (harness.CHUNK_PAIRS // 4) == 0  # whole chunks
    assert results.query("eval") == []  # no result for an unfinished run
    p = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == f"resuming: {kept} of 300 items of mmlu already scored"
    r = json.loads(p.stdout)[0]
    assert r["resumed"] == kept and r["n"] == 300 and r["stats"]["pairs"] == (300 - kept) * 4


def test_cli_runs_a_hugging_face_checkpoint_folder(hf, tmp_path, capsys):
    """A checkpoint folder is converted to GGUF (f16) once and scored; its identity is the GGUF's."""
    mmlu_task(tmp_path / "mmlu", 4)
    args = ("eval", "run", hf["ckpt"], "--task", "mmlu", "--data", tmp_path / "mmlu", "--shots", "0", "--json")
    code, o, e = run(capsys, *args)
    assert code == 0, e
    assert e.strip() == f"converting {hf['ckpt']} to GGUF (f16) first"
    r = json.loads(o)[0]
    assert r["model"] == "ckpt:f16" and len(r["model_sha256"]) == 64 and r["n"] == 4
    code, o, e = run(capsys, *args)
    assert code == 0 and e.strip() == "resuming: 4 of 4 items of mmlu already scored"  # no second conversion
