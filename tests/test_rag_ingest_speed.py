"""Embedding a collection's chunks fast, and the same: an encoder's texts can be split over
contexts of one thread each and decoded side by side, or given to one context with every thread,
whichever has been faster lately (Engine._embed_setup); the vectors must be those of one text at
a time in one context, in the order asked, and a time limit still stops the work.

The model is the tiny random-weight BERT of tests/bert_fixtures.py (its context: 128 tokens)."""

from __future__ import annotations

import numpy as np
import pytest

import llmdesk
from bert_fixtures import CORPUS, make_tiny_bert_gguf
from llmdesk.errors import LlmdeskError
from llmdesk.runtime.engine import EMBED_MAX_SEQS, Engine


def texts(n: int) -> list[str]:
    """n texts of 1 to about 100 tokens, in no order of length."""
    words = " ".join(CORPUS).split()
    return [" ".join(words[(7 * i) % len(words):][: 1 + (37 * i) % 60]) for i in range(n)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert_gguf(tmp_path_factory.mktemp("bert"))


def test_side_by_side_vectors_are_one_text_at_a_time(bert, monkeypatch):
    many = texts(3 * EMBED_MAX_SEQS)  # more texts than one decode holds
    with llmdesk.load(bert, threads=1) as m:  # one context: each text alone
        alone = np.array([m.embed([t])[0] for t in many])
    monkeypatch.setattr(Engine, "embed_side_by_side", True)
    with llmdesk.load(bert, threads=2) as m:  # two contexts of one thread, side by side
        together = np.array(m.embed(many))
        side_by_side_steps = m.engine.steps
    monkeypatch.setattr(Engine, "embed_side_by_side", False)
    with llmdesk.load(bert, threads=2) as m:  # one context of two threads, as llama.cpp alone would
        packed = np.array(m.embed(many))
        one_context_steps = m.engine.steps
    monkeypatch.setattr(Engine, "embed_side_by_side", None)
    with llmdesk.load(bert, threads=2) as m:  # the default: each way tried, then the faster
        chosen = np.array(m.embed(many))
        assert set(m.engine._embed_rates) == {True, False}  # both ways were timed
    assert together.shape == (len(many), 64)
    for got in (together, packed, chosen):
        cos = (got * alone).sum(1)
        assert cos.min() >= 0.99999, cos.min()
        assert ((got @ alone.T).argmax(1) == np.arange(len(many))).all()  # each text's own vector, in order
    # side by side, the same texts take fewer decodes one after another
    assert side_by_side_steps < one_context_steps


@pytest.mark.parametrize("side_by_side", [True, None], ids=["side-by-side", "the faster way"])
def test_time_limit_stops_side_by_side_decodes(bert, monkeypatch, side_by_side):
    monkeypatch.setattr(Engine, "embed_side_by_side", side_by_side)
    with llmdesk.load(bert, threads=2) as m:
        before = m.embed(["the cat sat on the mat"])
        with pytest.raises(LlmdeskError, match="time limit"):
            m.embed(texts(4000), time_limit=0.05)
        # the contexts are left usable: the same text, the same vector
        assert np.allclose(m.embed(["the cat sat on the mat"]), before, atol=1e-6)
