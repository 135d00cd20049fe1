"""lm-evaluation-harness, the real package run as its own process, scores a local task through
`llmdesk serve`: its `local-completions` model (token ids or text, vLLM's tokenizer routes) and its
`gguf` model (text, text_offset) give the same per-item loglikelihoods as the Python API.

Two models: the tiny one, and a copy that reads texts after a BOS (as Llama 2 and Gemma do). lm-eval's
remote tokenizer never adds a BOS, so token ids are scored without one; a text prompt is read with
the model's BOS and its tokens reported without it, aligned with lm-eval's count."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_echo import bos_gguf, local, local_bos  # noqa: F401 (fixtures: the models, loaded here too)
from test_serve_util import running

TOL = 1e-4
CITIES = [("France", "Paris"), ("Italy", "Rome"), ("Norway", "Oslo"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
          ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Greece", "Athens")]
TASK = """\
task: llmdesk_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: what is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A 12-item multiple-choice task in lm-eval's YAML over local JSONL (3 choices each; two
    with accented words, whose bytes some tokens split)."""
    d = tmp_path_factory.mktemp("lm_eval_task")
    rows = []
    for i, (country, city) in enumerate(CITIES):
        others = [c for _, c in CITIES if c != city][i % 3 : i % 3 + 2]
        choices = others[:i % 3] + [city] + others[i % 3:]
        rows.append({"country": country, "choices": choices, "answer": choices.index(city)})
    rows.append({"country": "Québec", "choices": ["Québec City", "Montréal", "Gatineau"], "answer": 0})
    rows.append({"country": "Réunion", "choices": ["Saint-Denis", "Saint-Pierre", "crème brûlée"], "answer": 0})
    (d / "capitals.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (d / "capitals.yaml").write_text(TASK.format(data=d / "capitals.jsonl"))
    return d


@pytest.fixture(scope="module")
def server(tiny_gguf, bos_gguf):
    # the BOS model is the default: lm-eval's gguf model names no model
    with running(None, models=[str(bos_gguf), str(tiny_gguf)], parallel=2, ctx=256) as s:
        yield s


def lm_eval(task_dir: Path, out: Path, model: str, model_args: str, *more: str) -> list[dict]:
    """Run `lm_eval` (the installed package, as a user runs it, offline) and return its logged samples."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", "llmdesk_capitals", "--include_path", str(task_dir), "--log_samples",
           "--output_path", str(out), *more]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"lm_eval failed ({p.returncode}):\n{p.stderr[-3000:]}"
    files = list(out.rglob("samples_llmdesk_capitals_*.jsonl"))
    assert len(files) == 1, f"lm_eval wrote no samples file in {out}"
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def check_against_python_api(samples: list[dict], local, bos: bool = True) -> None:
    """Every (context, continuation) lm-eval scored has the log-probability and is_greedy of
    `local.loglikelihood` on the same pair: the texts (`bos`: read as the model reads them, with
    its BOS), or else the token ids lm-eval's remote tokenizer gives (no BOS)."""
    assert len(samples) == 12
    for s in samples:
        args = s["arguments"]
        assert len(args) == len(s["doc"]["choices"]) == len(s["resps"])
        for k, resp in zip(sorted(args, key=lambda a: int(a.rsplit("_", 1)[1])), s["resps"]):
            context, continuation = args[k]["arg_0"], args[k]["arg_1"]
            logprob, greedy = float(resp[0][0]), resp[0][1] == "True"
            if bos:
                want, want_greedy = local.loglikelihood(context, continuation)
            else:
                cont = local.score_tokens(context, continuation)[1]
                want, want_greedy = local.loglikelihood(local.tokenize(context, add_special=False), cont)
            assert math.isclose(logprob, want, abs_tol=TOL), (context, continuation, logprob, want)
            assert greedy == want_greedy


def need_tenacity() -> None:
    if importlib.util.find_spec("tenacity") is None:
        pytest.fail("lm-eval's API models (local-completions) need tenacity: the test dependencies must install "
                    "lm-eval[api] (pyproject.toml), then `make install`", pytrace=False)


@pytest.mark.slow  # lm_eval takes ~30 s to import torch and transformers on the 2-core test machine
def test_lm_eval_local_completions_token_ids(server, task_dir, local, tmp_path):
    need_tenacity()
    # 4 prompts (lists of token ids) per request; max_length: the context less the token generated
    args = f"model=tiny.gguf,base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=255"
    samples = lm_eval(task_dir, tmp_path / "out", "local-completions", args, "--batch_size", "4")
    check_against_python_api(samples, local)


@pytest.mark.slow
def test_lm_eval_local_completions_text_on_a_bos_model(server, task_dir, local_bos, tmp_path):
    need_tenacity()
    # tokenized_requests=False: lm-eval sends text, which the server reads after the model's BOS
    args = (f"model=tiny_bos.gguf,base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=255,"
            "tokenized_requests=False")
    samples = lm_eval(task_dir, tmp_path / "out", "local-completions", args, "--batch_size", "4")
    check_against_python_api(samples, local_bos)
    # and token ids (the default) are scored as lm-eval's tokenizer gives them: without the BOS
    args = f"model=tiny_bos.gguf,base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=255"
    samples = lm_eval(task_dir, tmp_path / "ids", "local-completions", args, "--batch_size", "4")
    check_against_python_api(samples, local_bos, bos=False)


@pytest.mark.slow
def test_lm_eval_gguf_model(server, task_dir, local_bos, tmp_path):
    check_against_python_api(lm_eval(task_dir, tmp_path / "out", "gguf", f"base_url={server.url}"), local_bos)
