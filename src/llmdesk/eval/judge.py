"""A model as a judge (MT-Bench style): it grades answers 1-10, or compares two models' answers.

    g = grade(judge, "How do I list my models?", "Run llmdesk list.")        # Grade(score=8.0, ...)
    v = pairwise(judge, question, answer_a, answer_b)                         # PairVerdict(winner="a", ...)
    report = judge_run(judge, questions, answers, mode="pairwise", run="r1")  # a whole questions file

`judge` is what `llmdesk.load` returns: a local Model or a RemoteModel (openai:URL#MODEL).

How a verdict is asked for and read:
- Single-answer grading: the judge explains first, then ends with "Rating: [[N]]", N from 1 to 10.
- Pairwise: the judge is asked twice, answer A first then answer B first (position bias is the
  best-known judge bias, Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot
  Arena"); each reply ends with "[[A]]", "[[B]]" or "[[C]]" (a tie). Both orders must agree: a
  pair that flips with the order counts as a tie (`consistent=False`).
- Constrained (the default for a local judge): the reply is held to a JSON schema through the
  conversation layer's `response_format`, {"reasoning": ..., "rating": 1-10} or
  {"reasoning": ..., "verdict": "A"|"B"|"C"}, so even a tiny model gives a readable verdict. A
  remote judge is read from its text unless asked to constrain; then `response_format` is sent,
  and an endpoint that refuses it is read from text instead (said once through `say`).
- Reading: the last "[[...]]" in the text decides ("[[7]]", "[[7.5]]", "[[ 7/10 ]]", "[[a]]"),
  else a last "Rating: 7" / "Rating: 7/10". A rating outside 1-10, a last "[[...]]" that is no
  verdict, or a text holding all three of [[A]], [[B]] and [[C]] (the instructions echoed) is
  malformed: recorded with parsed=False and no score or winner, never guessed.

Every verdict is stored in the `judgments` table as soon as it is read, under a run name; a
rerun with the same name skips what is stored, so an endpoint that goes down costs nothing done.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import LlmdeskError

MAX_JUDGE_TOKENS = 1024  # the judge's reply; its reasoning is bounded by the schema when constrained
MAX_REASONING_CHARS = 800  # a constrained judge's "reasoning" field
MAX_ANSWER_TOKENS = 512  # an answering model's reply, per turn


# ---------------------------------------------------------------------------------------------
# what the judge returns


@dataclass
class Grade:
    score: float | None  # 1-10; None when no rating could be read
    reasoning: str
    raw: str  # the judge's text as given
    parsed: bool


@dataclass
class PairVerdict:
    winner: str | None  # "a" | "b" | "tie"; None when no verdict could be read (malformed)
    consistent: bool  # both orders agreed (an inconsistent pair counts as "tie")
    raw: list[str]  # the judge's texts: [order a-b, order b-a]
    parsed: bool
    reasoning: str
    verdicts: list[str | None] = field(default_factory=list)  # per order, in a/b terms of this pair


# ---------------------------------------------------------------------------------------------
# the prompts (our words; the [[rating]] / [[A]] conventions are MT-Bench's)

SYSTEM = ("You are a careful and impartial judge of answers written by AI assistants. You judge what an "
          "answer says, not how long it is or how confident it sounds.")

SINGLE = ("Judge the quality of the assistant's answer to the user's question below. Consider whether it is "
          "helpful, relevant, accurate, deep enough and detailed enough.{ref_note} Start with a short, "
          "objective explanation of your judgment.")

PAIR = ("Compare the answers two AI assistants gave to the user's question below and decide which answer is "
        "better. Consider which follows the user's instructions and answers the question better: helpfulness, "
        "relevance, accuracy, depth and detail.{ref_note} Do not let the order of the answers, their length or "
        "the assistants' names sway you. Start with a short, objective comparison of the two answers.")

REF_NOTE_SINGLE = (" A reference answer is given: compare the assistant's answer with it, and point out and "
                   "count mistakes.")
REF_NOTE_PAIR = (" A reference answer is given: compare both answers with it, and point out and count "
                 "mistakes.")

RATING_TEXT = ('After your explanation, give your rating on a line of its own, written exactly as '
               '"Rating: [[rating]]", where rating is a number from 1 (worst) to 10 (best), for example '
               '"Rating: [[6]]".')
RATING_JSON = ('Reply in JSON: "reasoning" holds your explanation, then "rating" a whole number from 1 (worst) '
               'to 10 (best).')
VERDICT_TEXT = ('After your comparison, give your verdict on a line of its own, written exactly as one of '
                'these: "[[A]]" when assistant A is better, "[[B]]" when assistant B is better, "[[C]]" for a tie.')
VERDICT_JSON = ('Reply in JSON: "reasoning" holds your comparison, then "verdict" is "A" when assistant A is '
                'better, "B" when assistant B is better, "C" for a tie.')


def _schema(field_name: str, values: list) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"judge_{field_name}", "strict": True, "schema": {
        "type": "object",
        "properties": {"reasoning": {"type": "string", "maxLength": MAX_REASONING_CHARS},
                       field_name: {"enum": values}},
        "required": ["reasoning", field_name], "additionalProperties": False}}}


RATING_FORMAT = _schema("rating", list(range(1, 11)))
VERDICT_FORMAT = _schema("verdict", ["A", "B", "C"])


def _block(title: str, text: str) -> str:
    return f"[{title}]\n{text.strip()}\n[End of {title}]"


def _conversation(history: list[tuple[str, str]], question: str, answer: str) -> str:
    """A multi-turn exchange as the judge reads it; only the last answer is judged."""
    lines = []
    for q, a in [*history, (question, answer)]:
        lines += [f"### User:\n{q.strip()}", f"### Assistant:\n{a.strip()}"]
    return "\n\n".join(lines)


def single_messages(question: str, answer: str, *, reference: str | None = None,
                    history: list[tuple[str, str]] | None = None, constrained: bool = False) -> list[dict]:
    """The conversation that asks for a grade. With `history` (earlier (question, answer) turns),
    the judge sees the whole exchange and grades the last answer."""
    task = SINGLE.format(ref_note=REF_NOTE_SINGLE if reference else "")
    parts = [task]
    if history:
        parts[0] += " Judge only the assistant's answer to the user's last question."
        parts.append(_block("Conversation", _conversation(history, question, answer)))
    else:
        parts += [_block("Question", question), _block("The Assistant's Answer", answer)]
    if reference:
        parts.insert(-1, _block("Reference Answer", reference))
    parts.append(RATING_JSON if constrained else RATING_TEXT)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def pair_messages(question: str, answer_a: str, answer_b: str, *, reference: str | None = None,
                  history_a: list[tuple[str, str]] | None = None, history_b: list[tuple[str, str]] | None = None,
                  constrained: bool = False) -> list[dict]:
    """The conversation that asks which of two answers is better (A as given first)."""
    task = PAIR.format(ref_note=REF_NOTE_PAIR if reference else "")
    parts = [task]
    if history_a or history_b:
        parts[0] += " Judge only the assistants' answers to the user's last question."
        parts += [_block("Conversation with Assistant A", _conversation(history_a or [], question, answer_a)),
                  _block("Conversation with Assistant B", _conversation(history_b or [], question, answer_b))]
    else:
        parts += [_block("Question", question), _block("Assistant A's Answer", answer_a),
                  _block("Assistant B's Answer", answer_b)]
    if reference:
        parts.insert(1, _block("Reference Answer", reference))
    parts.append(VERDICT_JSON if constrained else VERDICT_TEXT)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


# ---------------------------------------------------------------------------------------------
# reading verdicts

_BRACKETS = re.compile(r"\[\[\s*([^\[\]]{0,40}?)\s*\]\]")
_NUMBER = re.compile(r"^(?:(?:rating|score)\s*[:=]?\s*)?([+-]?\d+(?:\.\d+)?)\s*(?:(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?$",
                     re.IGNORECASE)
_RATING_LINE = re.compile(r"(?:rating|score)\W{0,6}?([+-]?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?",
                          re.IGNORECASE)
_LETTER = re.compile(r"^(?:(?:assistant|verdict)\s*[:=]?\s*)?([abc]|tie)$", re.IGNORECASE)


def _rating(number: str, scale: str | None) -> float | None:
    value = float(number)
    if scale and float(scale) != 10:
        return None  # "4/5": not our scale, not converted
    return value if math.isfinite(value) and 1 <= value <= 10 else None


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's text, or None (see the module's docstring)."""
    data = _json_reply(text)
    if data is not None and "rating" in data:
        v = data["rating"]
        if isinstance(v, str):
            m = _NUMBER.match(v.strip())
            return _rating(m.group(1), m.group(2)) if m else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v <= 10 else None
    found = _BRACKETS.findall(text)
    if found:
        m = _NUMBER.match(found[-1])
        return _rating(m.group(1), m.group(2)) if m else None
    lines = _RATING_LINE.findall(text)
    return _rating(*lines[-1]) if lines else None


def parse_verdict(text: str) -> str | None:
    """"A" | "B" | "C" (a tie) in a judge's text, or None (see the module's docstring)."""
    data = _json_reply(text)
    if data is not None and "verdict" in data:
        return _letter(data["verdict"]) if isinstance(data["verdict"], str) else None
    found = _BRACKETS.findall(text)
    if not found:
        return None
    if {"A", "B", "C"} <= {_letter(f) for f in found}:
        return None  # the instructions echoed: every verdict is there
    return _letter(found[-1])


def _letter(s: str) -> str | None:
    m = _LETTER.match(s.strip())
    if not m:
        return None
    v = m.group(1).upper()
    return "C" if v == "TIE" else v


def _json_reply(text: str) -> dict | None:
    s = text.strip()
    if not s.startswith("{"):
        return None
    try:
        # strict=False: raw newlines in a string (llama-cpp-python's schema converter lets control
        # characters into JSON strings) do not make a readable verdict unreadable
        data = json.loads(s, strict=False)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _reasoning(text: str) -> str:
    data = _json_reply(text)
    if data is not None and isinstance(data.get("reasoning"), str):
        return data["reasoning"].strip()
    return _BRACKETS.sub("", text).strip()


# ---------------------------------------------------------------------------------------------
# asking the judge

Say = Callable[[str], None]

# remote judges that refused response_format: read from text from then on
_NO_SCHEMA: "weakref.WeakSet[Any]" = weakref.WeakSet()


def is_remote(judge) -> bool:
    from ..runtime.remote import RemoteModel

    return isinstance(judge, RemoteModel)


def check_judge(judge) -> None:
    """A judge must be a loaded model (what llmdesk.load returns)."""
    from ..runtime.model import Model
    from ..runtime.remote import RemoteModel

    if not isinstance(judge, (Model, RemoteModel)):
        raise LlmdeskError(f"the judge must be a model loaded with llmdesk.load, not {type(judge).__name__}")


def _ask(judge, messages: list[dict], response_format: dict, *, constrained: bool, say: Say | None) -> str:
    """The judge's text, held to `response_format` when `constrained` (a remote judge that
    refuses it is asked again, and from then on, without)."""
    kw = dict(temperature=0, max_tokens=MAX_JUDGE_TOKENS)
    if constrained:
        try:
            return judge.respond(messages, response_format=response_format, **kw).text
        except LlmdeskError as e:
            if not is_remote(judge) or "refused the request" not in str(e):
                raise
            _NO_SCHEMA.add(judge)
            if say:
                say(f"{judge.name} refused response_format ({e}); reading its verdicts from text instead")
            messages = [*messages[:-1], {**messages[-1], "content": _text_instructions(messages[-1]["content"])}]
    return judge.respond(messages, **kw).text


def _text_instructions(content: str) -> str:
    return content.replace(RATING_JSON, RATING_TEXT).replace(VERDICT_JSON, VERDICT_TEXT)


def grade(judge, question: str, answer: str, *, reference: str | None = None,
          history: list[tuple[str, str]] | None = None, constrain: bool | None = None,
          say: Say | None = None) -> Grade:
    """The judge's 1-10 grade of `answer` (its reasoning first). Temperature 0."""
    constrained = _will_constrain(judge, constrain)
    messages = single_messages(question, answer, reference=reference, history=history, constrained=constrained)
    raw = _ask(judge, messages, RATING_FORMAT, constrained=constrained, say=say)
    score = parse_rating(raw)
    return Grade(score=score, reasoning=_reasoning(raw), raw=raw, parsed=score is not None)


def pairwise(judge, question: str, answer_a: str, answer_b: str, *, reference: str | None = None,
             history_a: list[tuple[str, str]] | None = None, history_b: list[tuple[str, str]] | None = None,
             constrain: bool | None = None, say: Say | None = None) -> PairVerdict:
    """Which answer the judge prefers, asked in both orders (A-B, then B-A). Temperature 0."""
    raws = []
    orders = ((answer_a, answer_b, history_a, history_b), (answer_b, answer_a, history_b, history_a))
    for first, second, h1, h2 in orders:
        constrained = _will_constrain(judge, constrain)  # (a refusal in the first order holds for the second)
        messages = pair_messages(question, first, second, reference=reference, history_a=h1, history_b=h2,
                                 constrained=constrained)
        raws.append(_ask(judge, messages, VERDICT_FORMAT, constrained=constrained, say=say))
    return combine(raws[0], raws[1])


def combine(raw_ab: str, raw_ba: str) -> PairVerdict:
    """The verdict of a pair from the judge's two texts: `raw_ab` with answer a shown first as
    "A", `raw_ba` with answer b shown first. Both readable and agreeing: that winner; both
    readable and disagreeing: a tie (inconsistent); either unreadable: no verdict."""
    verdicts: list[str | None] = []
    for raw, flip in ((raw_ab, False), (raw_ba, True)):
        letter = parse_verdict(raw)
        v = None if letter is None else {"A": "a", "B": "b", "C": "tie"}[letter]
        if flip and v in ("a", "b"):
            v = "b" if v == "a" else "a"
        verdicts.append(v)
    parsed = None not in verdicts
    consistent = parsed and verdicts[0] == verdicts[1]
    winner = (verdicts[0] if consistent else "tie") if parsed else None
    reasoning = f"(A-B order) {_reasoning(raw_ab)}\n\n(B-A order) {_reasoning(raw_ba)}"
    return PairVerdict(winner=winner, consistent=consistent, raw=[raw_ab, raw_ba], parsed=parsed, reasoning=reasoning,
                       verdicts=verdicts)


def _will_constrain(judge, constrain: bool | None) -> bool:
    """Whether to hold this judge's replies to a schema: `constrain`, or by default a local judge
    is and a remote one is not; never a remote one that refused it."""
    check_judge(judge)
    remote = is_remote(judge)
    want = (not remote) if constrain is None else constrain
    return want and not (remote and judge in _NO_SCHEMA)


# ---------------------------------------------------------------------------------------------
# questions and answers files


@dataclass
class Question:
    id: str
    turns: list[str]
    references: list[str | None]  # per turn
    line: int


def _jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmdeskError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise LlmdeskError(f"{what} {path} is a folder; give a JSONL file") from None
    except UnicodeDecodeError:
        raise LlmdeskError(f"{what} {path} is not UTF-8 text; give a JSONL file (one JSON object a line)") from None
    except OSError as e:
        raise LlmdeskError(f"cannot read {what} {path}: {e.strerror}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmdeskError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno}); each line must be one "
                               "JSON object") from None
        if not isinstance(row, dict):
            raise LlmdeskError(f"{path}:{n}: a line must be a JSON object, not {type(row).__name__}")
        yield n, row


def _texts(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise LlmdeskError(f"{where} must be a non-empty text or a list of non-empty texts")
    return value


def read_questions(path: str | Path, *, reference_column: str | None = None) -> list[Question]:
    """Questions from JSONL: MT-Bench's layout (`question_id`, `turns`, optional `reference`) or
    plain rows (`id`, `question`). `reference_column` names the column holding reference answers
    (default `reference`, where a row has it)."""
    path = Path(path)
    out: list[Question] = []
    seen: dict[str, int] = {}
    col = reference_column or "reference"
    any_reference = False
    for n, row in _jsonl(path, "the questions file"):
        qid = row.get("question_id", row.get("id", n))
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid).strip() == "":
            raise LlmdeskError(f"{path}:{n}: 'question_id' must be a text or a number")
        qid = str(qid)
        if qid in seen:
            raise LlmdeskError(f"{path}:{n}: question id {qid} is already used on line {seen[qid]}; ids must be unique")
        seen[qid] = n
        if "turns" in row:
            turns = _texts(row["turns"], f"{path}:{n}: 'turns'")
        elif "question" in row:
            turns = _texts(row["question"], f"{path}:{n}: 'question'")
        else:
            raise LlmdeskError(f"{path}:{n}: no question text: give 'turns' (a list of texts, MT-Bench's layout) "
                               "or 'question'")
        refs: list[str | None] = [None] * len(turns)
        if row.get(col) is not None:
            given = _texts(row[col], f"{path}:{n}: '{col}'")
            any_reference = True
            refs = [given[i] if i < len(given) else None for i in range(len(turns))]
        out.append(Question(qid, turns, refs, n))
    if not out:
        raise LlmdeskError(f"the questions file {path} holds no questions")
    if reference_column and not any_reference:
        raise LlmdeskError(f"no row of {path} has a '{reference_column}' column (--reference-column)")
    return out


def read_answers(path: str | Path, questions: list[Question]) -> dict[str, list[str]]:
    """Answers from JSONL, by question id: `answer` (a text), `turns`, or MT-Bench's
    `choices[0].turns`; every question needs one answer per turn."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    for n, row in _jsonl(path, "the answers file"):
        qid = row.get("question_id", row.get("id"))
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise LlmdeskError(f"{path}:{n}: each answer needs the 'question_id' it answers")
        if "choices" in row:
            try:
                value = row["choices"][0]["turns"]
            except (TypeError, KeyError, IndexError):
                raise LlmdeskError(f"{path}:{n}: 'choices' must be [{{\"turns\": [...]}}] (MT-Bench's "
                                   "layout)") from None
        else:
            value = row.get("turns", row.get("answer"))
        if value is None:
            raise LlmdeskError(f"{path}:{n}: no answer: give 'answer', 'turns' or MT-Bench's 'choices'")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise LlmdeskError(f"{path}:{n}: the answer must be a text or a list of texts")
        out[str(qid)] = value
    for q in questions:
        got = out.get(q.id)
        if got is None:
            raise LlmdeskError(f"{path} has no answer to question {q.id} (line {q.line} of the questions file)")
        if len(got) < len(q.turns):
            raise LlmdeskError(f"{path}: question {q.id} has {len(q.turns)} turns but {len(got)} answers")
    return out


def generate_answers(model, questions: list[Question], path: Path, *, max_tokens: int = MAX_ANSWER_TOKENS,
                     progress: Callable[[], None] | None = None) -> dict[str, list[str]]:
    """`model` answers every question (all its turns, one conversation; temperature 0). The
    answers go to `path` (JSONL, MT-Bench's answer layout), rewritten atomically after each
    question; answers already there are kept, so a rerun does not answer again."""
    from .. import atomic

    have = _stored_answers(path) if path.is_file() else {}
    name = getattr(model, "name", str(model))
    for q in questions:
        if q.id in have and len(have[q.id]) >= len(q.turns):
            if progress:
                progress()
            continue
        messages: list[dict] = []
        turns = []
        for t in q.turns:
            messages.append({"role": "user", "content": t})
            reply = model.respond(messages, temperature=0, max_tokens=max_tokens, truncate=True)
            messages.append({"role": "assistant", "content": reply.text})
            turns.append(reply.text)
        have[q.id] = turns
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = ({"question_id": k, "model_id": name, "choices": [{"index": 0, "turns": v}]} for k, v in have.items())
        atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if progress:
            progress()
    return have


def _stored_answers(path: Path) -> dict[str, list[str]]:
    out = {}
    for _, row in _jsonl(path, "the answers file"):
        try:
            out[str(row["question_id"])] = list(row["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# the judgments table


def _key(question_id: str, turn: int) -> str:
    """The stored question id: the question's own for its first turn, ID#N for turn N."""
    return question_id if turn == 1 else f"{question_id}#{turn}"


def stored(run: str, conn=None) -> list[dict[str, Any]]:
    """The verdicts stored under a run, oldest first."""
    from ..store.db import using

    with using(conn) as db:
        rows = db.execute("SELECT * FROM judgments WHERE run = ? ORDER BY id", (run,)).fetchall()
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


def store_verdict(run: str, kind: str, judge: str, question_id: str, question: str, model_a: str,
                  answer_a: str, raw: str, parsed: bool, *, model_b: str | None = None, answer_b: str | None = None,
                  score: float | None = None, winner: str | None = None, details: dict | None = None,
                  conn=None) -> int:
    from ..store.db import now, transaction, using

    with using(conn) as db, transaction(db):
        cur = db.execute(
            "INSERT INTO judgments (time, run, kind, judge, question_id, question, model_a, model_b, answer_a, "
            "answer_b, score, winner, parsed, raw, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now(), run, kind, judge, question_id, question, model_a, model_b, answer_a, answer_b, score, winner,
             int(parsed), raw, json.dumps(details or {}, sort_keys=True)))
        return int(cur.lastrowid)


# ---------------------------------------------------------------------------------------------
# a whole run


@dataclass
class ModelScore:
    model: str
    mean: float | None
    stderr: float | None
    n: int  # readable grades
    malformed: int


@dataclass
class PairScore:
    model_a: str
    model_b: str
    wins: int  # of model_a
    ties: int
    losses: int
    win_rate: float | None  # of model_a: (wins + ties / 2) / (wins + ties + losses)
    inconsistent: int  # pairs whose two orders disagreed (counted as ties)
    malformed: int


@dataclass
class JudgeReport:
    run: str
    judge: str
    mode: str
    questions: int
    judged: int  # verdicts asked for in this call
    skipped: int  # already stored under this run
    constrained: bool
    scores: list[ModelScore] = field(default_factory=list)
    pairs: list[PairScore] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)  # model -> the answers file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_run_name() -> str:
    import secrets

    return datetime.now(timezone.utc).strftime("judge-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _check_run(run: str, judge: str, mode: str, conn) -> list[dict]:
    rows = stored(run, conn)
    if rows:
        other = rows[0]
        if other["judge"] != judge or other["kind"] != mode:
            raise LlmdeskError(f"run '{run}' holds {other['kind']} verdicts by {other['judge']}; give another "
                               f"--run name for {mode} verdicts by {judge}")
    return rows


def judge_run(judge, questions: list[Question], answers: dict[str, dict[str, list[str]]], *, mode: str = "single",
              run: str | None = None, constrain: bool | None = None, parallel: int = 1, say: Say | None = None,
              progress: Callable[[int, int], None] | None = None) -> JudgeReport:
    """Judge `answers` ({model: {question_id: [answer per turn]}}) to `questions`: every model's
    answers graded (mode "single"), or every pair of models compared (mode "pairwise"). Each
    verdict is stored under `run` as it comes; verdicts already stored under `run` are skipped.
    `parallel`: verdicts asked for at once (a local judge decodes them together when it was
    loaded with as many slots; a remote one gets as many requests)."""
    from ..store.db import connect

    if mode not in ("single", "pairwise"):
        raise LlmdeskError(f"mode must be single or pairwise, got {mode!r}")
    if parallel < 1:
        raise LlmdeskError(f"parallel must be at least 1, got {parallel}")
    check_judge(judge)
    models = list(answers)
    if mode == "pairwise" and len(models) < 2:
        raise LlmdeskError("pairwise judging needs the answers of at least two models")
    if not models:
        raise LlmdeskError("no answers to judge: give models to answer, or their answers")
    run = run or new_run_name()
    constrained = _will_constrain(judge, constrain)
    conn = connect()
    try:
        done = {(r["question_id"], r["model_a"], r["model_b"]) for r in _check_run(run, judge.name, mode, conn)}
        jobs = [(q, t, a, b) for q in questions for t in range(1, len(q.turns) + 1)
                for a, b in (((m, None) for m in models) if mode == "single" else
                             ((models[i], models[j]) for i in range(len(models)) for j in range(i + 1, len(models))))]
        todo = [j for j in jobs if (_key(j[0].id, j[1]), j[2], j[3]) not in done]

        def work(job):
            return _verdict(judge, run, mode, *job, answers, constrain, say)

        stored_now = 0
        if progress:
            progress(0, len(todo))
        for (q, *_), row, error in _each(work, todo, parallel):
            if error is not None:
                raise _stopped(error, judge, q, run, len(done) + stored_now) from None
            store_verdict(**row, conn=conn)
            stored_now += 1
            if progress:
                progress(stored_now, len(todo))
        report = JudgeReport(run=run, judge=judge.name, mode=mode, questions=len(questions), judged=len(todo),
                             skipped=len(jobs) - len(todo), constrained=constrained)
        summarize(report, stored(run, conn), models)
    finally:
        conn.close()
    return report


def _each(work, jobs: list, parallel: int) -> Iterator[tuple[Any, Any, LlmdeskError | None]]:
    """(job, work(job), None) for every job, or (job, None, error) and no more after a failure;
    `parallel` jobs at once, in threads (one: in this thread, so Ctrl-C stops it at once)."""
    if parallel == 1:
        for job in jobs:
            try:
                yield job, work(job), None
            except LlmdeskError as e:
                yield job, None, e
                return
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="llmdesk-judge")
    try:
        pending = list(jobs)
        running: dict = {}
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                running[pool.submit(work, job)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                e = fut.exception()
                if e is None:
                    yield job, fut.result(), None
                elif isinstance(e, LlmdeskError):
                    yield job, None, e
                    return
                else:
                    raise e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the verdicts in flight finish, unstored


def _stopped(e: LlmdeskError, judge, q: Question, run: str, kept: int) -> LlmdeskError:
    """The one line for a run that stopped: what failed, and what is kept."""
    from ..runtime.engine import ContextOverflow

    if isinstance(e, ContextOverflow):
        e = LlmdeskError(f"question {q.id} (line {q.line}): the judge's prompt does not fit in {judge.name}'s "
                         f"context of {judge.n_ctx} tokens; give the judge a larger context (--ctx 4096)")
    if kept:
        e = LlmdeskError(f"{e} ({kept} verdicts of run '{run}' are stored; rerun with --run {run} to continue)")
    return e


def _verdict(judge, run: str, mode: str, q: Question, turn: int, a: str, b: str | None, answers, constrain,
             say) -> dict[str, Any]:
    """One verdict, as store_verdict's arguments."""
    i = turn - 1
    question, reference = q.turns[i], q.references[i]
    history = lambda m: [(q.turns[j], answers[m][q.id][j]) for j in range(i)]  # noqa: E731
    row = dict(run=run, kind=mode, judge=judge.name, question_id=_key(q.id, turn), question=question, model_a=a,
               answer_a=answers[a][q.id][i])
    details: dict[str, Any] = {"turn": turn, "question_id": q.id, "reference": reference}
    if mode == "single":
        g = grade(judge, question, answers[a][q.id][i], reference=reference, history=history(a),
                  constrain=constrain, say=say)
        return {**row, "raw": g.raw, "parsed": g.parsed, "score": g.score,
                "details": {**details, "reasoning": g.reasoning}}
    v = pairwise(judge, question, answers[a][q.id][i], answers[b][q.id][i], reference=reference,
                 history_a=history(a), history_b=history(b), constrain=constrain, say=say)
    return {**row, "raw": json.dumps(v.raw), "parsed": v.parsed, "model_b": b, "answer_b": answers[b][q.id][i],
            "winner": v.winner,
            "details": {**details, "consistent": v.consistent, "verdicts": v.verdicts, "reasoning": v.reasoning}}


def summarize(report: JudgeReport, rows: list[dict], models: list[str]) -> JudgeReport:
    """Fill a report's per-model scores or per-pair counts from the stored verdicts."""
    if report.mode == "single":
        for m in models:
            mine = [r for r in rows if r["model_a"] == m]
            scores = [r["score"] for r in mine if r["parsed"]]
            mean = statistics.fmean(scores) if scores else None
            se = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else None
            report.scores.append(ModelScore(m, mean, se, len(scores), sum(1 for r in mine if not r["parsed"])))
        return report
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            mine = [r for r in rows if r["model_a"] == a and r["model_b"] == b]
            won = [r["winner"] for r in mine if r["parsed"]]
            w, t, lo = won.count("a"), won.count("tie"), won.count("b")
            report.pairs.append(PairScore(a, b, w, t, lo, (w + t / 2) / len(won) if won else None,
                                          sum(1 for r in mine if r["parsed"] and not r["details"].get("consistent")),
                                          sum(1 for r in mine if not r["parsed"])))
    return report


def record_results(report: JudgeReport, *, questions_sha256: str | None, settings: dict | None = None,
                   model_sha256: dict[str, str] | None = None) -> list[int]:
    """A summary row per model (single) or per pair (pairwise) in the results store (`llmdesk results`)."""
    from ..store import results

    base = {"judge": report.judge, "run": report.run, "mode": report.mode, "constrained": report.constrained,
            **(settings or {})}
    ids = []
    sha = model_sha256 or {}
    for s in report.scores:
        ids.append(results.record("judge", model=s.model, model_sha256=sha.get(s.model), data_sha256=questions_sha256,
                                  metrics={"mean": s.mean, "stderr": s.stderr, "n": s.n, "malformed": s.malformed},
                                  settings=base))
    for p in report.pairs:
        ids.append(results.record("judge", model=p.model_a, model_sha256=sha.get(p.model_a),
                                  data_sha256=questions_sha256,
                                  metrics={"win_rate": p.win_rate, "wins": p.wins, "ties": p.ties, "losses": p.losses,
                                           "inconsistent": p.inconsistent, "malformed": p.malformed},
                                  settings={**base, "against": p.model_b}))
    return ids
