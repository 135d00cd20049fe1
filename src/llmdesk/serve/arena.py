"""Arena battles for the web chat: one prompt, two anonymous models, a person's vote.

    POST /api/arena/battles              {"prompt": "..."} or {"messages": [...]}, optional sampling
                                         and "models" (the names to draw from, BASE+ADAPTER too;
                                         default: the -m models and their adapters' variants, or
                                         all) -> {"id", "sides": ["a", "b"]}
    POST /api/arena/battles/{id}/{a|b}   that side's answer, streamed as server-sent events:
                                         {"content": "..."} ..., {"finish_reason", "timings"}, [DONE]
    GET  /api/arena/battles/{id}         where the battle stands (names only once voted)
    POST /api/arena/battles/{id}/vote    {"winner": "a" | "b" | "tie" | "both_bad"}
                                         -> the vote's id and the two names, revealed

The server keeps each battle (the two hidden names, the prompt, the answers as they are
generated) in memory: at most MAX_BATTLES, each for BATTLE_TTL_S. The vote stores what the server
generated, never what the client says it saw, through `eval.arena.record_vote` (source "web"),
where `llmdesk arena leaderboard` reads it.

An answer takes the chat completions' path: the conversation layer prepares it and the
scheduler runs it with a lease on the model, so the server's limits hold (the queue and its 429,
--request-timeout, a stream cancelled when its client goes away). No response names a model
before the vote: errors that would (a model that is busy, or will not load) say "model A" or
"model B" instead. A side whose stream was cut off may be asked for again; a battle can be voted
on only when both answers have finished, and only once (409 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LlmdeskError
from ..eval.arena import record_vote
from ..runtime import conversation
from ..runtime.conversation import SamplingParams, finish_reason, sampling_params
from .chat import off_loop, timings
from .errors import APIError, from_library
from .models import variant_name
from .openai import STREAM_HEADERS, note, record, state
from .scheduler import start

router = APIRouter()

MAX_BATTLES = 256  # kept at once; the oldest goes first
BATTLE_TTL_S = 3600.0  # a battle not voted on within an hour is forgotten
MAX_PROMPT_CHARS = 1_000_000  # the conversation's text: far more than any context holds
SIDES = ("a", "b")


# ---------------------------------------------------------------------------------------------
# battles, in memory


@dataclass
class Side:
    model: str  # hidden until the vote
    text: str = ""  # the answer as the server generated it
    state: str = "waiting"  # waiting | running | done | stopped | failed
    finish_reason: str | None = None


@dataclass
class Battle:
    id: str
    messages: list[dict]
    sampling: SamplingParams  # the same for both sides
    max_tokens: int | None
    ignore_eos: bool
    sides: dict[str, Side]
    created: float = field(default_factory=time.monotonic)
    winner: str | None = None

    @property
    def prompt(self) -> str:
        """The last user message: what the vote records as the prompt."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    def hide(self, text: str) -> str:
        """`text` with the models' names replaced by "model A" and "model B"."""
        # the longer name first: "qwen" must not eat into "qwen:q8"
        for key, side in sorted(self.sides.items(), key=lambda kv: -len(kv[1].model)):
            label = f"model {key.upper()}"
            text = text.replace(f"model '{side.model}'", label).replace(f"'{side.model}'", label)
            text = text.replace(side.model, label)
        return text

    def public(self) -> dict:
        """What a client may see: the names only once the battle is voted on."""
        out: dict[str, Any] = {"id": self.id, "winner": self.winner,
                               "sides": {k: {"state": s.state, "finish_reason": s.finish_reason}
                                         for k, s in self.sides.items()}}
        if self.winner is not None:
            out.update(model_a=self.sides["a"].model, model_b=self.sides["b"].model)
        return out


class Battles:
    """The battles a server holds: bounded in number and in age."""

    def __init__(self, max_battles: int = MAX_BATTLES, ttl_s: float = BATTLE_TTL_S):
        self.max_battles = max_battles
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, Battle] = OrderedDict()

    def _expire(self, room: int = 0) -> None:
        """Forget the battles past their time, and the oldest until `room` more fit."""
        now = time.monotonic()
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.created < self.ttl_s and len(self._items) + room <= self.max_battles:
                break
            self._items.popitem(last=False)

    def add(self, battle: Battle) -> Battle:
        self._expire(room=1)
        self._items[battle.id] = battle
        return battle

    def get(self, battle_id: str) -> Battle:
        self._expire()
        battle = self._items.get(battle_id)
        if battle is None:
            raise APIError(404, f"no arena battle '{battle_id[:64]}' (battles are kept for "
                                f"{self.ttl_s / 60:g} minutes); start a new one", code="battle_not_found")
        return battle


def battles(request: Request) -> Battles:
    app_state = request.app.state
    if not hasattr(app_state, "arena_battles"):
        app_state.arena_battles = Battles()
    return app_state.arena_battles


def hidden(err: APIError, battle: "Battle") -> APIError:
    """The same error with the battle's models named by their sides ("model A is busy")."""
    return APIError(err.status, battle.hide(err.message), code=err.code, headers=err.headers, type=err.type)


def draw_from(models) -> list[str]:
    """The models a battle draws from when the request names none: those the server was started
    with (`-m`) and their LoRA adapters' variants (BASE+NAME), when there are two or more (the
    ones its user meant to compare); else every model it can serve, the store's too."""
    started = list(dict.fromkeys(n for ref in models.started for n in (ref.name, *models.variants(ref))))
    return started if len(started) >= 2 else list(dict.fromkeys(ref.name for ref in models.available()))


# ---------------------------------------------------------------------------------------------
# routes


class BattleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "5" is not a number
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    models: list[str] | None = Field(None, min_length=2, max_length=64)  # draw from these; default: draw_from
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    ignore_eos: bool = False


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    winner: Literal["a", "b", "tie", "both_bad"]


@router.post("/api/arena/battles")
async def create_battle(body: BattleRequest, request: Request):
    st = state(request)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send either 'prompt' (a text) or 'messages' (a conversation)", param="prompt")
    raw = [{"role": "user", "content": body.prompt}] if body.prompt is not None else body.messages
    messages = conversation.normalize_messages(raw)
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise APIError(400, "the prompt is empty: a battle needs something to answer", param="prompt")
    if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
        raise APIError(400, f"the prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    sampling = sampling_params(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                               seed=body.seed)
    if body.models is not None:
        found = [st.models.find_variant(m) for m in body.models]
        names = list(dict.fromkeys(variant_name(src.name, chosen) for src, chosen in found))
    else:
        names = draw_from(st.models)
    if len(names) < 2:
        raise APIError(400, f"an arena battle needs two models, and this server has {len(names)}: serve more "
                            "(llmdesk serve -m MODEL -m MODEL, or llmdesk pull)", param="models",
                       code="too_few_models")
    a, b = secrets.SystemRandom().sample(names, 2)  # which is A is random too
    battle = Battle(id="battle-" + secrets.token_hex(12), messages=messages, sampling=sampling,
                    max_tokens=body.max_tokens, ignore_eos=body.ignore_eos, sides={"a": Side(a), "b": Side(b)})
    battles(request).add(battle)
    return {"id": battle.id, "sides": list(SIDES)}


@router.get("/api/arena/battles/{battle_id}")
async def get_battle(battle_id: str, request: Request):
    return battles(request).get(battle_id).public()


# before the /{side} route, which would otherwise take "vote" for a side
@router.post("/api/arena/battles/{battle_id}/vote")
async def vote(battle_id: str, body: VoteRequest, request: Request):
    battle = battles(request).get(battle_id)
    if battle.winner is not None:
        raise APIError(409, "this battle has been voted on already", code="battle_voted")
    unfinished = [k.upper() for k, s in battle.sides.items() if s.state != "done"]
    if unfinished:
        which = "answers A and B have" if len(unfinished) == 2 else f"answer {unfinished[0]} has"
        raise APIError(409, f"{which} not finished; vote when both answers are done", code="battle_unfinished")
    battle.winner = body.winner  # taken before the first await: a second vote meanwhile is a 409
    a, b = battle.sides["a"], battle.sides["b"]
    details: dict[str, Any] = {"battle": battle.id, "finish_reasons": [a.finish_reason, b.finish_reason]}
    if len(battle.messages) > 1:
        details["messages"] = battle.messages
    try:
        vote_id = await asyncio.to_thread(record_vote, battle.prompt, a.model, b.model, body.winner,
                                          answer_a=a.text, answer_b=b.text, source="web", details=details)
    except BaseException:
        battle.winner = None
        raise
    return {"id": battle.id, "vote_id": vote_id, "winner": body.winner, "model_a": a.model, "model_b": b.model}


@router.post("/api/arena/battles/{battle_id}/{side}")
async def stream_side(battle_id: str, side: Literal["a", "b"], request: Request):
    st = state(request)
    battle = battles(request).get(battle_id)
    s = battle.sides[side]
    if battle.winner is not None:
        raise APIError(409, "this battle has been voted on; start a new one", code="battle_voted")
    if s.state in ("running", "done"):
        raise APIError(409, f"answer {side.upper()} is already {'being generated' if s.state == 'running' else 'done'}",
                       code="side_started")
    s.state, s.text, s.finish_reason = "running", "", None  # claimed: a second stream is a 409
    try:
        lease, turn, gens = await _begin(st, battle, s)
    except BaseException:
        s.state = "failed"
        raise
    note(request, model=s.model, prompt=len(turn.prompt.tokens))
    return StreamingResponse(_answer(request, battle, side, lease, gens), media_type="text/event-stream",
                             headers=STREAM_HEADERS)


async def _begin(st, battle: Battle, s: Side):
    """Lease the side's model and start its answer: (lease, turn, generations). Errors name the
    models by their sides."""
    try:
        lease = await st.models.acquire(s.model)
        try:
            turn = await off_loop(conversation.prepare, lease.model, battle.messages, sampling=battle.sampling,
                                  max_tokens=battle.max_tokens, ignore_eos=battle.ignore_eos,
                                  time_limit=st.config.request_timeout)
            return lease, turn, start(lease, turn.requests, st.metrics)
        except BaseException:
            lease.release()
            raise
    except LlmdeskError as e:
        raise hidden(from_library(e), battle) from None
    except APIError as e:
        raise hidden(e, battle) from None


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _answer(request: Request, battle: Battle, side: str, lease, gens):
    s = battle.sides[side]
    try:
        async for _, ev in gens.events():
            if ev is not None:
                s.text += ev.text
                if ev.text:
                    yield _event({"content": ev.text})
                continue
            r = gens.streams[0].result
            if r.finish_reason == "error":
                s.state = "failed"
                yield _event({"error": battle.hide(f"answer {side.upper()} failed: {r.error}")})
                return
            s.text, s.finish_reason = r.text, finish_reason(r)
            s.state = "done" if r.finish_reason in ("stop", "length", "time_limit") else "stopped"
            yield _event({"finish_reason": s.finish_reason, "timings": timings(r)})
        yield "data: [DONE]\n\n"
    finally:
        gens.cancel()
        lease.release()
        if s.state == "running":  # the client went away before the end
            s.state = "stopped"
        r = gens.results[0]
        note(request, gen=r.n_gen, cached=r.n_cached, finish=r.finish_reason or "cancelled")
        record(request, s.model, battle.prompt, None, gens.results)
