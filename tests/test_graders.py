"""Graders (eval/graders.py): each built-in on hand-written cases, Python graders that break in
each way, weights, and the judge grader on a real model."""

from __future__ import annotations

import json

import pytest

from llmdesk.errors import LlmdeskError
from llmdesk.eval.graders import combined, completion_text, parse_grader, parse_graders

CHAT = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


def test_exact():
    g = parse_grader("exact")
    assert g(["q"] * 4, ["Paris", " paris. ", "Lyon", CHAT("PARIS")], answer=["Paris"] * 4) == [1.0, 1.0, 0.0, 1.0]
    g = parse_grader("exact:city")
    assert g(["q"], ["Rome"], city=["rome"]) == [1.0]
    with pytest.raises(LlmdeskError, match="no column 'city'"):
        g(["q"], ["Rome"], answer=["Rome"])
    with pytest.raises(LlmdeskError, match=r"needs a column 'city'; the rows have answer, prompt"):
        g.check_columns({"prompt", "answer"}, "data.jsonl")


def test_regex():
    g = parse_grader(r"regex:^ANSWER: \d+$")
    assert g(["q"] * 3, ["ANSWER: 42", "answer: 42", "ANSWER: 42 and more"]) == [1.0, 0.0, 0.0]
    with pytest.raises(LlmdeskError, match="not a regular expression"):
        parse_grader("regex:(unclosed")
    with pytest.raises(LlmdeskError, match="needs a pattern"):
        parse_grader("regex")


def test_numeric():
    g = parse_grader("numeric")
    done = g(["q"] * 5, ["so it is 12", "12.0", "1,200", "twelve", "13"], answer=[12, "12", "1200", 12, 12])
    assert done == [1.0, 1.0, 1.0, 0.0, 0.0]
    g = parse_grader("numeric:answer:0.5")
    assert g(["q"] * 2, ["3.4", "3.6"], answer=[3, 3]) == [1.0, 0.0]
    with pytest.raises(LlmdeskError, match="tolerance 'x' is not a number"):
        parse_grader("numeric:answer:x")


def test_json(tmp_path):
    assert parse_grader("json")(["q"] * 3, ['{"a": 1}', "{a: 1}", "[1, 2]"]) == [1.0, 0.0, 1.0]
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    g = parse_grader(f"json:{schema}")
    assert g(["q"] * 3, ['{"a": 1}', '{"a": "1"}', '{"b": 1}']) == [1.0, 0.0, 0.0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    with pytest.raises(LlmdeskError, match="not a valid JSON Schema"):
        parse_grader(f"json:{bad}")
    with pytest.raises(LlmdeskError, match="cannot read it"):
        parse_grader(f"json:{tmp_path / 'none.json'}")


def test_python_graders(tmp_path, capsys):
    f = tmp_path / "mine.py"
    f.write_text("""\
def short(prompts, completions, **kw):
    return [1.0 if len(c) < 10 else 0.0 for c in completions]

def uses_column(prompts, completions, topic, **kw):
    return [float(t in c) for c, t in zip(completions, topic)]

def boom(prompts, completions, **kw):
    raise ValueError("no luck")

def wrong_length(prompts, completions, **kw):
    return [1.0]

def not_numbers(prompts, completions, **kw):
    return ["yes" for _ in completions]
""")
    assert parse_grader(f"python:{f}:short")(["q"] * 2, ["tiny", "a long completion"]) == [1.0, 0.0]
    assert parse_grader(f"python:{f}:uses_column")(["q"] * 2, ["about cats", "dogs"], topic=["cat", "cat"]) == [1.0, 0.0]
    g = parse_grader(f"python:{f}:boom")
    assert g(["q"] * 3, ["a", "b", "c"]) == [None, None, None]  # counted, not a crash
    assert g.failed == 3 and g.errors == ["ValueError: no luck"]
    assert "raised ValueError: no luck" in capsys.readouterr().err
    with pytest.raises(LlmdeskError, match="returned 1 scores for 2 completions"):
        parse_grader(f"python:{f}:wrong_length")(["q"] * 2, ["a", "b"])
    with pytest.raises(LlmdeskError, match="a score must be a number or None"):
        parse_grader(f"python:{f}:not_numbers")(["q"], ["a"])
    with pytest.raises(LlmdeskError, match=r"no function 'missing' \(functions: short, uses_column, boom, wrong_length, not_numbers\)"):
        parse_grader(f"python:{f}:missing")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    pass\n")
    with pytest.raises(LlmdeskError, match=r"broken.py:1: grader file has a syntax error"):
        parse_grader(f"python:{broken}:f")
    raising = tmp_path / "raising.py"
    raising.write_text("import no_such_module_here\n")
    with pytest.raises(LlmdeskError, match="failed to import: ModuleNotFoundError"):
        parse_grader(f"python:{raising}:f")
    with pytest.raises(LlmdeskError, match="no such file"):
        parse_grader(f"python:{tmp_path / 'none.py'}:f")


def test_specs_and_weights():
    graders, weights = parse_graders("exact,regex:^A", "2,0.5")
    assert [g.spec for g in graders] == ["exact:answer", "regex:^A"] and weights == [2.0, 0.5]
    totals, means = combined(graders, weights, ["q"] * 3, ["A", "B", "a"], answer=["a", "a", "a"])
    assert totals == [2.5, 0.0, 2.0]
    assert means == {"exact:answer": pytest.approx(2 / 3), "regex:^A": pytest.approx(1 / 3)}
    with pytest.raises(LlmdeskError, match="2 weights for 1 graders"):
        parse_graders("exact", "1,2")
    with pytest.raises(LlmdeskError, match="unknown grader 'exakt'"):
        parse_graders("exakt")
    with pytest.raises(LlmdeskError, match="no grader given"):
        parse_graders("")
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"


def test_judge_grader_on_a_real_model(tiny_gguf):
    g = parse_grader(f"judge:{tiny_gguf}")
    scores = g(["What is GGUF?", "What is GGUF?"], ["llama.cpp's model file format.", "A fish."])
    assert len(scores) == 2
    for s in scores:  # a random model's verdict, held to the rating schema: a grade (1-10 -> 0-1)
        assert s is not None and 0.0 <= s <= 1.0 and abs(s * 9 - round(s * 9)) < 1e-9
    with pytest.raises(LlmdeskError, match="needs a model"):
        parse_grader("judge")
