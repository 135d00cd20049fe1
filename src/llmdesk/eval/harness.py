"""Benchmark tasks scored the way lm-evaluation-harness scores them (`llmdesk eval run`).

    model = llmdesk.load("model.gguf", slots=4, kv_unified=True)
    result = evaluate(model, load_task("mmlu"), limit=200, shots=5)
    result.metrics["acc"]          # Metric(value=0.41, stderr=0.035)

Multiple choice: each choice's log-likelihood is the summed log-probability of its continuation
tokens after the context (`Model.score`, which splits text pairs as lm-eval's HFLM does). `acc`
takes the argmax of the log-likelihoods, `acc_norm` the argmax of log-likelihood / the choice's
length in characters without the target delimiter (lm-eval's `process_results`: `len(choice)`
over `doc_to_choice`), and `mc2` is the probability mass of the true choices, normalised over
all (lm-eval's truthfulqa `process_results_mc2`). Generation: greedy completion of the context,
stopped at the task's `until` strings or `max_tokens`, then `task.extract(output) == target`.
Each metric's standard error is lm-eval's: the sample standard deviation over items / sqrt(n).

Batched: the pairs of many items go to the Engine in one job (its slots share each question's
context between the choices and keep the few-shot prefix), and the next job is queued before the
last one ends, so the slots never drain between them. Generation keeps one stream per slot.

Resumable: each item's result goes into the `eval_items` table as soon as its chunk is done (one
transaction per chunk), under a run key that hashes what changes the scores: the model's sha256
(a remote model's name), the task's sha256, the number of shots and the seed (which draws the
few-shot examples: not with 0 shots). The limit is not in it, so a larger limit reuses the
first items. A rerun after a crash, Ctrl-C or a failing
endpoint scores only the items not stored yet; `fresh=True` forgets them first.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LlmdeskError

RUN_KEY_VERSION = 1  # bump when a per-item result would be computed differently
CHUNK_PAIRS = 64  # score pairs per Engine job: a chunk of items is stored in one transaction
IN_FLIGHT = 4  # score jobs queued at once, so the slots are refilled while a chunk is stored
SHARED_CHOICE_TOKENS = 4  # choices differing in their last token, at most this long, are one request
REMOTE_STREAMS = 4  # generations in flight against a remote endpoint

Progress = Callable[[int, int], None]  # (items done, items in all)


@dataclass
class Metric:
    value: float
    stderr: float | None  # None with fewer than two items

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr}


@dataclass
class TaskResult:
    """One model on one task: the metrics, and each item's result by its index."""

    task: str
    model: str
    model_sha256: str | None  # None for a remote model
    task_sha256: str
    kind: str  # "multiple_choice" | "generate"
    metrics: dict[str, Metric]
    n: int
    shots: int | None
    seed: int
    limit: int | None
    run_key: str
    items: dict[int, dict[str, Any]] = field(repr=False, default_factory=dict)
    resumed: int = 0  # items taken from an earlier run
    seconds: float = 0.0  # time spent on this run's new items
    stats: dict[str, int] = field(default_factory=dict)  # pairs, tokens computed and reused, ...
    chat: bool = False  # the context was asked as a user message through the model's chat template

    @property
    def items_per_second(self) -> float:
        new = self.n - self.resumed
        return new / self.seconds if self.seconds > 0 and new > 0 else 0.0

    def settings(self) -> dict[str, Any]:
        """What the results store keeps beside the metrics (and `eval compare` matches on)."""
        return {"task": self.task, "task_sha256": self.task_sha256, "shots": self.shots, "seed": self.seed,
                "limit": self.limit, "run_key": self.run_key, "items": item_ranges(self.items),
                **({"chat": True} if self.chat else {})}

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "model_sha256": self.model_sha256,
                "task_sha256": self.task_sha256, "kind": self.kind, "n": self.n,
                "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
                "shots": self.shots, "seed": self.seed, "limit": self.limit, "resumed": self.resumed,
                "seconds": round(self.seconds, 3), "items_per_second": round(self.items_per_second, 3),
                "stats": self.stats, "chat": self.chat}


# ---------------------------------------------------------------------------------------------
# the metrics, as lm-evaluation-harness defines them


def choice_length(choice: str, delimiter: str) -> int:
    """The length acc_norm divides by: lm-eval's `len(choice)` over `doc_to_choice`, which holds
    the choice without the target delimiter that the scored continuation starts with."""
    if delimiter and choice.startswith(delimiter):
        choice = choice[len(delimiter):]
    return max(len(choice), 1)


def multiple_choice_result(item, lls: Sequence[float], greedy: Sequence[bool], delimiter: str = " ") -> dict:
    """One item's result from its choices' log-likelihoods (lm-eval's process_results)."""
    ll = np.asarray(lls, dtype=np.float64)
    r: dict[str, Any] = {"ll": [float(x) for x in ll], "greedy": [bool(g) for g in greedy]}
    if item.gold is not None:
        lengths = np.array([choice_length(c, delimiter) for c in item.choices], dtype=np.float64)
        r["acc"] = float(int(np.argmax(ll)) == item.gold)  # np.argmax takes the first of ties, as lm-eval
        r["acc_norm"] = float(int(np.argmax(ll / lengths)) == item.gold)
    if item.labels is not None:
        # truthfulqa's process_results_mc2: probabilities normalised over the choices, the true ones' mass
        p = np.exp(ll - ll.max())  # (the shift cancels in the normalisation and avoids underflow)
        r["mc2"] = float(p[np.asarray(item.labels) == 1].sum() / p.sum())
    return r


def aggregate(values: Sequence[float]) -> Metric:
    """The mean and lm-eval's standard error: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n == 0:
        return Metric(float("nan"), None)
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return Metric(float(x.mean()), se)


# ---------------------------------------------------------------------------------------------
# the run key and the stored items


def run_key(model_id: str, task_sha256: str, *, shots: int | None, seed: int | None, chat: bool = False) -> str:
    """What the per-item results of a run are stored under: everything that changes a score."""
    fields = {"v": RUN_KEY_VERSION, "model": model_id, "task": task_sha256, "shots": shots, "seed": seed}
    if chat:  # (absent when off: the keys of earlier runs stay what they were)
        fields["chat"] = True
    key = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def stored_items(conn: sqlite3.Connection, key: str) -> dict[int, dict]:
    return {int(r[0]): json.loads(r[1]) for r in conn.execute("SELECT item, result FROM eval_items WHERE run_key = ?", (key,))}


def _store(conn: sqlite3.Connection, key: str, rows: list[tuple[int, dict]]) -> None:
    """One chunk's results, in one transaction: a chunk is stored whole or not at all."""
    from ..store.db import now, transaction

    if not rows:
        return
    t = now()
    with transaction(conn):
        conn.executemany("INSERT OR REPLACE INTO eval_items (run_key, item, time, result) VALUES (?, ?, ?, ?)",
                         [(key, i, t, json.dumps(r)) for i, r in rows])


def item_ranges(indices) -> list[list[int]]:
    """Item indices as [first, last] ranges (a run's items are usually one or a few ranges)."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def expand_ranges(ranges) -> list[int]:
    return [i for a, b in ranges for i in range(a, b + 1)]


# ---------------------------------------------------------------------------------------------
# which model


@dataclass
class Identity:
    """Who a result belongs to: the name shown, and the file's sha256 (None for a remote model,
    which is known by its name)."""

    name: str
    sha256: str | None

    @property
    def key(self) -> str:
        return self.sha256 or self.name


def identify(ref: str, *, say: Callable[[str], None] | None = None):
    """(Identity, eval.common.ModelChoice) of a model reference, without loading it: a local
    reference is resolved to its file (an HF checkpoint folder converted first, once) and hashed,
    with the LoRA adapters of `BASE+ADAPTER` (`eval.common.resolve_choice`); `openai:...` is
    known by its name."""
    from .common import resolve_choice

    choice = resolve_choice(ref, say=say)
    return Identity(choice.name, choice.sha256), choice


def open_model(ref: str, *, slots: int = 4, ctx: int | None = None, threads: int | None = None,
               found=None, say: Callable[[str], None] | None = None):
    """Load a model for evaluation: (the model, its Identity). A local model gets `slots`
    sequences sharing one KV cache (kv_unified: the choices of a question share their context's
    cells instead of copying them). `found`: what `identify(ref)` gave, if it was asked before."""
    ident, choice = found if found is not None else identify(ref, say=say)
    if choice.is_remote:
        model = choice.load()
        return model, Identity(model.name, None)  # (openai:NAME learns its model id when loaded)
    return choice.load(slots=slots, ctx=ctx, threads=threads, kv_unified=True), ident


# ---------------------------------------------------------------------------------------------
# evaluating


def evaluate(model, task, *, limit: int | None = None, shots: int | None = None, seed: int = 1234,
             identity: Identity | None = None, fresh: bool = False, progress: Progress | None = None,
             say: Callable[[str], None] | None = None, conn: sqlite3.Connection | None = None,
             chat: bool = False) -> TaskResult:
    """Score `model` (a runtime Model or RemoteModel) on `task` (eval.tasks.Task); see the module.

    `chat` (generate tasks): each item's context is asked as one user message through the model's
    chat template (lm-eval's --apply_chat_template), as a chat fine-tune is used.

    `identity` names the model in the run key and the results (default: the sha256 of a local
    model's file, a remote model's name). `progress(done, total)` is called after each stored
    chunk; an exception from it stops the run with what was computed kept. `say` hears one-line
    notes ("resuming: ...")."""
    from ..store.db import using

    if limit is not None and limit < 1:
        raise LlmdeskError(f"--limit must be at least 1, got {limit}")
    if shots is not None and shots < 0:
        raise LlmdeskError(f"--shots must be at least 0, got {shots}")
    if chat and task.kind != "generate":
        raise LlmdeskError(f"--chat asks generate tasks through the chat template; '{task.name}' is "
                           f"{task.kind}, scored on the raw text (as lm-eval scores it)")
    if identity is None:
        identity = _identity_of(model)
    if shots is None:  # the task's default, by number: the run key and the results say how many
        shots = getattr(task, "shots", None)
    items = task.items(limit=limit, shots=shots, seed=seed)
    if not items:
        raise LlmdeskError(f"task '{task.name}' has no items to evaluate")
    # the seed draws the few-shot examples: without any, it changes nothing
    key = run_key(identity.key, task.sha256, shots=shots, seed=seed if shots != 0 else None, chat=chat)
    with using(conn) as db:
        if fresh:
            from ..store.db import transaction

            with transaction(db):
                db.execute("DELETE FROM eval_items WHERE run_key = ?", (key,))
        wanted = {it.index for it in items}
        done = {i: r for i, r in stored_items(db, key).items() if i in wanted}
        todo = [it for it in items if it.index not in done]
        if done and say:
            say(f"resuming: {len(done)} of {len(items)} items of {task.name} already scored")
        stats: dict[str, int] = {}
        total, n_done = len(items), len(done)
        if progress:
            progress(n_done, total)
        t0 = time.perf_counter()
        if todo:
            if task.kind == "multiple_choice":
                chunks = _score_multiple_choice(model, task, todo, stats)
            elif task.kind == "generate":
                chunks = _generate(model, task, todo, stats, chat=chat)
            else:
                raise LlmdeskError(f"task '{task.name}' is of kind '{task.kind}'; llmdesk scores "
                                   "multiple_choice and generate tasks")
            try:
                for rows in chunks:
                    _store(db, key, rows)
                    done.update(rows)
                    n_done += len(rows)
                    if progress:
                        progress(n_done, total)
            except LlmdeskError as e:
                if n_done == 0:
                    raise
                raise LlmdeskError(f"{e} ({n_done} of {total} items of {task.name} are stored: run it again "
                                   "to resume)") from None
            finally:
                chunks.close()  # cancels what is still in flight
        seconds = time.perf_counter() - t0
    results = {it.index: done[it.index] for it in items}
    metrics = {m: aggregate([r[m] for r in results.values()]) for m in task.metrics}
    return TaskResult(task=task.name, model=identity.name, model_sha256=identity.sha256, task_sha256=task.sha256,
                      kind=task.kind, metrics=metrics, n=len(items), shots=shots, seed=seed, limit=limit,
                      run_key=key, items=results, resumed=len(items) - len(todo), seconds=seconds, stats=stats,
                      chat=chat)


def record(result: TaskResult, *, task_ref: str | None = None, conn: sqlite3.Connection | None = None) -> int:
    """Store a finished run in the results store (kind "eval"; `llmdesk results` lists it).
    `task_ref`: the task as the user named it (a spec's path), which `eval compare` also takes."""
    from ..store import results

    metrics: dict[str, Any] = {}
    for k, m in result.metrics.items():
        metrics[k] = m.value
        metrics[f"{k}_stderr"] = m.stderr
    metrics["n"] = result.n
    metrics["items_per_second"] = round(result.items_per_second, 3)
    settings = result.settings()
    if task_ref is not None and task_ref != result.task:
        settings["task_ref"] = task_ref
    return results.record("eval", model=result.model, metrics=metrics, settings=settings,
                          model_sha256=result.model_sha256, data_sha256=result.task_sha256, conn=conn)


def _identity_of(model) -> Identity:
    path = getattr(model, "path", None)
    if path is None:
        return Identity(model.name, None)
    from ..store import catalog

    return Identity(model.name, catalog.sha256_file(path))


def _log_softmax(logits) -> np.ndarray:
    """Natural-log probabilities of one position's logits, in float64 (as the Engine scores)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _chunks(items: list, size: Callable[[Any], int], budget: int) -> Iterator[list]:
    """Consecutive items, each run at most `budget` big (at least one item)."""
    chunk, used = [], 0
    for it in items:
        if chunk and used + size(it) > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(it)
        used += size(it)
    if chunk:
        yield chunk


def _score_multiple_choice(model, task, items: list, stats: dict) -> Iterator[list[tuple[int, dict]]]:
    """Yield each chunk's (index, result) rows, in order. A local model's chunks are queued on
    its Engine IN_FLIGHT at a time; any other model with `score` is asked chunk by chunk."""
    delimiter = task.target_delimiter
    for it in items:
        if not it.choices:
            raise LlmdeskError(f"task '{task.name}' item {it.index} has no choices to score")
    chunks = _chunks(items, lambda it: len(it.choices), CHUNK_PAIRS)

    def rows(chunk, results, plan=None) -> list[tuple[int, dict]]:
        """`plan[i]`: the choice tokens of item i when its choices were scored as one request
        (see submit), else None: one result per choice."""
        out, k = [], 0
        for i, it in enumerate(chunk):
            tokens = plan[i] if plan else None
            if tokens is not None:  # one request: the choices' last tokens from its last logits
                r = results[k]
                k += 1
                lp = _log_softmax(r.logits[-1])
                head, head_greedy = float(np.sum(r.logprobs[:-1])), all(r.greedy[:-1])
                lls = [head + float(lp[t]) for t in tokens]
                greedy = [head_greedy and int(np.argmax(lp)) == t for t in tokens]
                rs = [r]
            else:
                rs = results[k : k + len(it.choices)]
                k += len(it.choices)
                lls, greedy = [r.logprob for r in rs], [r.is_greedy for r in rs]
            out.append((it.index, multiple_choice_result(it, lls, greedy, delimiter)))
            stats["pairs"] = stats.get("pairs", 0) + len(it.choices)
            stats["tokens_scored"] = stats.get("tokens_scored", 0) + sum(r.n_tokens for r in rs)
            stats["context_tokens_reused"] = stats.get("context_tokens_reused", 0) + sum(getattr(r, "n_cached", 0) for r in rs)
        return out

    engine = getattr(model, "engine", None)
    if engine is None or not hasattr(model, "score_tokens"):
        if not callable(getattr(model, "score", None)):
            raise LlmdeskError(f"{model.name} cannot score continuations (its API gives no log-probabilities "
                               f"of given text here), which multiple-choice task '{task.name}' needs; "
                               "evaluate a local model, or a generate task")
        for chunk in chunks:
            yield rows(chunk, model.score([(it.context, c) for it in chunk for c in it.choices]))
        return

    from ..runtime.engine import ScoreRequest

    def submit(chunk):
        """Queue a chunk's requests. An item whose choices differ only in their last token after
        the same context (MMLU's " A" .. " D") is one request: the logits before that token give
        every choice's log-probability (lm-eval's logits cache does the same for one-token
        choices), so the item takes one slot, not one per choice, and more items share each
        decode."""
        reqs, plan = [], []
        for it in chunk:
            pairs = []
            for c in it.choices:
                ctx, cont = model.score_tokens(it.context, c)
                if not cont:
                    raise LlmdeskError(f"task '{task.name}' item {it.index}: choice {c!r} is empty once split "
                                       "into tokens; every choice must hold some text")
                if len(ctx) + len(cont) - 1 > engine.n_ctx:
                    raise LlmdeskError(
                        f"task '{task.name}' item {it.index} needs {len(ctx) + len(cont) - 1} tokens but the "
                        f"model's context holds {engine.n_ctx}; use fewer --shots or a larger --ctx")
                pairs.append((ctx, cont))
            ctx0, cont0 = pairs[0]
            # (a short shared part only: the request keeps a row of logits per continuation token)
            if 1 < len(pairs) and len(cont0) <= SHARED_CHOICE_TOKENS and all(
                    ctx == ctx0 and cont[:-1] == cont0[:-1] and len(cont) == len(cont0) for ctx, cont in pairs):
                plan.append([cont[-1] for _, cont in pairs])
                reqs.append(ScoreRequest(pairs[0][0], pairs[0][1], logits=True))
                stats["context_tokens"] = stats.get("context_tokens", 0) + len(pairs[0][0])
            else:
                plan.append(None)
                reqs.extend(ScoreRequest(ctx, cont) for ctx, cont in pairs)
                stats["context_tokens"] = stats.get("context_tokens", 0) + sum(len(ctx) for ctx, _ in pairs)
        return chunk, engine.score(reqs), plan

    queued: list = []
    steps0, tokens0, seconds0 = engine.steps, engine.step_tokens, engine.step_seconds
    try:
        for chunk in chunks:
            queued.append(submit(chunk))
            if len(queued) < IN_FLIGHT:
                continue
            chunk0, job, plan = queued.pop(0)
            yield rows(chunk0, job.wait(), plan)
        while queued:
            chunk0, job, plan = queued.pop(0)
            yield rows(chunk0, job.wait(), plan)
    finally:
        for _, job, _ in queued:
            job.cancel()
        stats["decodes"] = stats.get("decodes", 0) + engine.steps - steps0
        # tokens computed (what the cache did not hold) and the milliseconds inside llama_decode
        stats["tokens_computed"] = stats.get("tokens_computed", 0) + engine.step_tokens - tokens0
        stats["decode_ms"] = stats.get("decode_ms", 0) + round(1000 * (engine.step_seconds - seconds0))


def _generate(model, task, items: list, stats: dict, *, chat: bool = False) -> Iterator[list[tuple[int, dict]]]:
    """Greedy completions, one stream per slot in flight (REMOTE_STREAMS for an endpoint);
    yields the finished items in chunks of about one per slot. On an error or an interrupt the
    items finished so far are yielded first, then the rest are cancelled."""
    engine = getattr(model, "engine", None)
    width = engine.n_slots if engine is not None else REMOTE_STREAMS
    until = list(task.until or []) or None

    def start(it):
        if chat:
            messages = [{"role": "user", "content": it.context}]
            if engine is not None and len(model.chat_tokens(messages)) >= engine.n_ctx:
                raise LlmdeskError(f"task '{task.name}' item {it.index}: the prompt does not fit the model's context "
                                   f"({engine.n_ctx}); use fewer --shots or a larger --ctx")
            return it, model.chat_start(messages, max_tokens=task.max_tokens, temperature=0.0, stop=until)
        prompt = it.context
        if engine is not None:
            prompt = model.tokenize(it.context)
            if len(prompt) >= engine.n_ctx:
                raise LlmdeskError(f"task '{task.name}' item {it.index} has a {len(prompt)}-token prompt but the "
                                   f"model's context holds {engine.n_ctx}; use fewer --shots or a larger --ctx")
        return it, model.start(prompt, max_tokens=task.max_tokens, temperature=0.0, stop=until)

    flying: list = []
    finished: list[tuple[int, dict]] = []
    try:
        for it in items:
            flying.append(start(it))
            while flying and (len(flying) >= width or it is items[-1]):
                finished.append(_finish(model, task, *flying.pop(0), stats))
                if len(finished) >= width or not flying:
                    out, finished = finished, []
                    yield out
    except (Exception, KeyboardInterrupt):
        if finished:  # what finished before the failure is kept: the caller stores it, then this re-raises
            out, finished = finished, []
            yield out
        raise
    finally:
        for _, s in flying:
            s.cancel()


def _finish(model, task, it, stream, stats: dict) -> tuple[int, dict]:
    c = model.finish(stream)
    stats["tokens_generated"] = stats.get("tokens_generated", 0) + int(c.completion_tokens or 0)
    answer = task.extract(c.text)
    return it.index, {"output": c.text, "answer": answer, "finish_reason": c.finish_reason,
                      "exact_match": float(answer == (it.target or "") and answer != "")}
