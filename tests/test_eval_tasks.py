"""Evaluation tasks as files (llmdesk.eval.tasks): the built-ins read the public releases' layouts
(JSONL, CSV, Parquet, the Hugging Face hub cache) and render the same prompts, choices, answers
and few-shot draws as lm-evaluation-harness does from the same rows; bad rows are one line naming
their file and row."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import lm_eval
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmdesk.errors import LlmdeskError
from llmdesk.eval.tasks import load_task, list_tasks

LM_TASKS = Path(lm_eval.__file__).parent / "tasks"

# ---------------------------------------------------------------------------------------------
# rows in the public releases' layouts


def mmlu_rows(subject: str, n: int, salt: str = "") -> list[dict]:
    return [{"question": f"  {subject} question {salt}{i}?  ", "subject": subject,
             "choices": [f"{subject} {salt}{i} option {k}" for k in "wxyz"], "answer": (i * 7 + len(salt)) % 4}
            for i in range(n)]


def arc_rows(n: int, salt: str) -> list[dict]:
    rows = []
    for i in range(n):
        k = 3 + i % 2  # 3 or 4 choices; labels letters or digits, as in ARC
        labels = [str(j + 1) for j in range(k)] if i % 3 == 0 else list("ABCD"[:k])
        rows.append({"id": f"{salt}{i}", "question": f"Which one {salt}{i}?",
                     "choices": {"text": [f"thing {salt}{i}.{j}" for j in range(k)], "label": labels},
                     "answerKey": labels[i % k]})
    return rows


def hellaswag_rows(n: int, salt: str) -> list[dict]:
    return [{"ind": i, "activity_label": f"Making tea {salt}{i}", "ctx_a": f"A person boils water [title] Step {i}.",
             "ctx_b": "then they", "ctx": "...", "split": "val", "split_type": "indomain",
             "endings": [f"pour it [header] into a cup {i}.", f"drink  it {i}", f"leave {salt}{i}", f"sing {i}"],
             "source_id": f"wikihow~{i}", "label": str(i % 4)} for i in range(n)]


def truthfulqa_rows(n: int) -> list[dict]:
    return [{"question": f"What happens if you do thing {i}?",
             "mc1_targets": {"choices": [f"True {i}", f"False {i}a", f"False {i}b"], "labels": [1, 0, 0]},
             "mc2_targets": {"choices": [f"True {i}", f"Also true {i}", f"False {i}"], "labels": [1, 1, 0]}}
            for i in range(n)]


def gsm8k_rows(n: int, salt: str) -> list[dict]:
    return [{"question": f"Tom has {i} apples {salt}. How many?",
             "answer": f"He has {i} + 1000 = <<{i}+1000={i + 1000}>>{i + 1000} apples.\n#### {i + 1000:,}"}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_mmlu_csv(path: Path, rows: list[dict]) -> Path:
    """MMLU's original release: question,A,B,C,D,answer-letter, no header, subject = file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for r in rows:
            w.writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    return path


def hub_snapshot(cache: Path, repo: str, files: dict[str, bytes | Path]) -> Path:
    """A dataset repo in a Hugging Face hub cache, laid out as huggingface_hub lays it out:
    blobs/<sha>, snapshots/<commit>/<file> -> ../../blobs/<sha>, refs/main = <commit>."""
    import hashlib

    root = cache / f"datasets--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness's own rendering of the same rows


def lm_eval_prompts(yaml_path: Path, files: dict[str, Path], shots: int, tmp_path: Path, seed: int = 1234):
    """(context, choices, target) per evaluated row, from lm-eval's ConfigurableTask built from its
    own YAML with the dataset swapped for our local files."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path)
    fmt = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}[next(iter(files.values())).suffix]
    cfg.update(dataset_path=fmt, dataset_name=None,
               dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()},
                               "cache_dir": str(tmp_path / "hf-datasets")})
    cfg["num_fewshot"] = shots
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(seed)
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    out = []
    for doc in docs:
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice else None
        out.append((task.fewshot_context(doc, shots), choices, task.doc_to_target(doc)))
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))


def assert_same_as_lm_eval(items, expected, delimiter=" "):
    assert len(items) == len(expected)
    for item, (context, choices, target) in zip(items, expected):
        assert item.context == context
        assert item.choices == [delimiter + c for c in choices]
        assert item.gold == target


# ---------------------------------------------------------------------------------------------
# the built-ins against lm-eval


def test_mmlu_parquet_matches_lm_eval_5_shot(tmp_path):
    subjects = ["abstract_algebra", "high_school_us_history"]
    data = tmp_path / "mmlu"
    write_parquet(data / "all" / "test-00000-of-00001.parquet", [r for s in subjects for r in mmlu_rows(s, 4)])
    write_parquet(data / "all" / "dev-00000-of-00001.parquet", [r for s in subjects for r in mmlu_rows(s, 6, "d")])

    every = load_task("mmlu", data=data).items()
    assert len(every) == 8
    assert every[0].context.startswith("The following are multiple choice questions (with answers) about "
                                       "abstract algebra.\n\nabstract_algebra question d0?\nA. ")
    assert every[0].choices == [" A", " B", " C", " D"]
    for subject in subjects:
        sub = tmp_path / subject
        test = write_parquet(sub / "test.parquet", mmlu_rows(subject, 4))
        dev = write_parquet(sub / "dev.parquet", mmlu_rows(subject, 6, "d"))
        expected = lm_eval_prompts(LM_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml",
                                   {"test": test, "dev": dev}, 5, tmp_path)
        one = load_task(f"mmlu_{subject}", data=data)
        assert one.name == f"mmlu_{subject}"
        assert_same_as_lm_eval(one.items(), expected)
        assert_same_as_lm_eval([i for i in every if i.doc["subject"] == subject], expected)


def test_mmlu_descriptions_are_lm_evals_for_every_subject(tmp_path):
    import yaml

    names = next(t for t in list_tasks() if t["name"] == "mmlu")["subsets"]
    assert len(names) == 57
    for subject in names:
        theirs = yaml.safe_load((LM_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml").read_text())
        write_jsonl(tmp_path / subject / "test.jsonl", mmlu_rows(subject, 1))
        item = load_task(f"mmlu_{subject}", data=tmp_path / subject).items(shots=0)[0]
        assert item.context.startswith(theirs["description"])


def test_mmlu_original_csv_layout_reads_like_the_parquet_one(tmp_path):
    """The original release: data/test/<subject>_test.csv and data/dev/<subject>_dev.csv, no header."""
    subjects = ["anatomy", "virology"]
    pq_dir, csv_dir = tmp_path / "pq", tmp_path / "data"
    write_parquet(pq_dir / "test.parquet", [r for s in subjects for r in mmlu_rows(s, 3)])
    write_parquet(pq_dir / "dev.parquet", [r for s in subjects for r in mmlu_rows(s, 5, "d")])
    for s in subjects:
        write_mmlu_csv(csv_dir / "test" / f"{s}_test.csv", mmlu_rows(s, 3))
        write_mmlu_csv(csv_dir / "dev" / f"{s}_dev.csv", mmlu_rows(s, 5, "d"))
    from_csv = load_task("mmlu", data=csv_dir).items()
    from_parquet = load_task("mmlu", data=pq_dir).items()
    assert [(i.context, i.choices, i.gold) for i in from_csv] == [(i.context, i.choices, i.gold) for i in from_parquet]
    assert from_csv[0].doc["subject"] == "anatomy"


@pytest.mark.parametrize("variant", ["easy", "challenge"])
def test_arc_matches_lm_eval_with_seeded_few_shot(tmp_path, variant):
    test = write_jsonl(tmp_path / "test.jsonl", arc_rows(7, "t"))
    train = write_jsonl(tmp_path / "train.jsonl", arc_rows(12, "r"))
    expected = lm_eval_prompts(LM_TASKS / "arc" / f"arc_{variant}.yaml", {"test": test, "train": train}, 3, tmp_path)
    task = load_task(f"arc_{variant}", data=tmp_path)
    assert_same_as_lm_eval(task.items(shots=3), expected)
    assert task.items(shots=3)[0].doc["answerKey"] in ("1", "A")
    assert_same_as_lm_eval(task.items(shots=0), lm_eval_prompts(
        LM_TASKS / "arc" / f"arc_{variant}.yaml", {"test": test, "train": train}, 0, tmp_path))


def test_hellaswag_parquet_matches_lm_eval_preprocess(tmp_path):
    val = write_parquet(tmp_path / "validation.parquet", hellaswag_rows(5, "v"))
    train = write_parquet(tmp_path / "train.parquet", hellaswag_rows(9, "t"))
    expected = lm_eval_prompts(LM_TASKS / "hellaswag" / "hellaswag.yaml",
                               {"validation": val, "train": train}, 2, tmp_path)
    items = load_task("hellaswag", data=tmp_path).items(shots=2)
    assert_same_as_lm_eval(items, expected)
    assert "[header]" not in items[0].choices[0] and "[title]" not in items[0].context
    assert items[1].context.endswith("Making tea v1: A person boils water. Step 1. Then they")


@pytest.mark.parametrize("which", ["mc1", "mc2"])
def test_truthfulqa_matches_lm_eval(tmp_path, which):
    val = write_jsonl(tmp_path / "validation.jsonl", truthfulqa_rows(4))
    expected = lm_eval_prompts(LM_TASKS / "truthfulqa" / f"truthfulqa_{which}.yaml", {"validation": val}, 0, tmp_path)
    task = load_task(f"truthfulqa_{which}", data=tmp_path)
    items = task.items()
    assert [i.context for i in items] == [e[0] for e in expected]
    assert [i.choices for i in items] == [[" " + c for c in e[1]] for e in expected]
    assert items[0].context.startswith("Q: What is human life expectancy in the United States?\n")
    # examples drawn from the asked split itself, minus the asked row, as lm-eval draws them
    val8 = write_jsonl(tmp_path / "eight" / "validation.jsonl", truthfulqa_rows(8))
    shown = lm_eval_prompts(LM_TASKS / "truthfulqa" / f"truthfulqa_{which}.yaml", {"validation": val8}, 3, tmp_path)
    assert [i.context for i in load_task(f"truthfulqa_{which}", data=val8).items(shots=3)] == [e[0] for e in shown]
    if which == "mc1":
        assert task.metrics == ["acc", "acc_norm"]
        assert [i.gold for i in items] == [e[2] for e in expected]
    else:
        assert task.metrics == ["mc2"]
        assert [i.gold for i in items] == [None] * 4
        assert [i.labels for i in items] == [[1, 1, 0]] * 4


def test_gsm8k_matches_lm_eval_prompts_and_answers(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", gsm8k_rows(5, "t"))
    train = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(11, "r"))
    expected = lm_eval_prompts(LM_TASKS / "gsm8k" / "gsm8k.yaml", {"test": test, "train": train}, 5, tmp_path)
    task = load_task("gsm8k", data=tmp_path)
    assert (task.kind, task.metrics, task.shots) == ("generate", ["exact_match"], 5)
    assert task.until == ["Question:", "</s>", "<|im_end|>"]
    items = task.items()
    assert [i.context for i in items] == [e[0] for e in expected]
    assert [i.target for i in items] == ["1000", "1001", "1002", "1003", "1004"]
    assert items[0].choices == [] and items[0].gold is None

    # answers taken and compared as lm-eval's strict-match and flexible-extract filters do
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    metric = load_yaml_metric(LM_TASKS / "gsm8k" / "gsm8k.yaml")
    outputs = ["So 1,000 apples.\n#### 1,000", "It is $1001.", "#### -3.5 then 7", "no idea", "12 and 1002."]
    refs = [e[2] for e in expected]
    for ours, pattern, select in (("strict", r"#### (\-?[0-9\.\,]+)", 0),
                                  ("flexible", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)):
        theirs = RegexFilter(regex_pattern=pattern, group_select=select).apply([[o] for o in outputs], [])
        for out, ref, (filtered,), item in zip(outputs, refs, theirs, items):
            agree = exact_match_hf_evaluate([filtered], [ref], **metric)["exact_match"] == 1.0
            assert (task.extract(out, ours) == item.target) == agree, (ours, out)
    assert task.extract("So 1,000 apples.\n#### 1,000") == "1000"  # strict is the default
    assert task.extract("nothing here") == ""
    assert task.extractions == ["strict", "flexible"]


def load_yaml_metric(path: Path) -> dict:
    import yaml

    m = yaml.safe_load(path.read_text())["metric_list"][0]
    return {k: m[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}


# ---------------------------------------------------------------------------------------------
# where data is found


def test_hub_cache_layouts_are_found_without_network(tmp_path, monkeypatch):
    hub = tmp_path / "hf-home" / "hub"
    test = write_parquet(tmp_path / "src" / "t.parquet", mmlu_rows("anatomy", 3))
    dev = write_parquet(tmp_path / "src" / "d.parquet", mmlu_rows("anatomy", 5, "d"))
    hub_snapshot(hub, "cais/mmlu", {"anatomy/test-00000-of-00001.parquet": test,
                                    "anatomy/dev-00000-of-00001.parquet": dev})
    arc_test = write_parquet(tmp_path / "src" / "a.parquet", arc_rows(3, "t"))
    hub_snapshot(hub, "allenai/ai2_arc", {"ARC-Easy/test-00000-of-00001.parquet": arc_test})
    hs = write_parquet(tmp_path / "src" / "h.parquet", hellaswag_rows(3, "v"))
    hub_snapshot(hub, "Rowan/hellaswag", {"data/validation-00000-of-00001.parquet": hs})

    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    task = load_task("mmlu_anatomy")
    assert "Hugging Face cache" in task.data_origin
    assert len(task.items()) == 3 and task.items()[0].context.count("Answer:") == 6
    assert len(load_task("arc_easy").items()) == 3
    assert len(load_task("hellaswag").items()) == 3
    found = {t["name"]: t["found"] for t in list_tasks()}
    assert found == {"arc_challenge": False, "arc_easy": True, "gsm8k": False, "hellaswag": True,
                     "mmlu": False, "truthfulqa_mc1": False, "truthfulqa_mc2": False}

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))  # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nowhere"))
    assert load_task("arc_easy").sha256 == load_task("arc_easy").sha256


def test_mmlu_from_a_cache_that_lm_eval_filled_subject_by_subject(tmp_path, monkeypatch):
    """lm-eval loads cais/mmlu one subject config at a time: the cache has no all/ folder."""
    names = next(t for t in list_tasks() if t["name"] == "mmlu")["subsets"]
    files = {}
    for subject in names[:3]:
        files[f"{subject}/test-00000-of-00001.parquet"] = write_parquet(
            tmp_path / "src" / f"{subject}-t.parquet", mmlu_rows(subject, 2))
        files[f"{subject}/dev-00000-of-00001.parquet"] = write_parquet(
            tmp_path / "src" / f"{subject}-d.parquet", mmlu_rows(subject, 5, "d"))
    hub_snapshot(tmp_path / "hub", "cais/mmlu", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    msg = one_line_error(lambda: load_task("mmlu"))
    assert "has 3 of the 57 subsets" in msg and f"{names[3]}" in msg and f"mmlu_{names[0]}" in msg
    assert len(load_task(f"mmlu_{names[1]}").items()) == 2

    for subject in names[3:]:  # all 57: mmlu asks them all, in order, each with its own examples
        files[f"{subject}/test-00000-of-00001.parquet"] = write_parquet(
            tmp_path / "src" / f"{subject}-t.parquet", mmlu_rows(subject, 1))
        files[f"{subject}/dev-00000-of-00001.parquet"] = write_parquet(
            tmp_path / "src" / f"{subject}-d.parquet", mmlu_rows(subject, 5, "d"))
    shutil.rmtree(tmp_path / "hub")
    hub_snapshot(tmp_path / "hub", "cais/mmlu", files)
    items = load_task("mmlu").items()
    assert len(items) == 3 * 2 + 54
    assert [i.doc["subject"] for i in items] == [n for n in names[:3] for _ in range(2)] + names[3:]
    assert all(f"about {i.doc['subject'].replace('_', ' ')}." in i.context for i in items)


def test_user_dir_is_looked_in_before_the_hub_cache(tmp_path, user_dir, monkeypatch):
    hub = tmp_path / "hub"
    hub_snapshot(hub, "openai/gsm8k", {"main/test-00000-of-00001.parquet":
                                       write_parquet(tmp_path / "g.parquet", gsm8k_rows(2, "hub"))})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert "hub" in load_task("gsm8k").items(shots=0)[0].context
    write_jsonl(user_dir / "eval-data" / "gsm8k" / "test.jsonl", gsm8k_rows(3, "mine"))
    task = load_task("gsm8k")
    assert "mine" in task.items(shots=0)[0].context
    with pytest.raises(LlmdeskError, match=r"5-shot needs the 'train' split for its examples, which is not in "
                                           r".*gsm8k: give --data a folder with the 'test' and 'train' files, "
                                           r"or use --shots 0"):
        task.items()
    # --data a single file: the evaluated split
    one = write_jsonl(tmp_path / "x.jsonl", gsm8k_rows(1, "file"))
    assert "file" in load_task("gsm8k", data=one).items(shots=0)[0].context


def test_missing_dataset_says_where_it_looked_and_what_to_do(user_dir, tmp_path):
    with pytest.raises(LlmdeskError) as e:
        load_task("arc_challenge")
    msg = str(e.value)
    assert "\n" not in msg
    assert "arc_challenge: no data for the 'test' split" in msg
    assert str(user_dir / "eval-data" / "arc_challenge") in msg
    assert "datasets--allenai--ai2_arc" in msg and "hf download allenai/ai2_arc --repo-type dataset" in msg
    assert "--data PATH" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmdeskError, match=r"no 'test' split in --data .*empty"):
        load_task("arc_challenge", data=tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# few-shot and limits


def test_few_shot_is_deterministic_and_never_the_item_itself(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", truthfulqa_rows(12))
    task = load_task("truthfulqa_mc1", data=tmp_path)
    a = task.items(shots=3, seed=7)
    again = load_task("truthfulqa_mc1", data=tmp_path).items(shots=3, seed=7)
    assert [i.context for i in a] == [i.context for i in again]
    assert [i.context for i in a] != [i.context for i in task.items(shots=3, seed=8)]
    for item in a:
        asked = item.context.rsplit("Q: ", 1)[1]
        shown = item.context.rsplit("Q: ", 1)[0]
        assert item.doc["question"] in asked
        assert item.doc["question"] not in shown
        assert shown.count("\nA: True ") == 3  # each example answered with its true choice
    assert [i.context for i in task.items(limit=4, shots=3, seed=7)] == [i.context for i in a[:4]]
    assert [i.index for i in task.items(limit=4)] == [0, 1, 2, 3]
    with pytest.raises(LlmdeskError, match=r"20-shot needs 20 examples .* which has 11: use --shots 11"):
        task.items(shots=20)


# ---------------------------------------------------------------------------------------------
# custom specs


def test_custom_yaml_and_toml_specs(tmp_path):
    write_jsonl(tmp_path / "data" / "q.jsonl", [
        {"q": "Capital of France?", "opts": ["Paris", "Rome"], "right": "Paris", "topic": "geo"},
        {"q": "2 + 2?", "opts": ["three", "four"], "right": "four", "topic": "math"},
        {"q": "1 + 1?", "opts": ["1", "2"], "right": "1", "topic": "math"},
    ])
    (tmp_path / "capitals.yaml").write_text(
        "name: quiz\nkind: multiple_choice\ndata:\n  files: {test: data/q.jsonl}\n"
        "description: \"Quiz on {{ topic }}.\\n\"\n"
        "text: \"Q: {{ q }}\\nA:\"\nchoices: opts\ntarget: right\nmetrics: [acc]\n")
    task = load_task(tmp_path / "capitals.yaml")
    items = task.items()
    assert (task.name, task.metrics) == ("quiz", ["acc"])
    assert items[0].context == "Quiz on geo.\nQ: Capital of France?\nA:"
    assert items[0].choices == [" Paris", " Rome"] and items[0].gold == 0
    assert items[1].gold == 1  # the answer is a choice's text
    assert items[2].gold == 1  # digits are an index, even when a choice reads the same (lm-eval's rule)
    # a row without the column the target names: that is what the error says (not "'right' is no answer")
    with (tmp_path / "data" / "q.jsonl").open("a") as f:
        f.write(json.dumps({"q": "3 + 3?", "opts": ["6", "7"], "topic": "math"}) + "\n")
    with pytest.raises(LlmdeskError, match=r"q.jsonl line 4: no column 'right' \(the task quiz's 'target' reads it\)"):
        load_task(tmp_path / "capitals.yaml").items()

    write_jsonl(tmp_path / "data" / "sums.jsonl", [{"a": a, "b": 3, "sum": f"The sum is {a + 3}."} for a in (2, 4)])
    (tmp_path / "sums.toml").write_text(
        'name = "sums"\nkind = "generate"\ntext = "{{ a }} + {{ b }} ="\ntarget = "sum"\n'
        'until = ["\\n"]\nmax_tokens = 8\n[data]\nfiles = { test = "data/sums.jsonl" }\n'
        '[fewshot]\nsplit = "test"\nshots = 1\n[answer]\nextract = "last_number"\nreference = "last_number"\n'
        'ignore = ["\\\\.$"]\n')
    sums = load_task(str(tmp_path / "sums.toml"))
    assert (sums.kind, sums.until, sums.max_tokens, sums.metrics) == ("generate", ["\n"], 8, ["exact_match"])
    items = sums.items()
    assert [i.target for i in items] == ["5", "7"]
    assert [i.context for i in items] == ["4 + 3 = The sum is 7.\n\n2 + 3 =", "2 + 3 = The sum is 5.\n\n4 + 3 ="]
    assert sums.extract("I think 4, no: 5.") == "5"
    assert sums.items(shots=0)[0].context == "2 + 3 ="
    # identical rows count as the item itself (as in lm-eval): none left to show
    write_jsonl(tmp_path / "data" / "sums.jsonl", [{"a": 2, "b": 3, "sum": "The sum is 5."}] * 2)
    with pytest.raises(LlmdeskError, match="1-shot needs 1 example in the 'test' split, which has 0"):
        load_task(str(tmp_path / "sums.toml")).items()
    assert sums.sha256 != task.sha256
    before = task.sha256
    write_jsonl(tmp_path / "data" / "q.jsonl", [{"q": "x", "opts": ["a"], "right": "a", "topic": "t"}])
    assert load_task(tmp_path / "capitals.yaml").sha256 != before


# ---------------------------------------------------------------------------------------------
# bad input: one line, naming the file and the row


def one_line_error(fn) -> str:
    with pytest.raises(LlmdeskError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def mmlu_with(tmp_path: Path, rows: list[dict], name: str = "test.jsonl") -> Path:
    folder = tmp_path / "bad"
    if folder.exists():
        shutil.rmtree(folder)
    write_jsonl(folder / name, rows)
    return folder


def test_bad_rows_are_one_line_with_file_and_row(tmp_path):
    good = mmlu_rows("anatomy", 3)

    def items(rows, **kw):
        return lambda: load_task("mmlu_anatomy", data=mmlu_with(tmp_path, rows)).items(shots=0, **kw)

    no_answer = [good[0], {k: v for k, v in good[1].items() if k != "answer"}]
    msg = one_line_error(items(no_answer))
    assert "test.jsonl line 2" in msg and "no column 'answer'" in msg

    msg = one_line_error(items([good[0], good[1], {**good[2], "answer": 7}]))
    assert "test.jsonl line 3" in msg and "out of range" in msg and "4 choices" in msg

    msg = one_line_error(items([{**good[0], "answer": "x"}]))
    assert "test.jsonl line 1" in msg and "not an integer" in msg

    msg = one_line_error(items([{**good[0], "answer": 1.5}]))
    assert "line 1" in msg and "not an integer" in msg

    arc = arc_rows(2, "t")
    arc[1]["choices"] = {"text": [], "label": []}
    folder = tmp_path / "arc"
    write_jsonl(folder / "test.jsonl", arc)
    msg = one_line_error(lambda: load_task("arc_easy", data=folder).items())
    assert "test.jsonl line 2" in msg  # the target template fails first: its key is not in the empty labels
    arc[1]["answerKey"] = None
    arc[1]["choices"] = {"text": [], "label": [None]}
    write_jsonl(folder / "test.jsonl", arc)
    msg = one_line_error(lambda: load_task("arc_easy", data=folder).items())
    assert "test.jsonl line 2" in msg and "choice list is empty" in msg

    (folder / "test.jsonl").write_text(json.dumps(arc[0]) + "\n{not json\n")
    msg = one_line_error(lambda: load_task("arc_easy", data=folder).items())
    assert "test.jsonl line 2: not JSON" in msg

    # JSON: a list of rows (or {"data": [...]}), or JSON Lines under a .json name
    (folder / "test.jsonl").unlink()
    (folder / "test.json").write_text(json.dumps({"data": [arc[0], {**arc[0], "answerKey": "Z"}]}))
    msg = one_line_error(lambda: load_task("arc_easy", data=folder).items())
    assert "test.json row 2" in msg and "'Z' is not in list" in msg
    (folder / "test.json").write_text(json.dumps(arc[0]) + "\n" + json.dumps(arc[0]) + "\n")
    assert len(load_task("arc_easy", data=folder).items()) == 2
    (folder / "test.json").write_text(json.dumps(arc[0]))
    assert "is a list of rows" in one_line_error(lambda: load_task("arc_easy", data=folder).items())



def test_bad_csv_parquet_and_labels(tmp_path, monkeypatch):
    folder = tmp_path / "csv"
    write_mmlu_csv(folder / "anatomy_test.csv", mmlu_rows("anatomy", 2))
    with open(folder / "anatomy_test.csv", "a", encoding="utf-8") as f:
        f.write("a question,only,three\n")
    msg = one_line_error(lambda: load_task("mmlu", data=folder).items(shots=0))
    assert "anatomy_test.csv line 3" in msg and "3 fields" in msg

    write_mmlu_csv(folder / "anatomy_test.csv", mmlu_rows("anatomy", 2))
    with open(folder / "anatomy_test.csv", "a", encoding="utf-8") as f:
        f.write('"multi\nline",a,b,c,d,E\n')
    msg = one_line_error(lambda: load_task("mmlu", data=folder).items(shots=0))
    assert "anatomy_test.csv line 3" in msg and "'E' is not one of the letters" in msg

    pqdir = tmp_path / "pq"
    write_parquet(pqdir / "validation.parquet", truthfulqa_rows(1) + [
        {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]},
         "mc2_targets": {"choices": ["a", "b"], "labels": [0, 0]}}])
    msg = one_line_error(lambda: load_task("truthfulqa_mc2", data=pqdir).items())
    assert "validation.parquet row 2" in msg and "at least one 1" in msg

    (pqdir / "validation.parquet").write_bytes(b"PAR1 but not really")
    msg = one_line_error(lambda: load_task("truthfulqa_mc2", data=pqdir).items())
    assert "validation.parquet" in msg and "Parquet" in msg

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    msg = one_line_error(lambda: load_task("truthfulqa_mc2", data=pqdir).items())
    assert "pip install 'llmdesk[eval]'" in msg


def test_bad_specs_are_one_line(tmp_path):
    def spec(text: str, name: str = "t.yaml") -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    write_jsonl(tmp_path / "test.jsonl", [{"q": "x"}])
    base = "kind: generate\ntarget: q\ndata: {files: {test: test.jsonl}}\n"
    assert "unknown key 'promt'" in one_line_error(lambda: load_task(spec(base + "text: a\npromt: x\n")))
    assert "kind must be" in one_line_error(lambda: load_task(spec("kind: essay\ntext: a\n")))
    assert "needs a 'text' template" in one_line_error(lambda: load_task(spec(base)))
    msg = one_line_error(lambda: load_task(spec(base + "text: '{{ q '\n")))
    assert "t.yaml" in msg and "'text' template has a syntax error" in msg
    assert "t.yaml line" in one_line_error(lambda: load_task(spec("kind: [\n")))
    assert "t.toml" in one_line_error(lambda: load_task(spec("kind = \n", "t.toml")))
    msg = one_line_error(lambda: load_task(spec(base + "text: '{{ q.__class__ }}'\n")).items())
    assert "refused by the sandbox" in msg
    for huge in ("q * 10 ** 9", "2 ** 10000000", "[1] * 10 ** 9"):
        msg = one_line_error(lambda: load_task(spec(base + f"text: '{{{{ {huge} }}}}'\n")).items())
        assert "refused by the sandbox" in msg and "more than 1,000,000" in msg
    assert load_task(spec(base + "text: \"{{ '-' * 3 }}{{ 2 ** 3 }}{{ q * 2 }}\"\n")).items()[0].context == "---8xx"
    msg = one_line_error(lambda: load_task(spec(base + "text: '{{ nope }}'\n")).items())
    assert "test.jsonl line 1" in msg and "'nope' is undefined" in msg
    assert "until must be a list of stop strings" in one_line_error(
        lambda: load_task(spec(base + "text: a\nuntil: 'Question:'\n")))
    assert "max_tokens must be a whole number above 0" in one_line_error(
        lambda: load_task(spec(base + "text: a\nmax_tokens: many\n")))
    assert "no preprocess named 'mine'" in one_line_error(lambda: load_task(spec(base + "text: a\npreprocess: mine\n")))
    assert "unknown task 'mmlu_cooking'" in one_line_error(lambda: load_task("mmlu_cooking"))
    assert "task file" in one_line_error(lambda: load_task(tmp_path / "missing.yaml"))
    missing = "kind: generate\ntext: a\ntarget: q\ndata: {files: {test: no.jsonl}}\n"
    msg = one_line_error(lambda: load_task(spec(missing)))
    assert "data.files.test" in msg and "no.jsonl not found" in msg
