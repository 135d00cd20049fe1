"""llmdesk synth: rows made by a real (tiny, random) model through the Engine; seeded, resumable,
filtered (near duplicates measured on a planted set), ranked into preference pairs."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

import llmdesk
from llmdesk.errors import LlmdeskError
from llmdesk.eval.graders import parse_graders
from llmdesk.train import synth

from conftest import llmdesk_exe

WORDS = ("model token layer weight cache batch prompt answer engine server quant file memory speed text "
         "train data loss step rank adapter merge convert store search chunk vector index judge arena vote").split()


@pytest.fixture(scope="module")
def model(tiny_gguf):
    m = llmdesk.load(str(tiny_gguf))
    yield m
    m.close()


def settings(mode="answers", **kw):
    base = dict(mode=mode, model="tiny", n=6, seed=1, temperature=0.9, max_tokens=12, batch=4)
    return synth.SynthSettings(**{**base, **kw})


PROMPTS = [{"prompt": f"Say something about {w}.", "answer": w} for w in WORDS[:6]]


def test_answers_are_seeded_and_carry_provenance(model, tmp_path):
    s = settings()
    r1 = synth.generate(model, synth.answer_jobs(PROMPTS, s, "p.jsonl"), s, tmp_path / "a.jsonl")
    r2 = synth.generate(model, synth.answer_jobs(PROMPTS, s, "p.jsonl"), s, tmp_path / "b.jsonl")
    a, b = (tmp_path / "a.jsonl").read_text(), (tmp_path / "b.jsonl").read_text()
    assert a == b and r1.generated == 6 and r1.kept == r2.kept
    rows = [json.loads(x) for x in a.splitlines()]
    assert all(set(r) == {"prompt", "completion", "provenance"} for r in rows)
    assert rows[0]["prompt"] == "Say something about model."
    assert rows[0]["provenance"] | {} == {"model": "tiny", "mode": "answers", "seed": 1_000_003, "template": "answers-v1",
                                          "source": "", "index": 0, "row": 1}
    assert not (tmp_path / "a.jsonl.part").exists()
    # each row is what one seeded request gives alone
    alone = model.respond([{"role": "user", "content": PROMPTS[2]["prompt"]}], seed=1_000_005, temperature=0.9,
                          max_tokens=12).text
    assert rows[2]["completion"] == alone.strip()
    other = settings(seed=2)
    synth.generate(model, synth.answer_jobs(PROMPTS, other, "p.jsonl"), other, tmp_path / "c.jsonl")
    assert (tmp_path / "c.jsonl").read_text() != a


def test_an_interrupted_run_continues_where_it_stopped(model, tmp_path):
    s = settings(n=6, batch=2)
    full = tmp_path / "full.jsonl"
    synth.generate(model, synth.answer_jobs(PROMPTS, s, "p.jsonl"), s, full)
    out = tmp_path / "out.jsonl"

    def stop_after_two_batches(done, total, seconds):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synth.generate(model, synth.answer_jobs(PROMPTS, s, "p.jsonl"), s, out, on_progress=stop_after_two_batches)
    part = tmp_path / "out.jsonl.part"
    assert not out.exists() and len(part.read_text().splitlines()) == 1 + 4
    with open(part, "a") as f:  # killed in the middle of writing a line
        f.write('{"index": 4, "row": {"prompt": "Say')
    r = synth.generate(model, synth.answer_jobs(PROMPTS, s, "p.jsonl"), s, out)
    assert r.resumed_from == 4 and r.generated == 6
    assert out.read_text() == full.read_text() and not part.exists()
    # a part file of other settings is not mixed in
    with pytest.raises(KeyboardInterrupt):
        synth.generate(model, synth.answer_jobs(PROMPTS, s, "p.jsonl"), s, out, on_progress=stop_after_two_batches)
    other = settings(n=6, batch=2, seed=9)
    with pytest.raises(LlmdeskError, match="holds a run with other settings"):
        synth.generate(model, synth.answer_jobs(PROMPTS, other, "p.jsonl"), other, out)


def test_near_duplicates_on_a_planted_set():
    rng = random.Random(0)
    distinct = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    near = []
    for t in distinct[:50]:  # one word in forty changed
        w = t.split()
        w[rng.randrange(len(w))] = "different"
        near.append(" ".join(w))
    exact = [distinct[i].upper() + "  " for i in range(50, 60)]  # the same after normalising
    texts = distinct + near + exact
    drop = synth.near_duplicates(texts, 0.8)
    planted = set(range(200, 260))
    assert planted <= drop  # every planted duplicate found
    assert len(drop - planted) <= 2  # (random texts over 30 words share few 3-grams)
    assert synth.near_duplicates(texts, 1.0) == set(range(250, 260))  # 1.0: exact only


def test_filters():
    rows = [{"prompt": "Tell me about the weather in the city.", "completion": "It is sunny and warm in the city today."},
            {"prompt": "x", "completion": ""},
            {"prompt": "Erzähl mir vom Wetter.", "completion": "Es ist sonnig und warm heute in der Stadt."},
            {"prompt": "Tell me about the weather in the city.", "completion": "It is sunny and warm in the city today."}]
    kept, removed = synth.apply_filters(rows, synth.Filters(min_chars=5, language="en"))
    assert kept == rows[:1]
    assert removed == {"too short": 1, "language": 1, "near duplicate": 1}
    with pytest.raises(LlmdeskError, match="needs a judge model"):
        synth.apply_filters(rows, synth.Filters(judge_threshold=5))


def test_instruct_and_docs(model, tmp_path):
    s = settings("instruct", n=4)
    tasks = ["Write a haiku about the sea.", "List three uses of a paperclip.", "Explain what a GPU does.",
             "Translate 'good morning' into French.", "Summarise the plot of Hamlet."]
    r = synth.generate(model, synth.instruct_jobs(tasks, s), s, tmp_path / "i.jsonl", filters=synth.Filters(min_chars=1))
    rows = [json.loads(x) for x in (tmp_path / "i.jsonl").read_text().splitlines()]
    assert r.generated == 4 and len(rows) == r.kept
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert len(row["provenance"]["seed_tasks"]) == 4 and row["provenance"]["template"] == "instruct-v1"
    with pytest.raises(LlmdeskError, match="at least 2 seed tasks"):
        list(synth.instruct_jobs(tasks[:1], s))

    doc = tmp_path / "notes.md"
    doc.write_text("# Caching\n\n" + " ".join(["The prompt cache keeps the tokens of earlier requests so that a "
                                                "follow-up question is answered without reading them again."] * 3) + "\n")
    items = synth.passages(doc)
    assert items[0]["headings"] == ["Caching"] and items[0]["path"] == str(doc)
    d = settings("docs", n=3)
    synth.generate(model, synth.docs_jobs(items, d), d, tmp_path / "d.jsonl")  # a random model rarely writes "Question:"
    assert synth._row(d, next(synth.docs_jobs(items, d)), ["Question: What does the cache keep?\nAnswer: Tokens."]) \
        ["messages"] == [{"role": "user", "content": "What does the cache keep?"}, {"role": "assistant", "content": "Tokens."}]
    with pytest.raises(LlmdeskError, match="no passages of at least 20 words"):
        (tmp_path / "short.md").write_text("# Title\n\nToo short.\n")
        synth.passages(tmp_path / "short.md")


def test_rank_pairs():
    graders = parse_graders("numeric")
    rows = [{"prompt": "2+2?", "candidates": ["It is 4.", "5", "4"], "answer": 4, "provenance": {}},
            {"prompt": "3+3?", "candidates": ["7", "8"], "answer": 6, "provenance": {}}]
    pairs, ties = synth.rank_pairs(rows, *graders)
    assert ties == 1 and pairs == [{"prompt": "2+2?", "chosen": "It is 4.", "rejected": "5",
                                    "provenance": {"scores": [1.0, 0.0]}}]


def test_cli(tiny_gguf, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    env = {**os.environ}
    r = subprocess.run([llmdesk_exe(), "synth", "answers", str(prompts), "-m", str(tiny_gguf), "-o", str(tmp_path / "o.jsonl"),
                        "-k", "3", "--max-tokens", "8", "--rank", "exact", "--pairs", str(tmp_path / "pairs.jsonl")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 6 rows" in r.stdout and "preference pairs" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(len(x["candidates"]) == 3 for x in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt here"}\n')
    r = subprocess.run([llmdesk_exe(), "synth", "answers", str(bad), "-m", str(tiny_gguf), "-o", str(tmp_path / "x.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {bad}: row 1: no 'prompt'") and r.stderr.count("\n") == 1
    r = subprocess.run([llmdesk_exe(), "synth", "answers", str(prompts), "-m", str(tiny_gguf), "-o", str(tmp_path / "x.jsonl"),
                        "-k", "2", "--rank", "exact:city", "--pairs", str(tmp_path / "y.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "needs a column 'city'" in r.stderr


def test_docs_from_a_collection(tmp_path, model):
    from bert_fixtures import make_tiny_bert_gguf

    from llmdesk.rag.ingest import add

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cache.md").write_text("# Caching\n\n" + " ".join(
        ["The prompt cache keeps the tokens of earlier requests so that a follow-up question is answered "
         "without reading them again."] * 3) + "\n\n# Short\n\nToo short.\n")
    assert add([docs], "notes", embedder=str(make_tiny_bert_gguf(tmp_path / "bert"))).added == 1
    items = synth.passages("notes")
    assert items and all(it["path"].endswith("cache.md") and it["headings"] == ["Caching"] for it in items)
    assert items[0]["lines"] == [3, 3] and "prompt cache" in items[0]["text"]  # ("Too short." is left out)
    with pytest.raises(LlmdeskError, match="no such file, folder or collection"):
        synth.passages("nope")
