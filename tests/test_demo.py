"""The bundled demo model: present, small, a chat model, used when no model is named; its
held-out questions really are held out."""

from __future__ import annotations

import functools
import os
import subprocess

from conftest import llmdesk_exe

import llmdesk
from llmdesk.demo import default_model_path
from llmdesk.demo.corpus import FACTS, conversations, heldout, key_term_recall
from llmdesk.formats.gguf import read_gguf

LLMDESK = llmdesk_exe()
DEMO = default_model_path()
# the demo model ships with the package: its absence is a failure, not a reason to skip
def needs_demo(test):
    @functools.wraps(test)
    def run(*a, **k):
        assert DEMO is not None, "the bundled demo model is missing (make demo-model)"
        return test(*a, **k)

    return run


def test_heldout_questions_are_not_in_the_corpus():
    qs = heldout()
    assert len(qs) >= 30
    seen = {m["content"].lower().strip() for c in conversations() for m in c if m["role"] == "user"}
    for q, keys in qs:
        assert q.lower().strip() not in seen
        assert keys
    assert key_term_recall("Quantization uses FEWER BITS", ["fewer bits", "smaller"]) == 0.5


@needs_demo
def test_demo_model_file_and_card():
    assert DEMO.stat().st_size <= 10 * 1024 * 1024
    info = read_gguf(DEMO)
    assert info.architecture == "llama"
    assert "<|im_start|>" in (info.chat_template or "")
    assert (DEMO.parent / "MODEL_CARD.md").exists()


@needs_demo
def test_demo_model_answers_from_its_corpus():
    # a training question per fact, greedy: the shipped model scores ~0.5 key-term recall here,
    # an untrained one 0 (see MODEL_CARD.md); a model that lost its training would fall far below
    with llmdesk.load(DEMO, ctx=128) as m:
        recalls = [key_term_recall(m.chat([{"role": "user", "content": f.questions[0]}],
                                          temperature=0.0, max_tokens=60), f.keys) for f in FACTS]
    assert sum(recalls) / len(recalls) > 0.25


@needs_demo
def test_run_uses_the_demo_model_when_none_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LLMDESK_MODEL"}
    env["LLMDESK_HOME"] = str(tmp_path / "home")
    r = subprocess.run([LLMDESK, "run", "What is GGUF?", "-n", "30", "-t", "0", "--no-log"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
