"""Files appear whole or not at all: what `llmdesk.atomic` promises every writer."""

from __future__ import annotations

import pytest

from llmdesk import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "model.gguf"
    dest.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(dest) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_finished_write_replaces_the_file(tmp_path):
    dest = tmp_path / "plot.png"
    with atomic.atomic_path(dest, suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".plot.png.") and tmp.suffix == ".png"
        assert not dest.exists()  # nothing under the real name until the end
        tmp.write_bytes(b"png")
    assert dest.read_bytes() == b"png"
    assert atomic.write_text(tmp_path / "a.json", "{}").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "plot.png"]
