"""`llmdesk eval judge`: the verdict parser on hand-written judge texts, and whole runs with the
bundled demo model (a tiny real chat model) answering and judging, locally and through a real
`llmdesk serve` on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import llmdesk_exe
from test_serve_util import start_server, wait_until

import llmdesk
from llmdesk.demo import default_model_path
from llmdesk.errors import LlmdeskError
from llmdesk.eval import judge as J
from llmdesk.runtime.remote import RemoteModel
from llmdesk.serve import BackgroundServer, ServeConfig, create_app
from llmdesk.store import logs, results

DEMO = default_model_path()
LLMDESK = llmdesk_exe()
CTX = 2048  # the demo model was trained on 128 tokens; a judge's prompt needs more

QUESTIONS = [
    {"question_id": 1, "turns": ["How do I list my models?"], "reference": ["Run llmdesk list."]},
    {"question_id": 2, "turns": ["What does llmdesk pull do?", "And llmdesk import?"]},
    {"id": "q3", "question": "What is quantization?"},
]
OTHER_ANSWERS = [
    {"question_id": 1, "answer": "I do not know."},
    {"question_id": 2, "turns": ["It bakes bread.", "It imports cheese."]},
    {"question_id": "q3", "answer": "Storing the weights with fewer bits, such as q8_0."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo():
    assert DEMO is not None, "the bundled demo model is missing (make demo-model)"
    with llmdesk.load(DEMO, ctx=CTX, threads=1) as m:  # one thread: steadier on a busy machine
        yield m


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "questions.jsonl", QUESTIONS), write_jsonl(tmp_path / "other.jsonl", OTHER_ANSWERS)


# ---------------------------------------------------------------------------------------------
# reading verdicts


@pytest.mark.parametrize("text, rating", [
    ("The answer is correct and complete.\nRating: [[8]]", 8.0),
    ("Good.\n\nRating: [[7.5]]", 7.5),
    ("rating: [[ 9 ]]", 9.0),
    ("Fine. [[6/10]]", 6.0),
    ("Fine. [[Rating: 4]]", 4.0),
    ("I first thought [[3]], but on reflection: Rating: [[8]]", 8.0),  # the last one decides
    ("Mostly right. Rating: 7/10", 7.0),  # no brackets: a last "Rating: N"
    ("**Rating:** 6", 6.0),
    ("Score: 10 out of 10", 10.0),
    ('{"reasoning": "clear and correct", "rating": 9}', 9.0),  # a constrained reply
    ("Rating: [[1]]", 1.0),
    ("Rating: [[10]]", 10.0),
])
def test_ratings_are_read(text, rating):
    assert J.parse_rating(text) == rating


@pytest.mark.parametrize("text", [
    "",
    "The answer is fine.",  # no rating at all
    "Rating: [[11]]",  # out of range
    "Rating: [[0]]",
    "Rating: [[-3]]",
    "Rating: [[4/5]]",  # another scale: not converted, not guessed
    "Rating: [[rating]]",  # the instructions echoed
    "Rating: [[7]] and then [[good]]",  # the last [[...]] is no rating
    "Rating: [[nan]]",
    '{"reasoning": "ok", "rating": 42}',
    '{"reasoning": "ok"}',
])
def test_malformed_ratings_are_none(text):
    assert J.parse_rating(text) is None
    assert J.Grade(J.parse_rating(text), "", text, False).score is None


@pytest.mark.parametrize("text, verdict", [
    ("Assistant A is more accurate.\n[[A]]", "A"),
    ("B explains more. [[b]]", "B"),
    ("They are equally good. [[C]]", "C"),
    ("Final verdict: [[ Tie ]]", "C"),
    ("[[Assistant B]]", "B"),
    ("At first [[A]], but B is right after all: [[B]]", "B"),
    ('{"reasoning": "same", "verdict": "C"}', "C"),
    ('{ "reasoning" : "two lines\n\n" , "verdict": "B"}', "B"),  # a raw newline in the string
])
def test_verdicts_are_read(text, verdict):
    assert J.parse_verdict(text) == verdict


@pytest.mark.parametrize("text", [
    "",
    "A is better.",  # no brackets: "A" is a word too often to be read as a verdict
    "[[D]]",
    "[[A]] [[maybe]]",
    'Answer "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie.',  # instructions echoed
    '{"reasoning": "x", "verdict": "A or B"}',
])
def test_malformed_verdicts_are_none(text):
    assert J.parse_verdict(text) is None


def test_a_pair_is_read_from_both_orders():
    # raw_ab shows answer a as "A"; raw_ba shows answer b as "A"
    both_a = J.combine("[[A]]", "[[B]]")
    assert (both_a.winner, both_a.consistent, both_a.parsed, both_a.verdicts) == ("a", True, True, ["a", "a"])
    both_b = J.combine("[[B]]", "[[A]]")
    assert (both_b.winner, both_b.consistent) == ("b", True)
    tie = J.combine("[[C]]", "[[C]]")
    assert (tie.winner, tie.consistent) == ("tie", True)
    # the judge prefers whatever comes first: the orders disagree, so it is a tie
    biased = J.combine("[[A]]", "[[A]]")
    assert (biased.winner, biased.consistent, biased.parsed, biased.verdicts) == ("tie", False, True, ["a", "b"])
    half = J.combine("[[A]]", "[[C]]")
    assert (half.winner, half.consistent) == ("tie", False)
    # one order unreadable: no verdict, not a guess from the other
    broken = J.combine("[[A]]", "I cannot decide.")
    assert (broken.winner, broken.parsed, broken.verdicts) == (None, False, ["a", None])
    assert broken.raw == ["[[A]]", "I cannot decide."]


def test_prompts_show_what_is_judged():
    msgs = J.single_messages("Q?", "the answer", reference="the reference")
    user = msgs[-1]["content"]
    assert msgs[0]["role"] == "system" and "Q?" in user and "the answer" in user and "the reference" in user
    assert "[[rating]]" in user
    assert "JSON" in J.single_messages("Q?", "x", constrained=True)[-1]["content"]
    pair = J.pair_messages("Q?", "first answer", "second answer")[-1]["content"]
    assert pair.index("first answer") < pair.index("second answer") and "[[C]]" in pair
    turn2 = J.single_messages("Q2?", "A2", history=[("Q1?", "A1")])[-1]["content"]
    assert turn2.index("Q1?") < turn2.index("A1") < turn2.index("Q2?") < turn2.index("A2")


# ---------------------------------------------------------------------------------------------
# files


def test_questions_in_both_layouts(tmp_path, files):
    qs = J.read_questions(files[0])
    assert [(q.id, q.turns, q.references) for q in qs] == [
        ("1", ["How do I list my models?"], ["Run llmdesk list."]),
        ("2", ["What does llmdesk pull do?", "And llmdesk import?"], [None, None]),
        ("q3", ["What is quantization?"], [None]),
    ]
    answers = J.read_answers(files[1], qs)
    assert answers["2"] == ["It bakes bread.", "It imports cheese."]
    mine = write_jsonl(tmp_path / "q.jsonl", [{"id": 1, "question": "Q?", "gold": "G"}])
    assert J.read_questions(mine, reference_column="gold")[0].references == ["G"]


@pytest.mark.parametrize("rows, says", [
    (['{"question_id": 1, "turns": ["a"]}', '{"question_id": 2, "turns": ["b"]'], "questions.jsonl:2: not JSON"),
    (['{"question_id": 1, "category": "writing"}'], "questions.jsonl:1: no question text"),
    (['{"question_id": 1, "turns": []}'], "questions.jsonl:1: 'turns' must be a non-empty text"),
    (['{"id": 1, "question": "a"}', '{"id": 1, "question": "b"}'], "questions.jsonl:2: question id 1 is already used"),
    (["[1, 2]"], "questions.jsonl:1: a line must be a JSON object"),
    ([""], "holds no questions"),
])
def test_bad_questions_files(tmp_path, rows, says):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(LlmdeskError, match=says):
        J.read_questions(path)


def test_answers_must_cover_the_questions(tmp_path, files):
    qs = J.read_questions(files[0])
    short = write_jsonl(tmp_path / "short.jsonl", OTHER_ANSWERS[:1])
    with pytest.raises(LlmdeskError, match="has no answer to question 2"):
        J.read_answers(short, qs)
    one_turn = write_jsonl(tmp_path / "one.jsonl",
                           [OTHER_ANSWERS[0], {"question_id": 2, "answer": "x"}, OTHER_ANSWERS[2]])
    with pytest.raises(LlmdeskError, match="question 2 has 2 turns but 1 answers"):
        J.read_answers(one_turn, qs)


# ---------------------------------------------------------------------------------------------
# whole runs with the demo model


def answers_by(demo, qs, tmp_path):
    mine = J.generate_answers(demo, qs, tmp_path / "demo-answers.jsonl")
    return {"demo": mine, "other": J.read_answers(tmp_path / "other.jsonl", qs)}


def test_single_grades_constrained_are_readable_and_stored(demo, files, tmp_path):
    qs = J.read_questions(files[0])
    answers = answers_by(demo, qs, tmp_path)
    # the answers were written in MT-Bench's layout, and read back the same
    assert J.read_answers(tmp_path / "demo-answers.jsonl", qs) == answers["demo"]
    assert all(len(answers["demo"][q.id]) == len(q.turns) for q in qs)
    report = J.judge_run(demo, qs, answers, mode="single", run="single-1")
    assert report.constrained and report.judged == 8 and report.skipped == 0  # 4 turns x 2 models
    for s in report.scores:
        assert s.n == 4 and s.malformed == 0 and 1 <= s.mean <= 10 and s.stderr is not None
    rows = J.stored("single-1")
    assert len(rows) == 8 and {r["question_id"] for r in rows} == {"1", "2", "2#2", "q3"}
    for r in rows:
        assert r["kind"] == "single" and r["parsed"] == 1 and 1 <= r["score"] <= 10
        assert json.loads(r["raw"], strict=False)["rating"] == r["score"]  # the judge's own text, as given
    assert next(r for r in rows if r["question_id"] == "1")["details"]["reference"] == "Run llmdesk list."
    # a rerun under the same name asks nothing again
    again = J.judge_run(demo, qs, answers, mode="single", run="single-1")
    assert (again.judged, again.skipped) == (0, 8) and len(J.stored("single-1")) == 8
    assert [s.mean for s in again.scores] == [s.mean for s in report.scores]


def test_a_judge_that_answers_nonsense_is_counted_not_guessed(demo, files, tmp_path):
    # unconstrained, the tiny demo model does not write "Rating: [[N]]": every verdict is malformed
    qs = J.read_questions(files[0])
    answers = {"other": J.read_answers(files[1], qs)}
    report = J.judge_run(demo, qs, answers, mode="single", run="free", constrain=False)
    assert not report.constrained
    [s] = report.scores
    assert (s.n, s.malformed, s.mean) == (0, 4, None)
    rows = J.stored("free")
    assert len(rows) == 4 and all(r["parsed"] == 0 and r["score"] is None and r["raw"] for r in rows)
    assert all(J.parse_rating(r["raw"]) is None for r in rows)


def test_pairwise_asks_both_orders(demo, files, tmp_path):
    qs = J.read_questions(files[0])
    answers = answers_by(demo, qs, tmp_path)
    report = J.judge_run(demo, qs, answers, mode="pairwise", run="pairs")
    [p] = report.pairs
    assert (p.model_a, p.model_b) == ("demo", "other")
    assert p.wins + p.ties + p.losses == 4 and p.malformed == 0, [r["raw"] for r in J.stored("pairs") if not r["parsed"]]
    rows = J.stored("pairs")
    assert len(rows) == 4
    for r in rows:
        raw = json.loads(r["raw"])
        assert len(raw) == 2 and all(J.parse_verdict(t) in ("A", "B", "C") for t in raw)
        v = J.combine(*raw)
        assert (r["winner"], r["details"]["consistent"]) == (v.winner, v.consistent)
        if v.verdicts[0] != v.verdicts[1]:
            assert r["winner"] == "tie"
    assert p.inconsistent == sum(1 for r in rows if not r["details"]["consistent"])
    assert p.win_rate == pytest.approx((p.wins + p.ties / 2) / 4)


def test_pairwise_compares_every_two_models(demo, tmp_path):
    qs = J.read_questions(write_jsonl(tmp_path / "q.jsonl", [{"id": "only", "question": "What is quantization?"}]))
    answers = {name: {"only": [text]} for name, text in (("x", "Fewer bits per weight."), ("y", "A kind of cake."),
                                                          ("z", "I do not know."))}
    report = J.judge_run(demo, qs, answers, mode="pairwise", run="three")
    assert [(p.model_a, p.model_b) for p in report.pairs] == [("x", "y"), ("x", "z"), ("y", "z")]
    assert all(p.wins + p.ties + p.losses + p.malformed == 1 for p in report.pairs)
    assert len(J.stored("three")) == 3


def test_judge_must_be_a_model():
    with pytest.raises(LlmdeskError, match="must be a model loaded with llmdesk.load"):
        J.grade("my-judge", "Q?", "A")


# ---------------------------------------------------------------------------------------------
# a remote judge: the demo model behind a real `llmdesk serve`


@pytest.fixture(scope="module")
def server():
    s = start_server(DEMO, ctx=CTX, log_prompts=True)
    yield s
    s.stop()


def test_remote_judge_both_orders_through_the_server(server, user_dir):
    logs.set_logging(True)
    with llmdesk.load(f"openai:{server.url}/v1#{DEMO.name}") as judge:
        v = J.pairwise(judge, "What does llmdesk list show?", "ALPHA: the models in the store.",
                       "BRAVO: the weather.", constrain=True)
    # the server logs an answer once it has sent it: wait for both
    asked = list(reversed(wait_until(lambda: len(logs.recent(10)) == 2 and logs.recent(10))))  # oldest first
    first, second = (a["prompt"] for a in asked)
    assert first.index("ALPHA") < first.index("BRAVO") and second.index("BRAVO") < second.index("ALPHA")
    assert [a["response"] for a in asked] == v.raw  # the raw texts are the judge's, in order a-b, b-a
    assert v.parsed and v.winner in ("a", "b", "tie")


def test_remote_judge_read_from_text_by_default(server, files):
    qs = J.read_questions(files[0])
    with llmdesk.load(f"openai:{server.url}/v1#{DEMO.name}") as judge:
        g = J.grade(judge, "Q?", "A.")
        assert g.raw and g.parsed == (g.score is not None)
        report = J.judge_run(judge, qs, {"other": J.read_answers(files[1], qs)}, run="remote")
    assert not report.constrained and report.scores[0].n + report.scores[0].malformed == 4


def test_remote_judge_that_refuses_the_schema_is_read_from_text(server, monkeypatch):
    # a schema the server refuses (a pattern whose parses explode): the endpoint answers 400, as
    # one without response_format would, and the judge is asked again for text
    refused = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"rating": {"type": "string", "pattern": "(a+)+"}}}}}
    monkeypatch.setattr(J, "RATING_FORMAT", refused)
    notices = []
    with llmdesk.load(f"openai:{server.url}/v1#{DEMO.name}") as judge:
        g = J.grade(judge, "Q?", "A.", constrain=True, say=notices.append)
        J.grade(judge, "Q?", "A.", constrain=True, say=notices.append)  # not offered the schema again
    assert len(notices) == 1 and "refused response_format" in notices[0]
    assert "reading its verdicts from text" in notices[0]
    assert not g.raw.lstrip().startswith("{") and g.parsed == (g.score is not None)


def test_remote_judge_in_parallel(server, files):
    qs = J.read_questions(files[0])
    answers = {"other": J.read_answers(files[1], qs), "same": J.read_answers(files[1], qs)}
    with llmdesk.load(f"openai:{server.url}/v1#{DEMO.name}") as judge:
        report = J.judge_run(judge, qs, answers, mode="single", run="together", constrain=True, parallel=3)
    assert report.judged == 8 and [(s.n, s.malformed) for s in report.scores] == [(4, 0), (4, 0)]
    rows = J.stored("together")
    assert sorted((r["question_id"], r["model_a"]) for r in rows) == sorted(
        (k, m) for k in ("1", "2", "2#2", "q3") for m in ("other", "same"))


def test_remote_model_answers(server, tmp_path, files):
    qs = J.read_questions(files[0])
    with llmdesk.load(f"openai:{server.url}/v1#{DEMO.name}") as model:
        answers = J.generate_answers(model, qs, tmp_path / "remote.jsonl", max_tokens=32)
    assert [len(answers[q.id]) for q in qs] == [1, 2, 1] and all(t for a in answers.values() for t in a)
    assert J.read_answers(tmp_path / "remote.jsonl", qs) == answers


def test_remote_judge_down_keeps_verdicts_and_resumes(files):
    qs = J.read_questions(files[0])
    answers = {"other": J.read_answers(files[1], qs)}
    first = start_server(DEMO, ctx=CTX)
    port = first.port
    ref = f"openai:{first.url}/v1#{DEMO.name}"

    def stop_after_two(done, total):
        if done == 2:
            first.stop()

    judge = RemoteModel(ref, max_retries=0)
    try:
        with pytest.raises(LlmdeskError) as e:
            J.judge_run(judge, qs, answers, run="flaky", constrain=True, progress=stop_after_two)
    finally:
        judge.close()
        first.stop()
    msg = str(e.value)
    assert "\n" not in msg and "2 verdicts of run 'flaky' are stored; rerun with --run flaky" in msg
    assert len(J.stored("flaky")) == 2
    again = BackgroundServer(create_app(ServeConfig(models=[str(DEMO)], ctx=CTX, threads=1, parallel=1)),
                             port=port).start()
    try:
        with RemoteModel(ref) as judge:
            report = J.judge_run(judge, qs, answers, run="flaky", constrain=True)
    finally:
        again.stop()
    assert (report.judged, report.skipped) == (2, 2)
    assert report.scores[0].n == 4 and len(J.stored("flaky")) == 4


# ---------------------------------------------------------------------------------------------
# the command


def cli(*args, home):
    import os

    env = {k: v for k, v in os.environ.items() if k != "LLMDESK_MODEL"}
    env["LLMDESK_HOME"] = str(home)
    return subprocess.run([LLMDESK, *map(str, args)], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_cli_pairwise_generates_answers_and_records(files, user_dir):
    q, other = files
    p = cli("eval", "judge", "--judge", DEMO, "--questions", q, "--models", DEMO, "--answers", f"other={other}",
            "--mode", "pairwise", "--ctx", CTX, "--threads", 1, "--parallel", 2, "--run", "cli-1", "--json",
            home=user_dir)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["run"] == "cli-1" and d["mode"] == "pairwise" and d["judge"] == DEMO.name
    [pair] = d["pairs"]
    assert {pair["model_a"], pair["model_b"]} == {DEMO.name, "other"}
    assert pair["wins"] + pair["ties"] + pair["losses"] + pair["malformed"] == 4
    saved = d["answers"][DEMO.name]
    assert saved.startswith(str(user_dir)) and len(J.read_answers(saved, J.read_questions(q))) == 3
    [row] = results.query("judge")
    assert row["settings"]["run"] == "cli-1" and row["metrics"]["win_rate"] == pair["win_rate"]
    # as a table
    p = cli("eval", "judge", "-j", DEMO, "-q", q, "--answers", f"other={other}", "--ctx", CTX, "--threads", 1,
            home=user_dir)
    assert p.returncode == 0, p.stderr
    assert "SCORE" in p.stdout and "MALFORMED" in p.stdout and "other" in p.stdout


def one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_cli_bad_inputs_are_one_line(files, tmp_path, user_dir):
    q, other = files
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2,\n', encoding="utf-8")
    no_text = write_jsonl(tmp_path / "notext.jsonl", [{"question_id": 1, "category": "math"}])
    cases = [
        (["-j", DEMO, "-q", bad_json, "--answers", f"o={other}"], "bad.jsonl:2: not JSON"),
        (["-j", DEMO, "-q", no_text, "--answers", f"o={other}"], "notext.jsonl:1: no question text"),
        (["-j", q, "-q", q, "--answers", f"o={other}"], "not a GGUF file"),  # a judge that is not a model
        (["-j", "no-such-model", "-q", q, "--answers", f"o={other}"], "not found"),
        (["-j", DEMO, "-q", q], "nothing to judge"),
        (["-j", DEMO, "-q", q, "--answers", "other"], "--answers takes MODEL=FILE"),
        (["-j", DEMO, "-q", q, "--answers", f"o={other}", "--mode", "pairwise"], "at least two"),
        (["-j", DEMO, "-q", q, "--answers", f"o={other}", "--mode", "best"], "--mode must be single or pairwise"),
        (["-j", DEMO, "-q", q, "--answers", f"o={other}", "--reference-column", "gold"], "no row of"),
        # the demo model's own context (128 tokens) cannot hold a judge's prompt
        (["-j", DEMO, "-q", q, "--answers", f"o={other}"], "a larger context (--ctx 4096)"),
        (["-j", "openai:http://127.0.0.1:9/v1#x", "-q", q, "--answers", f"o={other}"], "cannot reach"),
    ]
    for args, says in cases:
        line = one_error_line(cli("eval", "judge", *args, "--threads", 1, home=user_dir))
        assert says in line, (args, line)


def test_the_docs_show_the_command_as_it_is():
    """docs/judge.md's synopsis shows every option of `eval judge`, and only those."""
    import re
    from pathlib import Path

    import typer

    import llmdesk.cli.judge  # noqa: F401 (registers the command)
    from llmdesk.cli.evaluate import eval_app

    command = typer.main.get_group(eval_app).commands["judge"]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "judge.md").read_text(encoding="utf-8")
    synopsis = doc.split("```")[1]
    assert synopsis.lstrip().startswith("llmdesk eval judge ")
    shown = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", synopsis))
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} - {"--help"}
    assert shown == options, (sorted(shown - options), sorted(options - shown))
