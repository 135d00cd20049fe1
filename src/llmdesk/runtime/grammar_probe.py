"""What a grammar costs on this model's vocabulary, measured: the second line of defence behind
the schema checks (llmdesk.runtime.grammars).

The checks bound a grammar's cost per token for a 32000-token vocabulary whose tokens are at most
16 characters long. llama.cpp's grammar sampler walks every token of the vocabulary through every
live parse, so the cost grows with the vocabulary (Qwen 2.5 has 152064 tokens, Gemma 256000) and
with how long its tokens are. So before a grammar is used, it is walked a few steps through
llama.cpp's own grammar sampler on the model's vocabulary: each step applies the grammar to every
token (what sampling one token costs) and accepts a token the grammar allows (the first walk takes
the longest such token, to get deep into the grammar fast; the others take random ones). A step
slower than the budget refuses the grammar. Results are cached per grammar text.

    check_grammar_cost(model, grammar)   # model: a LlamaModel; raises GrammarTooSlow

The budget is relative to the vocabulary: BUDGET_RATIO times what a plain JSON grammar costs on it
(the reference is measured once per model), never under MIN_BUDGET_S. The schema checks keep the
grammars they accept within ~8-12x of plain JSON (benchmarks/grammar_cost.py), so the ratio
leaves room for a busy machine; a step over budget is measured again before it refuses. A probe
costs WALKS x STEPS applies once per distinct grammar: 0.1-0.5 s for a 32k vocabulary here.

It is a probe, not a proof: a walk of a few tokens reaches the grammar's first few places, not
every one. The static checks are what bound the rest.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import time
import weakref

import llama_cpp as C
import numpy as np

from ..errors import LlmdeskError
from .grammars import JSON_OBJECT_GRAMMAR
from .llama import LlamaModel

BUDGET_RATIO = 20.0
MIN_BUDGET_S = 0.02
WALKS = 2
STEPS = 6
CACHE_SIZE = 128

# the reference: any JSON value (llama.cpp's grammars/json.gbnf, as JSON mode uses it)
REFERENCE_GRAMMAR = JSON_OBJECT_GRAMMAR.replace("root   ::= object", "root   ::= value", 1)


class GrammarTooSlow(LlmdeskError):
    """A grammar whose sampling costs more per token than the budget, on this model."""


class _Probe:
    """One model's vocabulary as a full candidates array, and the grammars measured on it."""

    def __init__(self, model: LlamaModel):
        self.model = model
        n = model.n_vocab
        dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
        self.fresh = np.zeros(n, dtype=dtype)
        self.fresh["id"] = np.arange(n)
        self.work = self.fresh.copy()
        buf = ctypes.create_string_buffer(256)
        # bytes of each token's text (a longer one is never the longest allowed token: clipped)
        self.lengths = np.array([C.llama_token_to_piece(model.vocab, t, buf, len(buf), 0, False) for t in range(n)])
        self.eog = np.array([bool(C.llama_vocab_is_eog(model.vocab, t)) for t in range(n)])
        self.lock = threading.Lock()
        self.results: collections.OrderedDict[str, float | str] = collections.OrderedDict()
        self._reference: float | None = None

    def apply(self, smpl) -> float:
        """Apply the grammar sampler to every token; CPU seconds of this thread (the machine may be
        busy with other work: CPU time is what this grammar costs)."""
        np.copyto(self.work, self.fresh)
        arr = C.llama_token_data_array(data=self.work.ctypes.data_as(C.llama_token_data_p),
                                       size=len(self.work), selected=-1, sorted=False)
        t = time.thread_time()
        C.llama_sampler_apply(smpl, ctypes.byref(arr))
        return time.thread_time() - t

    def sampler(self, grammar: str):
        smpl = C.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
        if not smpl:
            raise LlmdeskError("the grammar could not be parsed (GBNF with a 'root' rule expected)")
        return smpl

    def reference(self) -> float:
        if self._reference is None:
            smpl = self.sampler(REFERENCE_GRAMMAR)
            try:
                self._reference = min(self.apply(smpl) for _ in range(3))
            finally:
                C.llama_sampler_free(smpl)
        return self._reference

    def walk(self, grammar: str, budget: float, seed: int) -> float:
        """The slowest of STEPS applies along one walk; GrammarTooSlow past the budget."""
        rng = np.random.default_rng(seed)
        smpl = self.sampler(grammar)
        worst = 0.0
        try:
            for step in range(STEPS):
                dt = self.apply(smpl)
                if dt > budget:  # make sure: the best of three
                    dt = min([dt] + [self.apply(smpl) for _ in range(2)])
                    if dt > budget:
                        raise GrammarTooSlow(
                            f"the grammar takes {dt * 1000:.0f} ms per token on this model's {len(self.work)}-token "
                            f"vocabulary (step {step}; the budget is {budget * 1000:.0f} ms, {BUDGET_RATIO:g}x plain "
                            f"JSON); simplify the schema: fewer optional properties, branches and alternatives")
                worst = max(worst, dt)
                allowed = np.flatnonzero(np.isfinite(self.work["logit"]) & ~self.eog)
                if not len(allowed):
                    break  # the grammar is complete (only end-of-generation is left), or stuck
                if seed == 0:
                    tok = allowed[np.argmax(self.lengths[allowed])]
                else:
                    tok = allowed[rng.integers(len(allowed))]
                C.llama_sampler_accept(smpl, int(tok))
        finally:
            C.llama_sampler_free(smpl)
        return worst


_probes: weakref.WeakKeyDictionary[LlamaModel, _Probe] = weakref.WeakKeyDictionary()
_probes_lock = threading.Lock()


def check_grammar_cost(model: LlamaModel, grammar: str, *, budget_s: float | None = None) -> float:
    """Walk `grammar` (GBNF, root rule "root") a few steps on `model`'s vocabulary; return the
    slowest step's CPU seconds, or raise GrammarTooSlow when a step costs more than `budget_s`
    (default: BUDGET_RATIO x plain JSON on this vocabulary, at least MIN_BUDGET_S). Cached by
    grammar text. Blocks for ~WALKS x STEPS samplings: call it from a worker thread."""
    with _probes_lock:
        probe = _probes.get(model)
        if probe is None:
            probe = _probes[model] = _Probe(model)
    with probe.lock:
        key = f"{budget_s}\n{grammar}"
        if key in probe.results:
            probe.results.move_to_end(key)
            found = probe.results[key]
            if isinstance(found, str):
                raise GrammarTooSlow(found)
            return found
        budget = budget_s if budget_s is not None else max(MIN_BUDGET_S, BUDGET_RATIO * probe.reference())
        try:
            result: float | str = max(probe.walk(grammar, budget, seed) for seed in range(WALKS))
        except GrammarTooSlow as e:
            result = str(e)
        probe.results[key] = result
        if len(probe.results) > CACHE_SIZE:
            probe.results.popitem(last=False)
        if isinstance(result, str):
            raise GrammarTooSlow(result)
        return result
