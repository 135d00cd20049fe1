"""Answers from your documents, citing their sources.

    a = ask("How do I rotate the logs?", "notes", model="qwen2.5:1.5b")
    a.text                  # "... run logrotate weekly [1], or by size [2]."
    a.citations             # [(1, Hit(path="ops.md", headings=["Logs"], line_start=12, ...)), (2, ...)]
    a.unknown_citations     # numbers the answer cites that no passage has: [] when it cites honestly
    a.dropped               # passages retrieved but left out to fit the context (never cut silently)

The passages are retrieved (`rag.search`), put in the user turn as quoted, numbered data
(`rag.guard.quote_passages`: never in the system prompt, delimited so a passage cannot close
its own block, flagged ones marked), fitted into the context through the conversation layer
(the lowest-ranked passages are left out first, and `dropped` says which), and the model's
answer is read for its `[n]` citations.

`chat_turn` is the same for a conversation (`llmdesk chat --docs`): each question retrieves
afresh, and a tool call proposed while retrieved text is in the context is always put to the
user (`confirm`), even when they said yes to every call: a document must not be able to make
the model run a tool unchecked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LlmdeskError
from ..runtime.conversation import ContextOverflow, Reply, chat_prompt, normalize_messages
from .guard import SYSTEM, Quoted, quote_passages, source_line

if TYPE_CHECKING:  # pragma: no cover
    from .search import Hit

ANSWER_ROOM = 512  # tokens kept free for the answer when max_tokens is not given


@dataclass
class Answer:
    question: str
    text: str
    passages: list["Hit"]  # what the model was shown, as [1], [2], ... in rank order
    citations: list[tuple[int, "Hit"]]  # the passages the answer cites, in order of first mention
    unknown_citations: list[int] = field(default_factory=list)  # cited numbers no passage has
    dropped: list["Hit"] = field(default_factory=list)  # retrieved, left out to fit the context
    reply: Reply | None = None
    messages: list[dict] = field(default_factory=list)  # the conversation the model was given

    @property
    def flagged(self) -> list[int]:
        """The numbers of the passages the guard flagged as looking like instructions."""
        return [n for n, h in enumerate(self.passages, 1) if getattr(h, "flags", None)]

    def sources(self) -> list[str]:
        """`[n] path, heading, page/lines` for each passage shown, flagged ones marked."""
        out = []
        for n, h in enumerate(self.passages, 1):
            flags = getattr(h, "flags", None)
            out.append(f"[{n}] {source_line(h)}" + (f"  (flagged: {', '.join(flags)})" if flags else ""))
        return out

    def to_dict(self) -> dict[str, Any]:
        r = self.reply
        return {"question": self.question, "answer": self.text,
                "citations": [n for n, _ in self.citations], "unknown_citations": self.unknown_citations,
                "passages": [passage_dict(h, n) for n, h in enumerate(self.passages, 1)],
                "dropped": [passage_dict(h) for h in self.dropped],
                "usage": None if r is None else {"prompt_tokens": r.prompt_tokens,
                                                 "completion_tokens": r.completion_tokens,
                                                 "messages_dropped": r.messages_dropped}}


def passage_dict(h, n: int | None = None) -> dict[str, Any]:
    """A passage as JSON (`llmdesk ask --json`, the server's `sources`): its number when it was
    shown, where it is, its score, the guard's flags and its text."""
    d = {"path": str(h.path), "headings": list(h.headings or []), "page": h.page,
         "line_start": h.line_start, "line_end": h.line_end, "char_start": h.char_start,
         "char_end": h.char_end, "score": h.score, "flags": list(h.flags or []), "text": h.text}
    return {"n": n, **d} if n is not None else d


# ---------------------------------------------------------------------------------------------
# citations

_CITE = re.compile(r"\[(\d+(?:\s*(?:,|;|-|–|and)\s*\d+)*)\](?!\()")  # [1], [1, 2], [1-3]; not a [1](link)


def cited_numbers(text: str) -> list[int]:
    """The passage numbers `text` cites, in order of first mention: "[2] and [1, 3]" -> [2, 1, 3]."""
    seen: list[int] = []
    for m in _CITE.finditer(text):
        for part in re.split(r"\s*(?:,|;|and)\s*", m.group(1)):
            a, _, b = part.replace("–", "-").partition("-")
            nums = range(int(a), int(b) + 1) if b and 0 <= int(b) - int(a) < 50 else [int(a)] + ([int(b)] if b else [])
            seen += [n for n in nums if n not in seen]
    return seen


# ---------------------------------------------------------------------------------------------
# fitting the passages into the context


def _fits(model, messages: list[dict], limit: int) -> bool:
    if not hasattr(model, "chat_tokens"):  # a remote model: ~3 characters a token, on the safe side
        return sum(len(m["content"]) for m in messages) // 3 < limit
    try:
        chat_prompt(model, messages, spec=None, limit=limit, truncate=False)
    except ContextOverflow:
        return False
    return True


def fit_passages(model, hits: list, question: str, *, answer_room: int, system: str = SYSTEM,
                 nonce: str | None = None) -> tuple[Quoted, list]:
    """The quoted turn with as many of `hits` (best first) as fit in the model's context with
    `answer_room` tokens left for the answer, and the hits left out (lowest-ranked first to go)."""
    n_ctx = getattr(model, "n_ctx", None) or 4096
    limit = max(1, n_ctx - answer_room)
    keep = list(hits)
    while True:
        quoted = quote_passages(keep, question, nonce=nonce)
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": quoted.text}]
        if _fits(model, msgs, limit):
            return quoted, hits[len(keep):]
        if not keep:
            need = f" ({len(model.chat_tokens(msgs))} tokens)" if hasattr(model, "chat_tokens") else ""
            raise LlmdeskError(f"the question and the rule that frames the passages{need} do not fit in the context of "
                               f"{n_ctx} tokens with {answer_room} left for the answer, even without passages; "
                               f"answer with a model of a larger context (-m; --ctx if it was set lower)")
        keep.pop()


# ---------------------------------------------------------------------------------------------
# asking


def _open_model(model):
    """(a model, whether we opened it): a Model as it is, or a reference loaded here."""
    if model is None:
        model = os.environ.get("LLMDESK_MODEL")
        if not model:
            raise LlmdeskError("no model named to answer with: pass model= (a Model or a reference such as "
                               "a .gguf path), or set LLMDESK_MODEL")
    if isinstance(model, (str, os.PathLike)):
        from ..runtime.model import load

        return load(str(model)), True
    return model, False


def retrieve(question: str, collection: str, *, k: int, mode: str, embedder=None) -> list["Hit"]:
    from .search import search

    if not question.strip():
        raise LlmdeskError("the question is empty: ask something")
    return search(question, collection, k=k, mode=mode, embedder=embedder)


def frame(model, question: str, hits: list, history: list[dict], *, max_tokens: int | None,
          system: str | None = None, nonce: str | None = None) -> tuple[list[dict], Quoted, list, int]:
    """The conversation that asks `question` over `hits`: (messages, the quoted turn, the hits
    left out to fit, the tokens kept for the answer). The messages are the system prompt that
    frames passages (`system` added to it), `history` (no system message), and the quoted turn."""
    room = max_tokens if max_tokens is not None else ANSWER_ROOM
    room = min(room, max(16, (getattr(model, "n_ctx", None) or 4096) // 2))
    system = SYSTEM + (f"\n\n{system}" if system else "")
    quoted, dropped = fit_passages(model, hits, question, answer_room=room, system=system, nonce=nonce)
    messages = normalize_messages([{"role": "system", "content": system}, *history,
                                   {"role": "user", "content": quoted.text}])
    return messages, quoted, dropped, room


def _answer(model, question: str, hits: list, history: list[dict], *, max_tokens: int | None, on_text,
            respond: Callable | None = None, system: str | None = None, nonce: str | None = None,
            **kw) -> tuple[Answer, list[dict]]:
    messages, quoted, dropped, room = frame(model, question, hits, history, max_tokens=max_tokens, system=system,
                                            nonce=nonce)
    # history, if any, may be dropped oldest first (reported); the quoted turn is always kept
    if respond is None:
        reply = model.respond(messages, on_text=on_text, max_tokens=room, truncate=bool(history), **kw)
        added = [reply.message()]
    else:
        reply, convo = respond(messages, on_text=on_text, max_tokens=room, truncate=bool(history), **kw)
        added = convo[len(messages):]
    shown = quoted.passages
    nums = cited_numbers(reply.text)
    cites = [(n, shown[n - 1]) for n in nums if 1 <= n <= len(shown)]
    unknown = [n for n in nums if not 1 <= n <= len(shown)]
    return Answer(question, reply.text, shown, cites, unknown, dropped, reply, messages), added


def ask(question: str, collection: str = "default", *, model=None, k: int = 5, mode: str = "hybrid",
        embedder=None, hits: list | None = None, max_tokens: int | None = ANSWER_ROOM,
        on_text: Callable[[str], Any] | None = None, temperature: float = 0.2, **sampling) -> Answer:
    """Answer `question` from `collection`, citing the passages as [n].

    `model`: a Model (local or remote), a reference to load (a .gguf path, NAME[:TAG],
    openai:URL#MODEL), or None for $LLMDESK_MODEL. `k` passages are retrieved by `mode`
    ("hybrid", "bm25", "vector") with `embedder` (None: the collection's). `on_text(str)` hears
    the answer as it is generated; `hits`: passages already retrieved (`retrieve`), best first.
    `nonce`: the passages' delimiters carry a random one per request; give one only to
    reproduce a prompt exactly.
    The rest go to `model.respond` (`seed`, `top_k`, `response_format`, ...)."""
    if hits is None:
        hits = retrieve(question, collection, k=k, mode=mode, embedder=embedder)
    m, opened = _open_model(model)
    try:
        answer, _ = _answer(m, question, hits, [], max_tokens=max_tokens, on_text=on_text,
                            temperature=temperature, **sampling)
        return answer
    finally:
        if opened:
            m.close()


def tool_confirmation(hits: list, yes: bool, confirm: Callable | None) -> Callable | None:
    """Who decides a tool call: `confirm(call) -> bool`, or None (every call runs). With
    retrieved passages in the context a call is always put to `confirm` (none given: declined),
    whatever `yes` says; `yes` lets calls run unasked only when nothing was retrieved."""
    if hits or not yes:
        return confirm or (lambda call: False)
    return None


def chat_turn(model, history: list[dict], question: str, collection: str, *, k: int = 5, mode: str = "hybrid",
              embedder=None, agent: Callable | None = None, confirm: Callable | None = None, yes: bool = False,
              system: str | None = None, on_text=None, max_tokens: int | None = ANSWER_ROOM,
              **kw) -> tuple[Answer, list[dict]]:
    """One turn of a conversation over a collection: (the Answer, the messages to append to
    `history`: the question as the user asked it, then the model's turns, without the passages).
    `history` holds no system message: `system` is added to the one that frames the passages.

    `agent(messages, confirm=..., **kw) -> (Reply, messages)` runs the model with tools (for
    example one that returns `(r.reply, r.messages)` of `runtime.agent.run_agent(model, msgs, functions, **kw)`); its
    `confirm` follows `tool_confirmation`: a tool call proposed while retrieved text is in the
    context is always asked, even with `yes`."""
    hits = retrieve(question, collection, k=k, mode=mode, embedder=embedder)
    respond = None
    if agent is not None:
        ask_user = tool_confirmation(hits, yes, confirm)

        def respond(messages, **kw2):
            return agent(messages, confirm=ask_user, **kw2)
    answer, added = _answer(model, question, hits, history, max_tokens=max_tokens, on_text=on_text,
                            respond=respond, system=system, **kw)
    return answer, [{"role": "user", "content": question}] + added
