"""fit's memory estimate against llama.cpp's real peak memory, measured on the fly.

Each point makes a random-weight model of a real shape, loads it in a child process through the
Engine, fills the context and reads the peak RSS (bench/memory.py says exactly what is counted).
Memory, not time: the result does not depend on how busy the machine is. The full grid and its
table are in docs/fit.md (benchmarks/fit_accuracy.py).
"""

from __future__ import annotations

import pytest

from llmdesk.bench.fit_accuracy import GridPoint, compare, summary

pytestmark = pytest.mark.slow

GRID = [
    GridPoint("smollm2-135m", "q8_0", 1024),
    GridPoint("smollm2-135m", "q8_0", 512, parallel=2, batch=256),
    GridPoint("tinyllama-1.1b", "q4_0", 512, layers=2),  # repacked Q4_0 weights, untied output
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("fit-grid")


def test_estimate_matches_measured_peak_memory(models):
    rows = [compare(p, models, threads=1) for p in GRID]
    s = summary(rows)
    detail = ", ".join(f"{r.point.preset}/{r.point.type}/ctx{r.point.ctx}: {100 * r.error:+.1f}%" for r in rows)
    assert s["median_abs_error"] <= 0.05, detail
    assert s["max_abs_error"] <= 0.10, detail
    # the breakdown's parts are llama.cpp's own buffer sizes (its log), not just a good total
    for r in rows:
        b = r.measured["buffers"]
        assert r.estimate["kv_cache_bytes"] == pytest.approx(sum(b["kv"].values()), rel=0.01)
        assert r.estimate["output_bytes"] == pytest.approx(sum(b["output"].values()), rel=0.02)
        assert r.estimate["compute_reserved_bytes"] == pytest.approx(sum(b["compute"].values()), rel=0.10)
        mapped = b["model"].get("CPU_Mapped", 0)
        assert r.estimate["mapped_bytes"] == pytest.approx(mapped, rel=0.01)
        assert r.estimate["repack_bytes"] == pytest.approx(b["model"].get("CPU_REPACK", 0), rel=0.02, abs=1 << 20)
