"""The arena: battles between two anonymous models on one prompt, the votes they produce (from a
person in the web chat's Arena mode, or a judge model in `llmdesk arena auto`), Bradley-Terry
ratings with bootstrap intervals, and preference pairs for preference tuning.

    record_vote("2+2?", "qwen:q4", "qwen:q8", "b", source="web")   # -> the vote's id
    rows = votes(source="web")                   # oldest first, as dicts
    board = leaderboard(rows, bootstrap=1000)     # [Rating(model, rating, low, high, rank, ...)]
    export_pairs("pairs.jsonl", rows)            # prompt/chosen/rejected for DPO
    auto(["a.gguf", "b.gguf"], "judge.gguf", "questions.jsonl")   # battles judged by a model

docs/arena.md says how the ratings are computed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_text
from ..errors import LlmdeskError
from ..store import paths
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


def _points(k: int, a: np.ndarray, b: np.ndarray, score: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """W[i, j]: the points model i took from model j (a tie half each), `weight` times per battle."""
    W = np.zeros((k, k))
    np.add.at(W, (a, b), weight * score)
    np.add.at(W, (b, a), weight * (1.0 - score))
    return W


def _fit(W: np.ndarray) -> np.ndarray:
    """Maximum-likelihood log-strengths (natural log, one per model) from the points matrix W."""
    k = len(W)
    N = W + W.T  # battles between i and j

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
    rating = _to_elo(_fit(_points(k, a, b, score, np.ones(n))), ai)
    if bootstrap:
        rng = np.random.default_rng(seed)
        # Drawing n battles with replacement draws each kind of battle (a, b, outcome) a
        # multinomial number of times, with its share of the votes as probability: resample
        # those counts, a few cells instead of every vote.
        cells, count = np.unique(np.stack([a, b, score]), axis=1, return_counts=True)
        ca, cb, cs = cells[0].astype(np.int64), cells[1].astype(np.int64), cells[2]
        boots = np.array([_fit(_points(k, ca, cb, cs, rng.multinomial(n, count / n).astype(float)))
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


def groups(rows: list[dict]) -> list[list[str]]:
    """The models that are compared with each other, directly or through others (the connected
    parts of the battle graph), largest first. Ratings in different groups share no votes: only
    the weak prior and the anchoring put them on one scale."""
    parent: dict[str, str] = {}

    def root(m: str) -> str:
        while parent.setdefault(m, m) != m:
            m = parent[m]
        return m

    for r in rows:
        parent[root(r["model_a"])] = root(r["model_b"])
    out: dict[str, list[str]] = {}
    for m in sorted(parent):
        out.setdefault(root(m), []).append(m)
    return sorted(out.values(), key=lambda g: (-len(g), g))


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


# ---------------------------------------------------------------------------------------------
# Battles judged by a model: `llmdesk arena auto`
#
# Every model answers the questions first (temperature 0, one model loaded at a time), the
# answers cached by the model's identity (its file's sha256 with its LoRA adapters', or its
# endpoint) and the question's text, so a rerun, another questions file holding the same
# question, or the same file under another name never answers twice. Then the judge compares
# each battle's two answers in both orders (eval.judge.pairwise), or a grader scores each answer
# (`--judge grader:SPEC`), and the verdict is stored at once as a vote (source "auto"). A battle
# already voted on by this judge is not fought again: a rerun resumes.


@dataclass
class AutoReport:
    """What `arena auto` did. `battles` planned; `done_before` skipped as already voted by this
    judge; `answered`/`cached`: answers generated now / taken from the cache; `malformed`:
    verdicts the judge gave that could not be read (not recorded);
    `unanswered`: battles a failed model could not fight; `failed`: model -> its one-line error."""

    judge: str
    models: list[str]
    questions: int
    battles: int
    votes: int = 0
    done_before: int = 0
    answered: int = 0
    cached: int = 0
    malformed: int = 0
    unanswered: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"a": 0, "b": 0, "tie": 0})
    failed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str, int, int], None]  # (what, done, total)
Say = Callable[[str], None]


def _text_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:20]


def _cached_answers(path: Path) -> dict[str, list[str]]:
    """The answers a cache file holds, by question key, in the layout eval.judge.generate_answers
    writes (MT-Bench's: question_id, choices[0].turns). Nothing when it is missing or unreadable:
    the cache is only a cache."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {str(r["question_id"]): list(r["choices"][0]["turns"]) for r in rows}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def plan_battles(n_questions: int, models: list[str], *, rounds: int | None = None,
                 seed: int = 0) -> list[tuple[int, str, str]]:
    """(question index, model a, model b): every pair on every question, or `rounds` of those
    drawn at random without repeats; which model is "a" is drawn too (seeded)."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(models, 2))
    every = [(q, *pair) for q in range(n_questions) for pair in pairs]
    if rounds is not None:
        if rounds < 1:
            raise LlmdeskError(f"--rounds must be 1 or more, not {rounds}")
        if rounds < len(every):
            every = [every[i] for i in sorted(rng.choice(len(every), rounds, replace=False))]
    return [(q, a, b) if rng.random() < 0.5 else (q, b, a) for q, a, b in every]


GRADER = "grader:"  # a judge that is a grader: grader:exact, grader:python:FILE.py:FN, ...


class GraderJudge:
    """A grader (eval.graders, as `tune --reward` takes them) as the arena's judge: each answer is
    scored on its own, against the question row's columns (the reference `answer`, ...), and the
    higher score wins; equal scores are a tie, a None score (the grader could not grade) no
    verdict. A grader sees each answer alone, so the order of the two cannot sway it."""

    def __init__(self, judge: str, path: str | Path, qs: list) -> None:
        from . import judge as J
        from .graders import parse_grader

        self.grader = parse_grader(judge[len(GRADER):])
        rows = dict(J._jsonl(Path(path), "the questions file"))
        self.columns: dict[str, dict[str, Any]] = {}
        for q in qs:  # every question has what the grader reads, checked before any model answers
            cols = {k: v for k, v in rows[q.line].items() if k not in ("turns", "question", "question_id", "id")}
            self.grader.check_columns(set(cols), f"{path}:{q.line}")
            self.columns[q.id] = cols

    def pairwise(self, q, answer_a: str, answer_b: str):
        from .judge import PairVerdict

        cols = {k: [v, v] for k, v in self.columns[q.id].items()}
        sa, sb = self.grader([q.turns[-1]] * 2, [answer_a, answer_b], **cols)
        winner = None if sa is None or sb is None else "a" if sa > sb else "b" if sb > sa else "tie"
        return PairVerdict(winner, True, [], winner is not None, f"{self.grader.spec}: a {sa}, b {sb}",
                           [winner, winner])


def auto(models: list[str], judge: str, questions: str | Path, *, rounds: int | None = None, seed: int = 0,
         max_tokens: int | None = None, ctx: int | None = None, threads: int | None = None,
         constrain: bool | None = None, progress: Progress | None = None, say: Say | None = None) -> AutoReport:
    """Battles between `models` (references: a .gguf path, NAME[:TAG], openai:URL#MODEL, any of
    them with LoRA adapters as BASE+ADAPTER: eval.common.resolve_choice) on the questions of a
    JSONL file (MT-Bench's layout or {"id", "question"}), judged by `judge` (a model, or
    `grader:SPEC`: a grader scoring each answer against the row's columns, `GraderJudge`), each
    verdict stored as a vote (source "auto", the judge's name). A model that fails is reported
    in `failed` and its battles skipped; the votes already stored stay. `constrain`: hold the
    judge's replies to a JSON schema (default: a local judge is, a remote one is not)."""
    from . import judge as J
    from .common import resolve_choice

    qs = J.read_questions(questions)
    if len(models) < 2:
        raise LlmdeskError("an arena needs at least two models")
    found = [resolve_choice(m, say=say) for m in models]
    names = [f.name for f in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LlmdeskError(f"two models are named '{dup}'; give each a name of its own (e.g. 'llmdesk import FILE "
                           "--name NAME')")
    grader = GraderJudge(judge, questions, qs) if judge.startswith(GRADER) else None
    judge_ref = None if grader else resolve_choice(judge, say=say)
    judge_name = judge if grader else judge_ref.name
    battles = plan_battles(len(qs), names, rounds=rounds, seed=seed)
    report = AutoReport(judge=judge_name, models=names, questions=len(qs), battles=len(battles))
    max_tokens = J.MAX_ANSWER_TOKENS if max_tokens is None else max_tokens

    # a battle is this question's text, these two models (either side) and this judge
    def battle_key(q, a: str, b: str) -> str:
        return _text_key(json.dumps(q.turns), *sorted((a, b)), judge_name)

    done = {v["details"].get("battle") for v in votes(source="auto") if v["judge"] == judge_name}
    todo = [bt for bt in battles if battle_key(qs[bt[0]], bt[1], bt[2]) not in done]
    report.done_before = len(battles) - len(todo)

    def load_judge():
        if grader is not None:
            return grader
        try:
            return judge_ref.load(ctx=ctx, threads=threads)
        except LlmdeskError as e:
            raise LlmdeskError(f"the judge {judge_ref.name} could not be loaded: {e}") from None

    # a remote judge costs nothing to hold: reach it before the models answer, not after
    jm = load_judge() if judge_ref is not None and judge_ref.is_remote and todo else None
    try:
        answers = _answers(found, qs, todo, report, max_tokens=max_tokens, ctx=ctx, threads=threads,
                           progress=progress)

        def answer(name: str, q) -> list[str] | None:
            got = answers.get(name, {}).get(_text_key(*q.turns))
            return got if got is not None and len(got) >= len(q.turns) else None

        # 2. verdicts: each stored as a vote at once, so a judge that fails mid-run loses nothing done
        ready = [(qs[i], a, b) for i, a, b in todo if answer(a, qs[i]) is not None and answer(b, qs[i]) is not None]
        report.unanswered = len(todo) - len(ready)
        if ready and progress:
            progress("verdicts", 0, len(ready))
        if ready and jm is None:
            jm = load_judge()
        for i, (q, a, b) in enumerate(ready, 1):
            ans_a, ans_b = answer(a, q), answer(b, q)
            last = len(q.turns) - 1  # the judge reads the whole conversation and decides on its last turn
            try:
                if grader is not None:
                    v = grader.pairwise(q, ans_a[last], ans_b[last])
                else:
                    v = J.pairwise(jm, q.turns[last], ans_a[last], ans_b[last], reference=q.references[last],
                                   history_a=list(zip(q.turns[:last], ans_a[:last])) or None,
                                   history_b=list(zip(q.turns[:last], ans_b[:last])) or None, constrain=constrain,
                                   say=say)
            except LlmdeskError as e:
                raise LlmdeskError(f"the judge {judge_name} failed on question {q.id} after {report.votes} "
                                   f"new votes (kept; a rerun resumes): {e}") from None
            if v.winner is None:
                report.malformed += 1
            else:
                details = {"battle": battle_key(q, a, b), "question_id": q.id, "consistent": v.consistent,
                           "verdicts": v.verdicts, "reasoning": v.reasoning[:2000]}
                if last:
                    details["turns"] = q.turns
                record_vote(q.turns[last], a, b, v.winner, answer_a=ans_a[last], answer_b=ans_b[last], source="auto",
                            judge=judge_name, details=details)
                report.votes += 1
                report.outcomes[v.winner] += 1
            if progress:
                progress("verdicts", i, len(ready))
    finally:
        if jm is not None and jm is not grader:
            jm.close()
    return report


def _answers(found: list, qs: list, todo: list[tuple[int, str, str]], report: AutoReport, *, max_tokens: int,
             ctx: int | None, threads: int | None, progress: Progress | None) -> dict[str, dict[str, list[str]]]:
    """Each model's answers to the questions of its battles ({model: {question key: turns}}), one
    model loaded at a time, cached by (ModelChoice.key, max_tokens) and the question's text. A model
    that fails is noted in `report.failed`; what it answered before is still used."""
    from . import judge as J

    answers: dict[str, dict[str, list[str]]] = {}
    for f in found:
        need = sorted({q for q, a, b in todo if f.name in (a, b)})
        if not need:
            continue
        asked = [J.Question(_text_key(*qs[i].turns), qs[i].turns, qs[i].references, qs[i].line) for i in need]
        cache = paths.cache_dir() / "arena" / f"{_text_key(f.key, str(max_tokens))}.jsonl"
        before = _cached_answers(cache).keys()
        report.cached += sum(q.id in before for q in asked)
        step = [0]

        def tick(step=step, name=f.name, total=len(asked)) -> None:
            step[0] += 1
            if progress:
                progress(f"{name} answers", step[0], total)

        if progress:
            progress(f"{f.name} answers", 0, len(asked))
        try:
            with f.load(ctx=ctx, threads=threads) as m:
                answers[f.name] = J.generate_answers(m, asked, cache, max_tokens=max_tokens, progress=tick)
        except LlmdeskError as e:
            report.failed[f.name] = f"after {step[0]} of {len(asked)} answers: {e}"
            # the answers it gave before failing are in the cache: its battles on those are fought
            answers[f.name] = _cached_answers(cache)
        report.answered += sum(q.id in answers[f.name] and q.id not in before for q in asked)
    return answers
