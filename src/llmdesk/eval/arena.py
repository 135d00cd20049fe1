"""The arena: battles between two anonymous models on one prompt, the votes they produce (from a
person in the web chat's Arena mode, or a judge model in `llmdesk arena auto`), Bradley-Terry
ratings with bootstrap intervals, and preference pairs for preference tuning.

    record_vote("2+2?", "qwen:q4", "qwen:q8", "b", source="web")
    votes(source="web")            # oldest first, as dicts
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_text
from ..errors import LlmdeskError
from ..store.db import now, transaction, using

WINNERS = ("a", "b", "tie", "both_bad")
SOURCES = ("web", "auto")


# ---------------------------------------------------------------------------------------------
# The vote store (table arena_votes, migration m008)


def record_vote(prompt: str, model_a: str, model_b: str, winner: str, *, answer_a: str = "", answer_b: str = "",
                source: str = "web", judge: str | None = None, details: dict | None = None,
                conn: sqlite3.Connection | None = None) -> int:
    """Store one battle's outcome; returns the vote's id. `winner` is a, b, tie or both_bad."""
    if winner not in WINNERS:
        raise LlmdeskError(f"arena vote: winner {winner!r} is not one of {', '.join(WINNERS)}")
    if not model_a or not model_b:
        raise LlmdeskError("arena vote: both models must be named (model_a and model_b)")
    if model_a == model_b:
        raise LlmdeskError(f"arena vote: a model cannot battle itself ({model_a!r} on both sides)")
    if not source:
        raise LlmdeskError("arena vote: the source must be named (web, auto, ...)")
    with using(conn) as db, transaction(db):
        cur = db.execute(
            "INSERT INTO arena_votes (time, prompt, model_a, model_b, answer_a, answer_b, winner, source, judge, details)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now(), prompt, model_a, model_b, answer_a, answer_b, winner, source, judge,
             json.dumps(details or {}, sort_keys=True)),
        )
        return int(cur.lastrowid)


def votes(*, source: str | None = None, limit: int | None = None,
          conn: sqlite3.Connection | None = None) -> list[dict[str, Any]]:
    """Every vote (or those of one source), oldest first; with `limit`, the newest `limit` of them."""
    sql, args = "SELECT * FROM arena_votes", []
    if source is not None:
        sql += " WHERE source = ?"
        args.append(source)
    if limit is not None:
        sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
        args.append(int(limit))
    else:
        sql += " ORDER BY id"
    with using(conn) as db:
        rows = db.execute(sql, args).fetchall()
    return [{**dict(r), "details": json.loads(r["details"] or "{}")} for r in rows]


# ---------------------------------------------------------------------------------------------
# Bradley-Terry ratings on the Elo scale
#
# P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)), the model LMSYS's Chatbot Arena fits
# (Chiang et al. 2024, "Chatbot Arena", section 5; their notebook's compute_mle_elo). A tie counts
# as half a win each way, as theirs does; a "both_bad" vote is a tie. The log-strengths are fitted
# by Newton's method on the (concave) log-likelihood, with a very weak Gaussian prior (RIDGE) that
# keeps a rating finite when a model won or lost every battle it played and fixes the free shift
# (only differences are identified); on anything but such a case its effect is far below a point.

SCALE, BASE, CENTER = 400.0, 10.0, 1000.0
RIDGE = 1e-3  # prior precision on the natural-log strengths: sd ~ 32 nats ~ 5,500 rating points
ELO_PER_NAT = SCALE / np.log(BASE)


@dataclass
class Rating:
    """One model's line on the leaderboard. `low`/`high`: the bootstrap 95% interval; `rank`: 1 +
    the number of models whose interval lies wholly above this one's. `ties` includes both_bad."""

    model: str
    rating: float
    low: float
    high: float
    rank: int
    battles: int
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _battles(rows: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Models (sorted), and per vote: index of a, index of b, score of a (1, 0 or 0.5)."""
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[r["model_a"]] for r in rows], dtype=np.int64)
    b = np.array([index[r["model_b"]] for r in rows], dtype=np.int64)
    score = np.array([{"a": 1.0, "b": 0.0}.get(r["winner"], 0.5) for r in rows])
    return models, a, b, score


def _fit(k: int, a: np.ndarray, b: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Maximum-likelihood log-strengths (natural log, k of them) from battles a vs b."""
    w = np.ones(len(a)) if weight is None else weight
    # W[i, j]: points i took from j (ties half each); N = W + W.T: battles between i and j
    W = np.zeros((k, k))
    np.add.at(W, (a, b), w * score)
    np.add.at(W, (b, a), w * (1.0 - score))
    N = W + W.T

    def objective(t: np.ndarray) -> float:
        d = t[:, None] - t[None, :]
        return float(-(W * np.logaddexp(0.0, -d)).sum() - 0.5 * RIDGE * (t @ t))

    theta = np.zeros(k)
    f = objective(theta)
    for _ in range(100):
        s = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (W - N * s).sum(axis=1) - RIDGE * theta
        v = N * s * (1.0 - s)
        hess = v - np.diag(v.sum(axis=1) + RIDGE)  # negative definite
        step = np.linalg.solve(hess, -grad)
        t = 1.0  # backtracking: Newton can overshoot far from the optimum (a near-unbeaten model)
        while t > 1e-8:
            f_new = objective(theta + t * step)
            if f_new >= f - 1e-12:
                break
            t *= 0.5
        theta, f = theta + t * step, f_new
        if np.max(np.abs(t * step)) < 1e-9:
            break
    return theta


def _to_elo(theta: np.ndarray, anchor: int | None) -> np.ndarray:
    """Log-strengths -> ratings: mean 1000, or the anchor model at 1000. Works on (..., k)."""
    r = theta * ELO_PER_NAT
    ref = r[..., anchor] if anchor is not None else r.mean(axis=-1)
    return r - np.asarray(ref)[..., None] + CENTER


def leaderboard(rows: list[dict], *, bootstrap: int = 1000, seed: int = 0, anchor: str | None = None) -> list[Rating]:
    """Bradley-Terry ratings of the models in `rows` (votes: model_a, model_b, winner), best first,
    with 95% intervals from `bootstrap` resamples of the battles (with replacement, seeded)."""
    if not rows:
        raise LlmdeskError("no arena votes yet: vote in the web chat's Arena mode or run 'llmdesk arena auto'")
    if bootstrap < 0:
        raise LlmdeskError(f"--bootstrap must be 0 or more rounds, not {bootstrap}")
    models, a, b, score = _battles(rows)
    if anchor is not None and anchor not in models:
        raise LlmdeskError(f"anchor model '{anchor}' has no votes; models with votes: {', '.join(models)}")
    k, n = len(models), len(rows)
    ai = models.index(anchor) if anchor is not None else None
    rating = _to_elo(_fit(k, a, b, score), ai)
    if bootstrap:
        rng = np.random.default_rng(seed)
        # a resample is the count of times each battle is drawn: the same as drawing with replacement
        boots = np.array([_fit(k, a, b, score, rng.multinomial(n, np.full(n, 1.0 / n)).astype(float))
                          for _ in range(bootstrap)])
        low, high = np.percentile(_to_elo(boots, ai), [2.5, 97.5], axis=0)
    else:
        low, high = rating.copy(), rating.copy()
    wins, ties, losses = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
    np.add.at(wins, a[score == 1.0], 1)
    np.add.at(wins, b[score == 0.0], 1)
    np.add.at(losses, a[score == 0.0], 1)
    np.add.at(losses, b[score == 1.0], 1)
    np.add.at(ties, a[score == 0.5], 1)
    np.add.at(ties, b[score == 0.5], 1)
    ranks = ranks_from_intervals(low, high)
    out = [Rating(m, float(rating[i]), float(low[i]), float(high[i]), ranks[i], int(wins[i] + ties[i] + losses[i]),
                  int(wins[i]), int(ties[i]), int(losses[i])) for i, m in enumerate(models)]
    return sorted(out, key=lambda r: (r.rank, -r.rating, r.model))


def ranks_from_intervals(low: np.ndarray | list[float], high: np.ndarray | list[float]) -> list[int]:
    """LMSYS's rank rule: 1 + the number of models whose lower bound is above this one's upper
    bound. Models whose intervals overlap share a rank; a rank is earned, not read off the order."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    return [int(1 + (low > h).sum()) for h in high]


# ---------------------------------------------------------------------------------------------
# Preference pairs: the prompt/chosen/rejected rows TRL's DPOTrainer (and ORPO, KTO's paired
# form) read from a JSONL file


def preference_pairs(rows: list[dict]) -> tuple[list[dict[str, str]], int]:
    """(pairs, skipped): one pair per vote with a winner; ties and both_bad votes are skipped."""
    pairs, skipped = [], 0
    for r in rows:
        if r["winner"] not in ("a", "b"):
            skipped += 1
            continue
        won, lost = ("a", "b") if r["winner"] == "a" else ("b", "a")
        pairs.append({"prompt": r["prompt"], "chosen": r[f"answer_{won}"], "rejected": r[f"answer_{lost}"],
                      "chosen_model": r[f"model_{won}"], "rejected_model": r[f"model_{lost}"], "source": r["source"]})
    return pairs, skipped


def export_pairs(path: str | Path, rows: list[dict]) -> tuple[int, int]:
    """Write the preference pairs of `rows` to a JSONL file (atomically); returns (written, skipped)."""
    pairs, skipped = preference_pairs(rows)
    if not pairs:
        raise LlmdeskError(f"no votes with a winner to export ({skipped} ties or both-bad votes, which make no pair)")
    path = Path(path)
    if path.is_dir():
        raise LlmdeskError(f"{path} is a directory; give a file name, e.g. -o pairs.jsonl")
    if not path.parent.is_dir():
        raise LlmdeskError(f"the folder {path.parent} does not exist")
    write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return len(pairs), skipped


# ---------------------------------------------------------------------------------------------
# The leaderboard as a picture


def plot_leaderboard(ratings: list[Rating], path: str | Path, *, title: str = "arena") -> Path:
    """Ratings with their 95% intervals as horizontal bars, best at the top (PNG, SVG or PDF)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LlmdeskError(f"--plot writes .png, .svg or .pdf files, not '{path.name}'")
    if not path.parent.is_dir():
        raise LlmdeskError(f"the folder {path.parent} does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = list(range(len(ratings)))[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ratings) + 1.4))
    ax.errorbar([r.rating for r in ratings], ys,
                xerr=[[r.rating - r.low for r in ratings], [r.high - r.rating for r in ratings]],
                fmt="o", capsize=4, color="tab:blue")
    ax.set_yticks(ys, [f"{r.rank}. {r.model}" for r in ratings])
    ax.axvline(CENTER, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap interval")
    ax.set_title(f"{title}: {sum(r.battles for r in ratings) // 2} battles", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
