"""The arena: the vote store, Bradley-Terry ratings with bootstrap intervals, the rank rule,
preference-pair export and the `llmdesk arena` commands."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from llmdesk.errors import LlmdeskError
from conftest import llmdesk_exe
from test_serve_util import start_server

import llmdesk
from llmdesk.cli.main import main
from llmdesk.demo import default_model_path
from llmdesk.eval import arena


# ---------------------------------------------------------------------------------------------
# the vote store


def test_record_vote_stores_what_was_given():
    vid = arena.record_vote("2+2?", "m1", "m2", "b", answer_a="5", answer_b="4", source="web",
                            details={"ms": 3})
    arena.record_vote("hi", "m2", "m3", "tie", source="auto", judge="j")
    [v] = arena.votes(source="web")
    assert v["id"] == vid
    assert (v["prompt"], v["model_a"], v["model_b"], v["winner"]) == ("2+2?", "m1", "m2", "b")
    assert (v["answer_a"], v["answer_b"], v["details"]) == ("5", "4", {"ms": 3})
    assert [x["judge"] for x in arena.votes()] == [None, "j"]
    assert [x["source"] for x in arena.votes(source="auto")] == ["auto"]


@pytest.mark.parametrize("args, says", [
    (("p", "m1", "m2", "draw"), "winner 'draw' is not one of a, b, tie, both_bad"),
    (("p", "m1", "m1", "a"), "cannot battle itself"),
    (("p", "", "m1", "a"), "both models must be named"),
])
def test_record_vote_refuses_bad_votes_in_one_line(args, says):
    with pytest.raises(LlmdeskError) as e:
        arena.record_vote(*args)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert arena.votes() == []


# ---------------------------------------------------------------------------------------------
# Bradley-Terry ratings


TRUE = {"strong": 1200.0, "good": 1100.0, "fair": 1000.0, "weak": 900.0}  # Elo scale, mean 1050


def simulate(n: int, rng: np.random.Generator, true: dict[str, float] = TRUE) -> list[dict]:
    """`n` battles between random pairs, won as the Bradley-Terry model with `true` ratings says."""
    names = list(true)
    rows = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        p_a = 1.0 / (1.0 + 10 ** ((true[names[j]] - true[names[i]]) / 400))
        rows.append({"model_a": names[i], "model_b": names[j], "winner": "a" if rng.random() < p_a else "b"})
    return rows


def test_bradley_terry_recovers_the_order_of_known_strengths():
    board = arena.leaderboard(simulate(2000, np.random.default_rng(7)), bootstrap=100, seed=1)
    assert [r.model for r in board] == ["strong", "good", "fair", "weak"]
    assert [r.rank for r in board] == [1, 2, 3, 4]  # 2000 battles tell 100 points apart
    assert sum(r.rating for r in board) / 4 == pytest.approx(1000.0)  # the mean is anchored at 1000
    for r in board:  # and the differences are the true ones, within sampling noise
        assert r.rating == pytest.approx(TRUE[r.model] - 50, abs=40)
        assert r.low < r.rating < r.high
        assert r.battles == r.wins + r.ties + r.losses
    assert sum(r.battles for r in board) == 2 * 2000


def test_bootstrap_intervals_cover_the_true_ratings_at_about_the_nominal_rate():
    # a statistical check: 40 simulated arenas of 300 battles, 4 models each; a 95% interval
    # should hold the true (mean-anchored) rating about 95% of the time
    rng = np.random.default_rng(2024)
    hits = total = 0
    for rep in range(40):
        board = arena.leaderboard(simulate(300, rng), bootstrap=200, seed=rep)
        for r in board:
            hits += r.low <= TRUE[r.model] - 50 <= r.high
            total += 1
    assert 0.85 <= hits / total <= 1.0


def test_a_tie_is_half_a_win_each_way_and_both_bad_is_a_tie():
    # 1 win and 2 ties of 3: x took 2 points of 3, so P(x beats y) = 2/3 and the gap is 400*log10(2)
    rows = [{"model_a": "x", "model_b": "y", "winner": "a"},
            {"model_a": "x", "model_b": "y", "winner": "tie"},
            {"model_a": "y", "model_b": "x", "winner": "both_bad"}]
    x, y = arena.leaderboard(rows, bootstrap=0)
    assert (x.model, y.model) == ("x", "y")
    assert x.rating - y.rating == pytest.approx(400 * math.log10(2), abs=0.5)
    assert (x.wins, x.ties, x.losses) == (1, 2, 0) and (y.wins, y.ties, y.losses) == (0, 2, 1)
    # only ties: the same rating
    even = arena.leaderboard([{"model_a": "x", "model_b": "y", "winner": w} for w in ("tie", "both_bad")], bootstrap=0)
    assert [r.rating for r in even] == pytest.approx([1000.0, 1000.0])


def test_an_anchor_model_sits_at_1000():
    board = arena.leaderboard(simulate(400, np.random.default_rng(3)), bootstrap=50, anchor="fair")
    fair = next(r for r in board if r.model == "fair")
    assert fair.rating == pytest.approx(1000.0)
    assert next(r for r in board if r.model == "strong").rating > 1100
    with pytest.raises(LlmdeskError, match="anchor model 'nobody' has no votes"):
        arena.leaderboard(simulate(10, np.random.default_rng(3)), anchor="nobody")


def test_a_model_that_won_every_battle_gets_a_finite_rating_on_top():
    rows = [{"model_a": "x", "model_b": "y", "winner": "a"}] * 5 + [{"model_a": "y", "model_b": "z", "winner": "tie"}] * 5
    board = arena.leaderboard(rows, bootstrap=20)
    assert board[0].model == "x" and all(math.isfinite(r.rating) and math.isfinite(r.low) for r in board)


def test_rank_rule_overlapping_intervals_share_a_rank():
    # intervals: A [1050, 1150], B [1000, 1100] (overlaps A), C [900, 990] (below both), D [950, 1010]
    low, high = [1050, 1000, 900, 950], [1150, 1100, 990, 1010]
    # A: nobody above; B: overlaps A; C: A and B lie wholly above it; D: only A does
    assert arena.ranks_from_intervals(low, high) == [1, 1, 3, 2]
    # on a leaderboard: two models the votes cannot tell apart share rank 1 though one rates higher
    rng = np.random.default_rng(5)
    board = arena.leaderboard(simulate(120, rng, {"p": 1010.0, "q": 1000.0, "r": 600.0}), bootstrap=200)
    by = {r.model: r for r in board}
    assert by["p"].rank == by["q"].rank == 1 and by["r"].rank == 3
    assert by["p"].high > by["q"].low and by["q"].high > by["p"].low


def test_no_votes_is_one_clear_error():
    with pytest.raises(LlmdeskError, match="no arena votes yet"):
        arena.leaderboard([])


# ---------------------------------------------------------------------------------------------
# preference pairs


def test_export_writes_prompt_chosen_rejected_pairs(tmp_path):
    arena.record_vote("Capital of France?", "m1", "m2", "b", answer_a="Lyon", answer_b="Paris")
    arena.record_vote("2+2?", "m2", "m1", "a", answer_a="4", answer_b="5", source="auto", judge="j")
    arena.record_vote("Hi", "m1", "m2", "tie", answer_a="Hello", answer_b="Hey")
    arena.record_vote("Joke?", "m1", "m2", "both_bad", answer_a="no", answer_b="no")
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "pairs.jsonl"
    assert arena.export_pairs(path, arena.votes()) == (2, 2)
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary file left
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "chosen_model": "m2",
         "rejected_model": "m1", "source": "web"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "chosen_model": "m2", "rejected_model": "m1",
         "source": "auto"},
    ]
    # what TRL's DPO trainer reads: a JSONL dataset with string columns prompt, chosen, rejected
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert all(isinstance(r[c], str) for r in ds for c in ("prompt", "chosen", "rejected"))


# ---------------------------------------------------------------------------------------------
# the commands


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `llmdesk ARGS` in-process, as the console script does: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):  # the consoles write to sys.stdout/stderr of the moment
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc: int, stderr: str, says: str) -> None:
    assert rc != 0
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert says in stderr, stderr


def test_leaderboard_export_and_votes_commands(tmp_path):
    for row in simulate(200, np.random.default_rng(11)):
        arena.record_vote("q", row["model_a"], row["model_b"], row["winner"], answer_a="A", answer_b="B")
    rc, out, err = run_cli("arena", "leaderboard", "--bootstrap", "100", "--plot", str(tmp_path / "lb.png"))
    assert rc == 0, err
    lines = [line.split() for line in out.splitlines() if line.strip() and not line.startswith("─")]
    assert lines[0][:3] == ["rank", "model", "rating"]
    assert [row[1] for row in lines[1:]] == ["strong", "good", "fair", "weak"]
    assert (tmp_path / "lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run_cli("arena", "leaderboard", "--json", "--bootstrap", "50")
    data = json.loads(out)
    assert rc == 0 and data["votes"] == 200 and len(data["models"]) == 4
    assert set(data["models"][0]) == {"model", "rating", "low", "high", "rank", "battles", "wins", "ties", "losses"}
    rc, out, err = run_cli("arena", "export", "-o", str(tmp_path / "p.jsonl"))
    assert rc == 0 and "200 preference pairs written" in err
    rc, out, err = run_cli("arena", "votes", "-n", "3", "--json")
    assert rc == 0 and [v["id"] for v in json.loads(out)] == [200, 199, 198]


@pytest.mark.parametrize("args, says", [
    (("arena", "leaderboard"), "no arena votes yet"),
    (("arena", "leaderboard", "--source", "robots"), "unknown vote source 'robots': use auto or web"),
    (("arena", "leaderboard", "--source", "auto"), "no arena votes from 'auto' yet"),
    (("arena", "leaderboard", "--plot", "board.txt"), "--plot writes .png, .svg or .pdf files"),
    (("arena", "export", "-o", "pairs.jsonl"), "no arena votes yet"),
    (("arena", "votes", "--source", "robots"), "unknown vote source 'robots'"),
])
def test_commands_with_nothing_to_work_on_say_so_in_one_line(args, says):
    one_line_error(*run_cli(*args)[::2], says)


def test_export_of_only_ties_says_there_is_nothing_to_pair(tmp_path):
    arena.record_vote("q", "m1", "m2", "tie")
    one_line_error(*run_cli("arena", "export", "-o", str(tmp_path / "p.jsonl"))[::2], "no votes with a winner")
    assert not (tmp_path / "p.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# `arena auto`: battles judged by a model, end to end with the bundled demo model


DEMO = default_model_path()
QUESTIONS = [{"id": "what", "question": "What is llmdesk?"},
             {"id": "list", "question": "How do I list my models?"}]


def write_questions(path, rows=QUESTIONS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_arena_auto_end_to_end_with_the_demo_model(tmp_path, tiny_gguf):
    """The demo model against a random-weight model, the demo model judging (a context large
    enough for the judge's prompt): every verdict is a vote or a counted malformed verdict, votes
    carry the models' real answers, a rerun fights nothing again and answers nothing again."""
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    p = subprocess.run([llmdesk_exe(), "arena", "auto", str(DEMO), str(tiny_gguf), "--judge", str(DEMO),
                        "--questions", str(questions), "--ctx", "2048", "--max-tokens", "48", "--json"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["battles"] == 1 and report["answered"] == 2 and report["failed"] == {}
    assert report["votes"] == 1  # a local judge is held to a JSON schema: its verdict is always readable
    with llmdesk.load(DEMO, ctx=2048) as demo:  # the demo model's answer at temperature 0, as the vote holds it
        expected = demo.respond([{"role": "user", "content": QUESTIONS[0]["question"]}], temperature=0,
                                max_tokens=48, truncate=True).text
    for v in arena.votes():
        assert (v["source"], v["judge"], v["prompt"]) == ("auto", DEMO.name, QUESTIONS[0]["question"])
        assert {v["model_a"], v["model_b"]} == {DEMO.name, tiny_gguf.name}
        assert (v["answer_a"] if v["model_a"] == DEMO.name else v["answer_b"]) == expected
        assert v["winner"] in ("a", "b", "tie") and v["details"]["question_id"] == "what"
    # a rerun: the battle was decided (or its verdict was malformed: asked again, answers cached)
    again = arena.auto([str(DEMO), str(tiny_gguf)], str(DEMO), questions, ctx=2048, max_tokens=48)
    assert again.answered == 0
    assert again.done_before == report["votes"] and again.cached == 2 * report["malformed"]
    assert len(arena.votes()) == report["votes"] + again.votes


def test_arena_auto_two_names_of_one_model_on_a_two_turn_question(tmp_path):
    # the same file under another name: the answers come from the cache (same bytes, same answers);
    # a question of two turns (MT-Bench's layout) is one battle over the whole conversation
    twin = tmp_path / "demo-twin.gguf"
    shutil.copyfile(DEMO, twin)
    turns = ["What does llmdesk quantize do?", "And how do I list my models?"]
    questions = write_questions(tmp_path / "q.jsonl", [{"question_id": 7, "turns": turns}])
    report = arena.auto([str(DEMO), str(twin)], str(DEMO), questions, ctx=2048, max_tokens=48)
    assert (report.battles, report.answered, report.cached, report.votes) == (1, 1, 1, 1)
    [v] = arena.votes(source="auto")
    assert v["prompt"] == turns[1] and v["details"]["turns"] == turns and v["details"]["question_id"] == "7"
    assert v["answer_a"] == v["answer_b"]  # one model, two names
    rc, out, err = run_cli("arena", "leaderboard", "--source", "auto", "--json")
    assert rc == 0 and {m["model"] for m in json.loads(out)["models"]} == {DEMO.name, twin.name}


def test_battles_are_every_pair_on_every_question_or_a_seeded_draw():
    every = arena.plan_battles(3, ["x", "y", "z"])
    assert len(every) == 9 and {(q, frozenset((a, b))) for q, a, b in every} == {
        (q, frozenset(p)) for q in range(3) for p in (("x", "y"), ("x", "z"), ("y", "z"))}
    assert {a for _, a, _ in every} == {"x", "y", "z"}  # sides are drawn, not always the first-named
    some = arena.plan_battles(3, ["x", "y", "z"], rounds=4, seed=1)
    assert len(some) == 4 and len({(q, frozenset((a, b))) for q, a, b in some}) == 4  # no repeats
    assert some == arena.plan_battles(3, ["x", "y", "z"], rounds=4, seed=1)
    assert len(arena.plan_battles(3, ["x", "y", "z"], rounds=50)) == 9  # no more than there are


def test_a_model_that_fails_mid_run_keeps_what_was_done(tmp_path):
    """A remote model (a real `llmdesk serve`) whose server goes away after its first answer: one
    line says so, the battle it could fight is judged, the other is not fought."""
    questions = write_questions(tmp_path / "q.jsonl")
    server = start_server(DEMO, ctx=512)
    remote = f"openai:{server.url}/v1"
    stopped = []

    def progress(what: str, done: int, total: int) -> None:
        if what.startswith("openai:") and done == 1 and not stopped:
            server.stop()  # the endpoint goes down between its first and second answer
            stopped.append(what)

    try:
        report = arena.auto([str(DEMO), remote], str(DEMO), questions, ctx=2048, max_tokens=32, constrain=False,
                            progress=progress)
    finally:
        if not stopped:
            server.stop()
    assert stopped and list(report.failed) == [remote]
    assert "\n" not in report.failed[remote] and "after 1 of 2 answers" in report.failed[remote]
    assert report.battles == 2 and report.unanswered == 1
    assert report.votes + report.malformed == 1  # the battle on the question it did answer
    assert len(arena.votes(source="auto")) == report.votes


@pytest.mark.parametrize("args, says", [
    (("--questions", "missing.jsonl"), "the questions file missing.jsonl does not exist"),
    (("--questions", "{q}", "--rounds", "0"), "--rounds"),
])
def test_arena_auto_bad_inputs_are_one_line(tmp_path, args, says):
    q = write_questions(tmp_path / "q.jsonl")
    args = [a.format(q=q) for a in args]
    one_line_error(*run_cli("arena", "auto", str(DEMO), str(DEMO), "--judge", str(DEMO), *args)[::2], says)


def test_arena_auto_refuses_questions_and_models_it_cannot_use(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "fine"}\n{"id": 2}\n', encoding="utf-8")
    q = write_questions(tmp_path / "q.jsonl")
    cases = [
        ((str(DEMO), str(tmp_path / "twin.gguf")), str(bad), "bad.jsonl:2: no question text"),
        ((str(DEMO), str(tmp_path / "nope.gguf")), str(q), "no such file"),
        ((str(DEMO), str(DEMO)), str(q), f"two models are named '{DEMO.name}'"),
        ((str(DEMO),), str(q), "at least two models"),
    ]
    shutil.copyfile(DEMO, tmp_path / "twin.gguf")
    for models, questions, says in cases:
        one_line_error(*run_cli("arena", "auto", *models, "--judge", str(DEMO), "--questions", questions)[::2], says)
    assert arena.votes() == []


def test_models_that_never_met_are_said_to_be_apart():
    for a, b in (("x", "y"), ("y", "z"), ("p", "q")):
        arena.record_vote("q", a, b, "a")
    assert arena.groups(arena.votes()) == [["x", "y", "z"], ["p", "q"]]
    rc, out, err = run_cli("arena", "leaderboard", "--bootstrap", "10")
    assert rc == 0 and "note: these models never met" in err and "x, y, z | p, q" in err


def test_the_docs_show_the_commands_as_they_are():
    """docs/arena.md's synopsis names every arena command, and only options each one has."""
    import re
    from pathlib import Path

    import typer

    from llmdesk.cli.arena import arena_app

    group = typer.main.get_group(arena_app)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "arena.md").read_text(encoding="utf-8")
    synopsis = [line for line in doc.split("```")[1].splitlines() if line.startswith("llmdesk arena ")]
    assert sorted(line.split()[2] for line in synopsis) == sorted(group.commands)
    for line in synopsis:
        command = group.commands[line.split()[2]]
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for opt in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line):
            assert opt in options, f"docs/arena.md shows {opt} for 'arena {command.name}', which has no such option"


def test_ratings_equal_an_independent_fit_by_hunters_mm_algorithm():
    """The same maximum-likelihood ratings by another algorithm: Hunter's MM iteration (Hunter
    2004, "MM algorithms for generalized Bradley-Terry models", eq. 3), ties as half wins."""
    rows = simulate(500, np.random.default_rng(17))
    rows += [{"model_a": "good", "model_b": "fair", "winner": w} for w in ("tie", "both_bad", "tie")]
    names = sorted(TRUE)
    idx = {m: i for i, m in enumerate(names)}
    W = np.zeros((4, 4))  # points i took from j
    for r in rows:
        i, j = idx[r["model_a"]], idx[r["model_b"]]
        s = {"a": 1.0, "b": 0.0}.get(r["winner"], 0.5)
        W[i, j] += s
        W[j, i] += 1 - s
    N = W + W.T
    p = np.ones(4)
    for _ in range(5000):
        p = W.sum(axis=1) / (N / (p[:, None] + p[None, :])).sum(axis=1)
        p /= np.exp(np.log(p).mean())
    expected = 400 * np.log10(p)
    expected += 1000 - expected.mean()
    got = {r.model: r.rating for r in arena.leaderboard(rows, bootstrap=0)}
    assert [got[m] for m in names] == pytest.approx(expected, abs=0.05)  # the weak prior moves nothing


def test_arena_auto_with_a_grader_as_the_judge(tmp_path, tiny_gguf):
    """`--judge grader:SPEC`: each answer is scored by the grader with the question row's columns,
    the higher score wins (equal: a tie); the votes say what the grader says of the stored answers;
    a question without a column the grader reads is one line before any model answers."""
    g = tmp_path / "g.py"
    g.write_text("def length(prompts, completions, want, **kw):\n"
                 "    return [len(c) if w == 'long' else -len(c) for c, w in zip(completions, want)]\n")
    rows = [{"id": "a", "question": "Say something long.", "want": "long"},
            {"id": "b", "question": "Say something short.", "want": "short"}]
    questions = write_questions(tmp_path / "q.jsonl", rows)
    judge = f"grader:python:{g}:length"
    rc, out, err = run_cli("arena", "auto", str(DEMO), str(tiny_gguf), "--judge", judge, "--questions",
                           str(questions), "--max-tokens", "16", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert (report["judge"], report["battles"], report["votes"], report["malformed"]) == (judge, 2, 2, 0)
    for v in arena.votes(source="auto"):
        want = next(r["want"] for r in rows if r["question"] == v["prompt"])
        la, lb = len(v["answer_a"]), len(v["answer_b"])
        sa, sb = (la, lb) if want == "long" else (-la, -lb)
        assert v["winner"] == ("a" if sa > sb else "b" if sb > sa else "tie") and v["judge"] == judge
    again = arena.auto([str(DEMO), str(tiny_gguf)], judge, questions, max_tokens=16)
    assert (again.done_before, again.votes, again.answered) == (2, 0, 0)
    bad = write_questions(tmp_path / "bad.jsonl", [rows[0], {"id": "c", "question": "Hm?"}])
    one_line_error(*run_cli("arena", "auto", str(DEMO), str(tiny_gguf), "--judge", "grader:exact:want", "--questions",
                            str(bad))[::2], "bad.jsonl:2: grader exact:want needs a column 'want'")
    one_line_error(*run_cli("arena", "auto", str(DEMO), str(tiny_gguf), "--judge", "grader:nope", "--questions",
                            str(questions))[::2], "unknown grader 'nope'")
