"""`llmdesk synth`: training data made by a model (local through the Engine's batching, or remote).

Three ways to make rows, each written in the shapes `llmdesk tune` reads, each row with its
provenance (model, mode, seed, the prompt template's name and version, and where it came from):

- `instruct`: new instructions from seed tasks, self-instruct style (each request shows a few
  seed tasks drawn at random and asks for a new one), then an answer to each. Rows: `messages`.
- `docs`: a question and its answer grounded in one passage of your documents (files or a
  folder, chunked as `llmdesk docs` chunks them). Rows: `messages`, with the passage kept in
  `provenance.passage` (file, lines, text).
- `answers`: answers to prompts you have (`prompt` or `messages` rows), K candidates each. Rows:
  `prompt`/`completion` (K = 1) or `prompt` with `candidates` (K > 1: rank them into DPO pairs with
  a grader or judge, `rank_pairs`).

Every item i is generated with seed `seed * 1_000_003 + i`, so a run is a function of its settings.
Work goes to OUT.part as it is done (one JSON line per item, flushed); a killed run continues where
it stopped when run again with the same settings, and OUT is written (atomically) only at the end,
after the filters: empty and over-long rows, rows not in the asked language, exact and near
duplicates (MinHash over word 3-grams, Jaccard >= threshold; the first one seen is kept), and
optionally a judge's score below a threshold.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..atomic import atomic_path
from ..errors import LlmdeskError

TEMPLATE_VERSION = 1
SEED_STRIDE = 1_000_003

INSTRUCT_PROMPT = """Here are some tasks that people ask an assistant to do:

{examples}

Write one new task of the same kind, different from all of these. Write only the task itself, \
as the person would ask it, in one or two sentences."""

DOCS_PROMPT = """Read this passage from the document {source}:

\"\"\"
{passage}
\"\"\"

Write one question that a reader could ask and that this passage answers, then the answer, using only \
the passage. Reply exactly in this form:
Question: <the question>
Answer: <the answer>"""


@dataclass
class SynthSettings:
    mode: str
    model: str
    n: int
    seed: int = 0
    temperature: float = 0.8
    max_tokens: int = 256
    k: int = 1  # answers: candidates per prompt
    per_request: int = 4  # instruct: seed tasks shown per request
    batch: int = 8  # requests in flight at once
    source: str = ""  # the seeds / prompts / documents it was made from (path), for provenance
    source_sha256: str = ""

    def key(self) -> str:
        d = asdict(self)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Filters:
    min_chars: int = 1
    max_chars: int = 8000
    language: str | None = None  # "en": the text must read as English (stop-word share)
    near_duplicate: float = 0.8  # Jaccard similarity of word 3-gram MinHashes; 1.0: exact only
    judge_threshold: float | None = None


@dataclass
class SynthReport:
    out: Path
    generated: int
    kept: int
    removed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: int = 0

    @property
    def rows_per_second(self) -> float:
        return (self.generated - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0


# -- inputs ----------------------------------------------------------------------------------------

def _text_of(p: Path) -> str:
    if not p.is_file():
        raise LlmdeskError(f"{p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmdeskError(f"{p}: not UTF-8 text") from None


def read_rows(path: str | os.PathLike) -> list[dict]:
    """JSONL (or a JSON list) of objects, or a plain text file with one item per line."""
    p = Path(path).expanduser()
    text = _text_of(p)
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise LlmdeskError(f"{p}: not JSON ({e})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise LlmdeskError(f"{p}: a JSON file of rows is a list of objects")
        return data
    if p.suffix == ".jsonl":
        return [r for _where, r in jsonl_rows(p, text)]
    return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]


def jsonl_rows(path: str | os.PathLike, text: str | None = None) -> list[tuple[str, dict]]:
    """The objects of a JSON Lines file, each with its "file:line" (blank lines skipped; a line that
    is not a JSON object is one error naming it)."""
    p = Path(path).expanduser()
    if text is None:
        text = _text_of(p)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise LlmdeskError(f"{p}:{i}: not JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise LlmdeskError(f"{p}:{i}: a row is a JSON object")
        rows.append((f"{p}:{i}", r))
    return rows


def _prompt_of(row: dict, where: str) -> list[dict]:
    """The conversation a row asks: `messages` (up to its last user turn), or `prompt`,
    `instruction` (+ `input`), `question` or `task` as one user turn."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        msgs = list(row["messages"])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        if msgs:
            return msgs
    for key in ("prompt", "instruction", "question", "task"):
        v = row.get(key)
        if isinstance(v, str) and v.strip():
            if key == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
                v = f"{v}\n\n{row['input']}"
            return [{"role": "user", "content": v}]
    raise LlmdeskError(f"{where}: no 'prompt', 'messages', 'instruction', 'question' or 'task' "
                       f"(columns: {', '.join(map(repr, row)) or 'none'})")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# -- the jobs --------------------------------------------------------------------------------------

@dataclass
class Job:
    index: int
    stages: list[Callable[[list[str]], list[dict] | None]]  # each turns the answers so far into the next request
    meta: dict


def _seed(settings: SynthSettings, index: int) -> int:
    return (settings.seed * SEED_STRIDE + index) % (2 ** 31)


def instruct_jobs(seed_tasks: list[str], settings: SynthSettings) -> Iterator[Job]:
    if len(seed_tasks) < 2:
        raise LlmdeskError("synth instruct needs at least 2 seed tasks (one per line, or rows with 'prompt')")
    for i in range(settings.n):
        rng = random.Random(_seed(settings, i))
        shown = rng.sample(range(len(seed_tasks)), min(settings.per_request, len(seed_tasks)))
        examples = "\n".join(f"{j + 1}. {seed_tasks[s]}" for j, s in enumerate(shown))
        first = [{"role": "user", "content": INSTRUCT_PROMPT.format(examples=examples)}]
        yield Job(i, [lambda _prev, first=first: first,
                      lambda prev: [{"role": "user", "content": _clean_task(prev[0])}] if _clean_task(prev[0]) else None],
                  {"seed_tasks": shown})


def _clean_task(text: str) -> str:
    t = text.strip().strip('"').strip()
    t = re.sub(r"^(\d+[.)]|[-*]|task:)\s*", "", t, flags=re.I).strip()
    return t.split("\n\n")[0].strip()


def answer_jobs(rows: list[dict], settings: SynthSettings, where: str) -> Iterator[Job]:
    convs = [_prompt_of(r, f"{where}: row {i + 1}") for i, r in enumerate(rows)]
    count = min(settings.n, len(convs)) if settings.n else len(convs)
    for i in range(count):
        conv = convs[i]
        yield Job(i, [lambda _prev, conv=conv: conv] * settings.k, {"row": i + 1})


def passages(path: str | os.PathLike, *, budget: int = 256) -> list[dict]:
    """The passages of a file or folder, chunked as `llmdesk docs` chunks (words as tokens), or
    of a collection `llmdesk docs add` built (its own chunks)."""
    from ..rag.chunk import chunk
    from ..rag.extract import extract, supported

    p = Path(path).expanduser()
    if not p.exists():
        from ..rag.ingest import list_collections
        from ..rag.search import passages as collection_passages

        if str(path) not in {col.name for col in list_collections()}:
            raise LlmdeskError(f"{p}: no such file, folder or collection ('llmdesk docs list' shows the collections)")
        out = [{"path": h.path, "headings": h.headings, "page": h.page, "lines": [h.line_start, h.line_end],
                "text": h.text} for h in collection_passages(str(path)) if len(h.text.split()) >= 20]
        if not out:
            raise LlmdeskError(f"collection {path}: no passages of at least 20 words")
        return out
    files = sorted(x for x in p.rglob("*") if x.is_file() and supported(x)) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            doc = extract(f)
        except LlmdeskError:
            continue  # unreadable files are skipped here as `docs add` skips them
        for c in chunk(doc, count_tokens=lambda s: len(s.split()), budget=budget):
            if len(c.text.split()) >= 20:  # a heading alone has no question in it
                out.append({"path": str(f), "headings": c.headings, "page": c.page, "lines": [c.line_start, c.line_end],
                            "text": c.text})
    if not out:
        raise LlmdeskError(f"{p}: no passages of at least 20 words in files llmdesk can read")
    return out


def docs_jobs(items: list[dict], settings: SynthSettings) -> Iterator[Job]:
    order = list(range(len(items)))
    random.Random(settings.seed).shuffle(order)
    for i in range(settings.n):
        it = items[order[i % len(order)]]
        source = Path(it["path"]).name + (f" ({' > '.join(it['headings'])})" if it["headings"] else "")
        conv = [{"role": "user", "content": DOCS_PROMPT.format(source=source, passage=it["text"])}]
        yield Job(i, [lambda _prev, conv=conv: conv], {"passage": it})


QA = re.compile(r"question:\s*(?P<q>.+?)\s*answer:\s*(?P<a>.+)", re.I | re.S)


def _row(settings: SynthSettings, job: Job, answers: list[str]) -> dict | None:
    prov = {"model": settings.model, "mode": settings.mode, "seed": _seed(settings, job.index),
            "template": f"{settings.mode}-v{TEMPLATE_VERSION}", "source": settings.source, "index": job.index}
    if settings.mode == "instruct":
        task, answer = _clean_task(answers[0]), answers[1].strip() if len(answers) > 1 else ""
        if not task or not answer:
            return None
        return {"messages": [{"role": "user", "content": task}, {"role": "assistant", "content": answer}],
                "provenance": {**prov, "seed_tasks": job.meta["seed_tasks"]}}
    if settings.mode == "docs":
        m = QA.search(answers[0])
        if not m:
            return None
        return {"messages": [{"role": "user", "content": m["q"].strip()}, {"role": "assistant", "content": m["a"].strip()}],
                "provenance": {**prov, "passage": job.meta["passage"]}}
    conv = job.stages[0]([])
    prompt = conv[-1]["content"] if len(conv) == 1 else conv
    outs = [a.strip() for a in answers]
    prov["row"] = job.meta["row"]
    if settings.k == 1:
        return {"prompt": prompt, "completion": outs[0], "provenance": prov} if outs[0] else None
    return {"prompt": prompt, "candidates": outs, "provenance": prov}


# -- running ---------------------------------------------------------------------------------------

def _run_jobs(model, jobs: list[Job], settings: SynthSettings) -> list[list[str]]:
    """Every stage of a group of jobs, side by side on the Engine (respond_many)."""
    from ..runtime.conversation import respond_many

    answers: list[list[str]] = [[] for _ in jobs]
    alive = list(range(len(jobs)))
    for stage in range(max(len(j.stages) for j in jobs)):
        convs, who = [], []
        for w in alive:
            if stage < len(jobs[w].stages):
                conv = jobs[w].stages[stage](answers[w])
                if conv is None:
                    continue
                convs.append(conv)
                who.append(w)
        if not convs:
            break
        seeds = [_seed(settings, jobs[w].index) + stage * 7919 for w in who]
        texts = respond_many(model, convs, seeds=seeds, temperature=settings.temperature,
                             max_tokens=settings.max_tokens)
        for w, t in zip(who, texts):
            answers[w].append(t)
        alive = who
    return answers


def _read_part(part: Path, key: str) -> dict[int, dict | None]:
    """The items a previous run of the same settings finished (a torn last line is dropped)."""
    done: dict[int, dict | None] = {}
    if not part.exists():
        return done
    lines = part.read_text(encoding="utf-8").splitlines()
    if not lines:
        return done
    try:
        head = json.loads(lines[0])
    except ValueError:
        head = {}
    if head.get("settings_key") != key:
        raise LlmdeskError(f"{part}: holds a run with other settings (model, seed, n, source ...); run with the "
                           "same settings to continue it, or delete it to start over")
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            break  # the line being written when the run stopped
        done[rec["index"]] = rec["row"]
    return done


def generate(model, jobs: Iterator[Job], settings: SynthSettings, out: str | os.PathLike, *,
             filters: Filters | None = None, judge=None,
             on_progress: Callable[[int, int, float], None] | None = None) -> SynthReport:
    """Run the jobs on `model` into OUT (JSONL), resumable through OUT.part (see the module)."""
    out = Path(out).expanduser()
    if out.suffix != ".jsonl":
        raise LlmdeskError(f"{out}: the output is JSON Lines; name it .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    key = settings.key()
    done = _read_part(part, key)
    jobs = list(jobs)
    resumed = len(done)
    t0 = time.perf_counter()
    # the part file as far as it is whole (a line torn by a kill is dropped), then appended to
    head = json.dumps({"settings_key": key, "settings": asdict(settings)}) + "\n"
    with atomic_path(part) as tmp:
        tmp.write_text(head + "".join(json.dumps({"index": i, "row": r}, ensure_ascii=False) + "\n"
                                      for i, r in done.items()), encoding="utf-8")
    with open(part, "a", encoding="utf-8") as f:
        todo = [j for j in jobs if j.index not in done]
        for i in range(0, len(todo), settings.batch):
            group = todo[i: i + settings.batch]
            for job, answers in zip(group, _run_jobs(model, group, settings)):
                row = _row(settings, job, answers)
                done[job.index] = row
                f.write(json.dumps({"index": job.index, "row": row}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if on_progress:
                on_progress(len(done), len(jobs), time.perf_counter() - t0)
    rows = [done[j.index] for j in jobs]
    kept, removed = apply_filters([r for r in rows if r is not None], filters or Filters(), judge=judge)
    failed = sum(r is None for r in rows)
    removed = {**({"failed to parse": failed} if failed else {}), **removed}
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    part.unlink()
    return SynthReport(out=out, generated=len(rows), kept=len(kept), removed=removed,
                       seconds=time.perf_counter() - t0, resumed_from=resumed)


# -- filters ---------------------------------------------------------------------------------------

def row_text(row: dict) -> str:
    if "messages" in row:
        return "\n".join(m.get("content") or "" for m in row["messages"])
    if "candidates" in row:
        return f"{row['prompt']}\n" + "\n".join(row["candidates"])
    p = row.get("prompt")
    return f"{p if isinstance(p, str) else json.dumps(p)}\n{row.get('completion', '')}"


_EN = set("the a an and or of to in is are was were be it that this for on with as by at from not but "
          "you your i we they he she his her its their what which how when where why can will do does".split())


def reads_as(text: str, language: str) -> bool:
    """A cheap language rule: for English, at least 15% of the words are common English words."""
    if language != "en":
        raise LlmdeskError(f"language {language!r}: only 'en' is known to the filter")
    words = re.findall(r"[a-zA-Z']+", text.lower())
    if not words:
        return False
    return sum(w in _EN for w in words) / len(words) >= 0.15 and len(words) / max(1, len(text.split())) > 0.5


def shingles(text: str, n: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def near_duplicates(texts: list[str], threshold: float = 0.8, *, num_perm: int = 128, seed: int = 1) -> set[int]:
    """Indexes of texts that repeat an earlier one: the same after normalising, or (below 1.0) word
    3-gram sets with a Jaccard similarity at or above `threshold`. MinHash LSH, tuned below the
    threshold so that it misses few, proposes the candidates; each candidate's similarity is then
    computed exactly before the text is dropped."""
    seen_exact: set[str] = set()
    drop: set[int] = set()
    lsh = None
    if threshold < 1.0:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=max(0.3, threshold - 0.25), num_perm=num_perm)
        sets: dict[int, set[str]] = {}
    for i, t in enumerate(texts):
        norm = re.sub(r"\s+", " ", t).strip().casefold()
        if norm in seen_exact:
            drop.add(i)
            continue
        seen_exact.add(norm)
        if lsh is None:
            continue
        sh = shingles(norm)
        m = MinHash(num_perm=num_perm, seed=seed)
        for x in sh:
            m.update(x.encode("utf-8"))
        if any(len(sh & sets[j]) / len(sh | sets[j]) >= threshold for j in lsh.query(m)):
            drop.add(i)
            continue
        sets[i] = sh
        lsh.insert(i, m)
    return drop


def apply_filters(rows: list[dict], f: Filters, *, judge=None) -> tuple[list[dict], dict[str, int]]:
    removed = {"too short": 0, "too long": 0, "language": 0, "near duplicate": 0, "judge": 0}
    keep = []
    for r in rows:
        t = row_text(r)
        if len(t.strip()) < f.min_chars:
            removed["too short"] += 1
        elif len(t) > f.max_chars:
            removed["too long"] += 1
        elif f.language and not reads_as(t, f.language):
            removed["language"] += 1
        else:
            keep.append(r)
    drop = near_duplicates([row_text(r) for r in keep], f.near_duplicate)
    removed["near duplicate"] = len(drop)
    keep = [r for i, r in enumerate(keep) if i not in drop]
    if f.judge_threshold is not None:
        if judge is None:
            raise LlmdeskError("a judge threshold needs a judge model (--judge MODEL)")
        from ..eval.judge import grade

        scored = []
        for r in keep:
            q = r["messages"][0]["content"] if "messages" in r else str(r.get("prompt"))
            a = r["messages"][-1]["content"] if "messages" in r else r.get("completion", "")
            g = grade(judge, q, a)
            r["provenance"]["judge_score"] = g.score
            if g.score is not None and g.score >= f.judge_threshold:
                scored.append(r)
            else:
                removed["judge"] += 1
        keep = scored
    return keep, {k: v for k, v in removed.items() if v}


# -- preference pairs ------------------------------------------------------------------------------

def rank_pairs(rows: list[dict], graders, weights) -> tuple[list[dict], int]:
    """DPO rows (prompt, chosen, rejected) from `answers` rows with candidates: the best and the
    worst candidate by the graders' weighted score; rows whose best and worst tie are skipped
    (returned count)."""
    from ..eval.graders import combined

    pairs, ties = [], 0
    for r in rows:
        cands = r.get("candidates")
        if not isinstance(cands, list) or len(cands) < 2:
            raise LlmdeskError("ranking needs rows with 'candidates' (synth answers --k 2 or more)")
        cols = {k: [v] * len(cands) for k, v in r.items() if k not in ("candidates", "provenance", "prompt")}
        scores, _ = combined(graders, weights, [r["prompt"]] * len(cands), cands, **cols)
        best = max(range(len(cands)), key=lambda i: scores[i])
        worst = min(range(len(cands)), key=lambda i: scores[i])
        if scores[best] == scores[worst] or cands[best].strip() == cands[worst].strip():
            ties += 1
            continue
        pairs.append({"prompt": r["prompt"], "chosen": cands[best], "rejected": cands[worst],
                      "provenance": {**r.get("provenance", {}), "scores": [scores[best], scores[worst]]}})
    return pairs, ties
