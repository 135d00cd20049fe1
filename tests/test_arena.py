"""The arena: the vote store, Bradley-Terry ratings with bootstrap intervals, the rank rule,
preference-pair export and the `llmdesk arena` commands."""

from __future__ import annotations

import pytest

from llmdesk.errors import LlmdeskError
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
