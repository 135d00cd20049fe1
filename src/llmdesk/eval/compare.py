"""Models side by side on one task (`llmdesk eval compare`): each model's latest stored result,
the difference to the first model and whether it exceeds the noise.

The others are compared on the first model's items: when a run scored more (a larger limit),
its scores are recomputed from its stored per-item results over the first's items. The
difference is then paired (the per-item results are in `eval_items`): the mean of the per-item
differences, with standard error std(d) / sqrt(n). Two models' errors on the same items are
correlated, so this is much tighter than treating the runs as independent. Without per-item
results it is unpaired: se = sqrt(se1^2 + se2^2). A difference is significant when
|diff| > 1.96 se (a two-sided 95% normal interval that excludes zero).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LlmdeskError
from .harness import Identity, Metric, aggregate, expand_ranges, stored_items

Z95 = 1.96


@dataclass
class Difference:
    value: float  # this model's metric minus the first model's
    stderr: float | None
    paired: bool
    n: int  # items the difference is taken over

    @property
    def significant(self) -> bool:
        if self.stderr is None or not math.isfinite(self.value):
            return False
        return abs(self.value) > Z95 * self.stderr

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "paired": self.paired, "n": self.n,
                "significant": self.significant}


@dataclass
class Entry:
    """One model's stored result on the task."""

    model: str
    model_sha256: str | None
    result_id: int
    time: str
    n: int
    metrics: dict[str, Metric]
    diff: dict[str, Difference] = field(default_factory=dict)  # empty for the first model

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_sha256": self.model_sha256, "result_id": self.result_id,
                "time": self.time, "n": self.n, "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
                "difference": {k: d.to_dict() for k, d in self.diff.items()}}


@dataclass
class Comparison:
    task: str
    task_sha256: str
    shots: int | None
    seed: int
    metrics: list[str]
    entries: list[Entry]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "task_sha256": self.task_sha256, "shots": self.shots, "seed": self.seed,
                "metrics": self.metrics, "models": [e.to_dict() for e in self.entries]}


def compare(models: list[Identity], task: str, *, conn: sqlite3.Connection | None = None) -> Comparison:
    """The latest stored result of each model on `task` (its name, or the spec path it was run
    with), all with the first model's task file (sha256), shots and seed; for the others the
    latest over the same items as the first's, when there is one (then the difference pairs)."""
    from ..store.db import using

    if len(models) < 2:
        raise LlmdeskError("name at least two models to compare")
    with using(conn) as db:
        first = _latest(db, models[0], task, None)
        if first is None:
            raise LlmdeskError(f"no stored result of {models[0].name} on task '{task}'; run "
                               f"'llmdesk eval run {models[0].name} --task {task}' first")
        s = first["settings"]
        rows = [first]
        for m in models[1:]:
            r = _latest(db, m, task, s)
            if r is None:
                how = "" if s.get("shots") is None else f" --shots {s['shots']}"
                what = f"shots {s.get('shots', 'default')}"
                if s.get("shots") != 0:  # the seed draws the few-shot examples
                    how += f" --seed {s.get('seed')}"
                    what += f", seed {s.get('seed')}"
                raise LlmdeskError(
                    f"no stored result of {m.name} on task '{task}' with the same task file and settings as "
                    f"{models[0].name}'s ({what}); run 'llmdesk eval run {m.name} --task {task}{how}' first")
            rows.append(r)
        names = [k for k in rows[0]["metrics"] if f"{k}_stderr" in rows[0]["metrics"]]
        entries = [_entry(r, names) for r in rows]
        for m, e in zip(models, entries):  # as the user named them (one file may have been run under two names)
            e.model = m.name
        base_items = _items(db, rows[0])
        for r, e in zip(rows[1:], entries[1:]):
            items = _items(db, r, like=base_items)
            if items is not None and base_items is not None and items.keys() == base_items.keys() \
                    and e.n != len(items):
                # its run scored more items than the first's: its scores on the first's items
                e.metrics = {k: aggregate([v[k] for v in items.values()]) for k in names}
                e.n = len(items)
            for k in names:
                e.diff[k] = _difference(entries[0].metrics[k], e.metrics[k], base_items, items, k)
    return Comparison(task=s.get("task", task), task_sha256=s["task_sha256"], shots=s.get("shots"),
                      seed=s.get("seed"), metrics=names, entries=entries)


def _latest(db: sqlite3.Connection, model: Identity, task: str, like: dict | None) -> dict | None:
    from ..store.results import query

    found = query("eval", model_sha256=model.sha256, limit=100_000, conn=db) if model.sha256 else \
        query("eval", model=model.name, limit=100_000, conn=db)
    matching = []
    for r in found:  # newest first
        s = r["settings"]
        if task not in (s.get("task"), s.get("task_ref")):
            continue
        keys = ("task_sha256", "shots") + (("seed",) if like is not None and like.get("shots") != 0 else ())
        if like is not None and any(s.get(k) != like.get(k) for k in keys):
            continue
        matching.append(r)
    if like is not None:  # the newest run over the same items as the first model's, so they pair
        same = [r for r in matching if r["settings"].get("items") == like.get("items")]
        matching = same or matching
    return matching[0] if matching else None


def _entry(r: dict, names: list[str]) -> Entry:
    m = r["metrics"]
    return Entry(model=r["model"], model_sha256=r["model_sha256"], result_id=r["id"], time=r["time"],
                 n=int(m.get("n", 0)),
                 metrics={k: Metric(float(m[k]) if m[k] is not None else float("nan"), m.get(f"{k}_stderr"))
                          for k in names})


def _items(db: sqlite3.Connection, r: dict, like: dict | None = None) -> dict[int, dict] | None:
    """The run's per-item results, when all of its items are still stored; with `like`, the
    results of like's items instead, when its run key holds them all (a run with a larger
    limit, or the first items of one resumed further)."""
    s = r["settings"]
    if not s.get("run_key") or s.get("items") is None:
        return None
    have = stored_items(db, s["run_key"])
    if like is not None and all(i in have for i in like):
        return {i: have[i] for i in like}
    wanted = expand_ranges(s["items"])
    if any(i not in have for i in wanted):
        return None
    return {i: have[i] for i in wanted}


def _difference(a: Metric, b: Metric, items_a: dict | None, items_b: dict | None, metric: str) -> Difference:
    if items_a is not None and items_b is not None and items_a.keys() == items_b.keys() and len(items_a) > 1 \
            and all(metric in items_a[i] and metric in items_b[i] for i in items_a):
        d = np.array([items_b[i][metric] - items_a[i][metric] for i in items_a], dtype=np.float64)
        return Difference(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), True, len(d))
    se = None if a.stderr is None or b.stderr is None else math.sqrt(a.stderr ** 2 + b.stderr ** 2)
    return Difference(b.value - a.value, se, False, 0)


def plot(c: Comparison, path: str | Path) -> Path:
    """Left: each model's scores with 95% error bars (1.96 standard errors). Right: each
    model's difference to the first with its 95% interval (paired where it could be): a
    difference whose interval misses zero is beyond the noise, even where the scores' own bars
    overlap. PNG, SVG or PDF by the file name; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    path = Path(path).expanduser()
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LlmdeskError(f"--plot writes .png, .svg or .pdf files, not '{path.suffix or path.name}'")
    if not path.parent.is_dir():
        raise LlmdeskError(f"--plot: no such folder {path.parent}; create it first")
    n_models, n_metrics = len(c.entries), len(c.metrics)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
    x = np.arange(n_metrics)
    width = 0.8 / n_models
    for j, e in enumerate(c.entries):
        ax.bar(x + (j - (n_models - 1) / 2) * width, [e.metrics[k].value for k in c.metrics], width,
               yerr=[Z95 * (e.metrics[k].stderr or 0.0) for k in c.metrics], capsize=4, label=e.model,
               color=colors[j % len(colors)])
    ax.set_xticks(x, c.metrics)
    ax.set_ylabel("score (95% interval)")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.set_title("scores", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    # the differences: one row per (metric, model), the first model's zero line
    labels, y = [], 0
    for k in c.metrics:
        for j, e in enumerate(c.entries[1:], start=1):
            d = e.diff[k]
            err = Z95 * d.stderr if d.stderr is not None else 0.0
            dx.errorbar([d.value], [y], xerr=[err], fmt="o", capsize=4,
                        color=colors[j % len(colors)], mfc=colors[j % len(colors)] if d.significant else "white")
            labels.append(f"{k}: {e.model}" + ("" if d.paired else " (unpaired)"))
            y += 1
    dx.axvline(0, color="black", lw=1)
    dx.set_yticks(range(len(labels)), labels, fontsize=8)
    dx.invert_yaxis()
    dx.set_xlabel(f"difference to {c.entries[0].model} (95% interval)")
    dx.set_title("differences (filled: beyond the noise)", fontsize=10)
    dx.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{c.task} ({'default shots' if c.shots is None else f'{c.shots}-shot'}, "
                 f"n={c.entries[0].n})", fontsize=11)
    fig.tight_layout()
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
