"""`BASE+ADAPTER` wherever models are compared: `arena auto`, `eval run` and `eval judge` take a
base with LoRA adapters applied (eval.common.resolve_choice), and `llmdesk serve` answers
`MODEL+ADAPTER` for every -m model an adapter was made for. The adapters are real: test_lora's
PEFT LoRA on its tiny Llama, written as a llama.cpp LoRA GGUF, and that base's f32 GGUF.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

import llmdesk
from llmdesk.eval import arena
from llmdesk.eval.common import resolve_choice
from llmdesk.eval.harness import evaluate, identify, open_model
from llmdesk.eval.tasks import load_task
from llmdesk.serve.config import parse_lora
from llmdesk.store import results

from test_arena import one_line_error, run_cli, write_questions
from test_engine_scoring import hf, one_thread  # noqa: F401  (fixtures)
from test_lora import other_base, peft_model, tuned  # noqa: F401  (fixtures)
from test_serve_util import running

QUESTIONS = [{"id": "fox", "question": "What does the quick brown fox do?", "want": "jumps"},
             {"id": "cache", "question": "What holds keys and values?", "want": "the cache"}]
N = 12  # tokens per answer


def answer(path, question: str, lora=None) -> str:
    """A model's answer at temperature 0 through its chat template, as the arena asks it."""
    with llmdesk.Model(path, ctx=256, threads=1, lora=lora) as m:
        return m.respond([{"role": "user", "content": question}], temperature=0, max_tokens=N, truncate=True).text


@pytest.fixture
def stored(hf, tuned):
    """The base and its adapter in the store, as a user imports them: 'tiny' and 'style'."""
    for file, name in ((hf["gguf"], "tiny"), (tuned["lora"], "style")):
        rc, out, err = run_cli("import", str(file), "--name", name)
        assert rc == 0, err


# ---------------------------------------------------------------------------------------------
# arena auto


def test_arena_auto_between_a_base_and_its_adapter(hf, tuned, stored, tmp_path):
    """`arena auto tiny tiny+style`: each side answers as that model does (the adapter's answers
    are the base's with the adapter applied, `llmdesk run --lora`), the votes are stored under
    both names and the leaderboard lists both; a rerun answers and fights nothing again."""
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    grader = tmp_path / "g.py"
    grader.write_text("def longer(prompts, completions, want, **kw):\n    return [len(c) for c in completions]\n")
    args = ("arena", "auto", "tiny", "tiny+style", "--judge", f"grader:python:{grader}:longer", "--questions",
            str(questions), "--max-tokens", str(N), "--ctx", "256", "--threads", "1", "--json")
    rc, out, err = run_cli(*args)
    assert rc == 0, err
    report = json.loads(out)
    base, tuned_name = "tiny:latest", "tiny:latest+style:latest"
    assert report["models"] == [base, tuned_name] and report["votes"] == 2 and report["failed"] == {}
    votes = arena.votes(source="auto")
    assert len(votes) == 2
    differ = 0
    for v, q in zip(votes, QUESTIONS):
        assert {v["model_a"], v["model_b"]} == {base, tuned_name} and v["prompt"] == q["question"]
        got = {v["model_a"]: v["answer_a"], v["model_b"]: v["answer_b"]}
        assert got[base] == answer(hf["gguf"], q["question"])
        assert got[tuned_name] == answer(hf["gguf"], q["question"], lora=[tuned["lora"]])
        differ += got[base] != got[tuned_name]
        la, lb = len(v["answer_a"]), len(v["answer_b"])
        assert v["winner"] == ("a" if la > lb else "b" if lb > la else "tie")
    assert differ  # the adapter was applied
    rc, out, err = run_cli("arena", "leaderboard", "--source", "auto", "--json", "--bootstrap", "20")
    assert rc == 0, err
    assert {m["model"] for m in json.loads(out)["models"]} == {base, tuned_name}
    rc, out, err = run_cli(*args)
    again = json.loads(out)
    assert rc == 0 and (again["done_before"], again["answered"], again["votes"]) == (2, 0, 0)


# ---------------------------------------------------------------------------------------------
# eval run


def mmlu(folder, n: int = 6):
    rng = random.Random(0)
    words = "the fox dog cache keys values tokens quick lazy brown".split()
    rows = [{"question": " ".join(rng.choices(words, k=4)) + "?", "subject": "toy",
             "choices": [" ".join(rng.choices(words, k=2)) for _ in range(4)], "answer": rng.randrange(4)}
            for _ in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_task("mmlu", data=folder)


def lls(ref, task, **kw) -> list[float]:
    """Each choice's log-likelihood, item after item, as `eval run` scores `ref`."""
    found = identify(ref)
    model, ident = open_model(ref, slots=2, ctx=256, threads=1, found=found)
    with model:
        r = evaluate(model, task, shots=0, identity=ident, **kw)
    return [x for i in sorted(r.items) for x in r.items[i]["ll"]]


def test_eval_run_with_an_adapter_scores_the_adapted_model(hf, tuned, tmp_path, capsys):
    """`eval run BASE BASE+ADAPTER`: the adapter's log-likelihoods are not the base's, they are
    those of the base loaded with the adapter (the Python API's lora=), and each is stored
    under its own name and identity (a rerun resumes both)."""
    task = mmlu(tmp_path / "mmlu")
    gguf, lora = hf["gguf"], tuned["lora"]
    base = lls(str(gguf), task)
    adapted = lls(f"{gguf}+{lora}", task)
    assert base != adapted
    with llmdesk.Model(gguf, ctx=256, slots=2, threads=1, lora=[lora], kv_unified=True) as m:
        direct = evaluate(m, task, shots=0, fresh=True)
    assert adapted == pytest.approx([x for i in sorted(direct.items) for x in direct.items[i]["ll"]], abs=1e-5)
    # the same adapter as its PEFT folder (converted once) and at scale 0 (the base)
    assert lls(f"{gguf}+{tuned['adapter']}", task, fresh=True) == pytest.approx(adapted, abs=1e-5)
    assert lls(f"{gguf}+{lora}:0", task) == pytest.approx(base, abs=1e-5)

    args = ("eval", "run", str(gguf), f"{gguf}+{lora}", "--task", "mmlu", "--data", str(tmp_path / "mmlu"),
            "--shots", "0", "--slots", "2", "--threads", "1", "--json")
    rc, out, err = run_cli(*args)
    assert rc == 0, err
    assert [r["model"] for r in json.loads(out)] == [gguf.name, f"{gguf.name}+{lora.parent.name}"]
    assert err.count("resuming: 6 of 6 items of mmlu already scored") == 2
    rows = {r["model"]: r for r in results.query("eval")}
    assert len({rows[gguf.name]["model_sha256"], rows[f"{gguf.name}+{lora.parent.name}"]["model_sha256"]}) == 2


# ---------------------------------------------------------------------------------------------
# the server: every -m model takes the adapters made for it


def test_a_server_with_two_models_answers_the_second_with_an_adapter(hf, tuned, tiny_gguf):
    """`serve -m tiny.gguf -m tiny-f32.gguf --lora style=...`: the adapter fits the second model
    only; `tiny-f32+style` answers as the base with the adapter applied (OpenAI, Ollama, and a
    side of the web arena, whose vote names it), the first model's name with '+style' is a 404
    that says why, and embeddings with an adapter are a 400 that says why."""
    with llmdesk.Model(hf["gguf"], ctx=256, threads=1, lora=[tuned["lora"]]) as m:
        want = m.generate("The quick brown fox", temperature=0, max_tokens=N, ignore_eos=True)
    lora = parse_lora([f"style={tuned['lora']}"])
    with running(None, models=[str(tiny_gguf), str(hf["gguf"])], parallel=2, ctx=256, lora=lora) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ids = [m.id for m in client.models.list().data]
        assert ids[:3] == ["tiny.gguf", "tiny-f32.gguf", "tiny-f32.gguf+style"]  # the -m models, then the store's
        r = client.completions.create(model="tiny-f32+style", prompt="The quick brown fox", max_tokens=N,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == want and r.model == "tiny-f32.gguf+style"
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="tiny+style", prompt="hi", max_tokens=2)
        assert "'tiny.gguf' has no LoRA adapter 'style'" in e.value.message and "takes none of style" in e.value.message
        # embeddings too: the adapter applies to the model that asks for it, not to its neighbour
        vec = {name: client.embeddings.create(model=name, input="hello").data[0].embedding
               for name in ("tiny-f32", "tiny-f32+style")}
        assert vec["tiny-f32"] != vec["tiny-f32+style"]
        r = httpx.post(s.url + "/api/generate", json={"model": "tiny-f32+style", "prompt": "The quick brown fox",
                                                       "stream": False, "raw": True,
                                                       "options": {"temperature": 0, "num_predict": N}})
        assert r.status_code == 200, r.text
        # the web chat's arena: a battle between the base and its adapter, voted on
        question = QUESTIONS[0]["question"]
        battle = httpx.post(s.url + "/api/arena/battles", json={
            "prompt": question, "models": ["tiny-f32", "tiny-f32+style"], "temperature": 0, "max_tokens": N}).json()
        texts = {}
        for side in ("a", "b"):
            r = httpx.post(f"{s.url}/api/arena/battles/{battle['id']}/{side}", timeout=120)
            assert r.status_code == 200, r.text
            texts[side] = "".join(json.loads(b[6:]).get("content", "") for b in r.text.split("\n\n")
                                  if b.startswith("data: {"))
        vote = httpx.post(f"{s.url}/api/arena/battles/{battle['id']}/vote", json={"winner": "a"}).json()
        got = {vote["model_a"]: texts["a"], vote["model_b"]: texts["b"]}
        assert got == {"tiny-f32.gguf": answer(hf["gguf"], question),
                       "tiny-f32.gguf+style": answer(hf["gguf"], question, lora=[tuned["lora"]])}
        [v] = arena.votes(source="web")
        assert (v["model_a"], v["model_b"], v["winner"]) == (vote["model_a"], vote["model_b"], "a")


# ---------------------------------------------------------------------------------------------
# bad input: one line each, before any model loads


@pytest.mark.parametrize("ref, says", [
    ("{gguf}+missing", "no LoRA adapter 'missing' (no such file, folder or store name)"),
    ("+{lora}", "no model before '+'"),
    ("{gguf}+", "no adapter after '+'"),
    ("{gguf}+{gguf}", "tiny-f32.gguf is not a LoRA adapter (a model file)"),
    ("{gguf}+{lora}:x", "the scale after the last colon must be a number, not 'x'"),
])
def test_bad_references_are_one_line(hf, tuned, tmp_path, ref, says):
    ref = ref.format(gguf=hf["gguf"], lora=tuned["lora"])
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    mmlu(tmp_path / "mmlu")
    one_line_error(*run_cli("arena", "auto", str(hf["gguf"]), ref, "--judge", "grader:exact:want",
                            "--questions", str(questions))[::2], says)
    one_line_error(*run_cli("eval", "run", ref, "--task", "mmlu", "--data", str(tmp_path / "mmlu"))[::2], says)


def test_an_adapter_for_another_base_is_one_line(hf, other_base, tmp_path):
    from llmdesk.formats.lora_gguf import write_lora_gguf

    wrong = write_lora_gguf(other_base["adapter"], other_base["config"], tmp_path / "wrong.gguf")
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    one_line_error(*run_cli("arena", "auto", str(hf["gguf"]), f"{hf['gguf']}+{wrong}", "--judge",
                            "grader:exact:want", "--questions", str(questions))[::2],
                   "the adapter was made for another base model")
    one_line_error(*run_cli("eval", "ppl", f"{hf['gguf']}+{wrong}", str(questions))[::2],
                   "this command takes one model file, not a model with LoRA adapters")


# ---------------------------------------------------------------------------------------------
# eval judge


def test_eval_judge_grades_the_adapted_models_answers(hf, tuned, tmp_path):
    """`eval judge --models BASE+ADAPTER`: the answers judged are the adapted model's, stored
    under its name, and the results row carries its identity."""
    from llmdesk.demo import default_model_path
    from llmdesk.eval import judge as J

    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    ref = f"{hf['gguf']}+{tuned['lora']}"
    name = f"{hf['gguf'].name}+{tuned['lora'].parent.name}"
    rc, out, err = run_cli("eval", "judge", "--judge", str(default_model_path()), "--models", ref, "--questions",
                           str(questions), "--max-tokens", str(N), "--ctx", "2048", "--threads", "1", "--json")
    assert rc == 0, err
    report = json.loads(out)
    got = J.read_answers(report["answers"][name], J.read_questions(questions))
    assert got[QUESTIONS[0]["id"]] == [answer(hf["gguf"], QUESTIONS[0]["question"], lora=[tuned["lora"]])]
    [row] = results.query("judge")
    assert row["model"] == name
    assert row["model_sha256"] == resolve_choice(ref).sha256 != resolve_choice(str(hf["gguf"])).sha256
