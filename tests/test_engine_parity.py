"""The tokens the Engine chooses greedily, and the log-probabilities it reports with them (a
request's `logprobs=k`: the chosen token's and the k most likely, as the server's `logprobs` and
`top_logprobs` show them), against transformers' own greedy `generate` on the same checkpoint.

The checkpoint is tests/test_engine_scoring.py's tiny random Llama with a trained BPE tokenizer,
converted to an f32 GGUF by llmdesk's converter; that file checks scoring and prompt
log-probabilities. Here the reference is transformers' `generate` with its KV cache and
`output_logits` (each step's raw logits), fed the same token ids: nothing on its side passes
through llmdesk. Tolerances are the converter's (1e-3 with an f32 KV cache and no flash
attention; measured: ~3e-6), and test_engine_scoring's 5e-2 for the Python API's default f16
cache (measured: ~5e-3).
"""

from __future__ import annotations

import numpy as np
import torch  # the train extra: missing, this fails
from test_engine_scoring import PARITY, hf, hf_llama  # noqa: F401  (fixtures: the checkpoint, its GGUF)

from llmdesk.runtime.engine import Engine, Request, SamplingParams
from llmdesk.runtime.model import Model

N = 16  # tokens generated per prompt
K = 5  # top log-probabilities asked for
PROMPTS = ["The quick brown fox", "Question: what is the capital of France? Answer:"]
F16_CACHE = 5e-2  # the Python API's default f16 KV cache (test_engine_scoring's bound for it)


def hf_greedy(hf: dict, prompt: list[int], n: int = N) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy `generate`: the n tokens it chooses (end-of-text does not stop it) and
    each step's (n_vocab,) float64 log-softmax."""
    model = hf["model"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=None,
                             pad_token_id=model.config.eos_token_id, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == n == len(out.logits), "transformers stopped early"
    return tokens, [torch.log_softmax(step[0].double(), dim=-1).numpy() for step in out.logits]


def check_top(top: list[tuple[int, float]], ref: np.ndarray, k: int, tol: float) -> None:
    """`top` is the k most likely tokens of `ref`, most likely first, each with its log-probability
    within `tol`. Where two reference values lie within 2*tol of each other either order is right."""
    tokens, values = [t for t, _ in top], np.array([v for _, v in top])
    assert len(top) == k and len(set(tokens)) == k
    assert np.all(np.diff(values) <= 0), values
    np.testing.assert_allclose(values, ref[tokens], rtol=0, atol=tol)  # each token's own value
    best = np.argsort(-ref)[: k + 1]
    np.testing.assert_allclose(values, ref[best[:k]], rtol=0, atol=tol)  # ... and they are the k best
    for i, (got, want) in enumerate(zip(tokens, best[:k])):
        neighbours = [ref[best[j]] for j in (i - 1, i + 1) if 0 <= j <= k]
        if all(abs(ref[want] - v) > 2 * tol for v in neighbours):
            assert got == want, (i, tokens, best[:k].tolist())


def test_greedy_generation_and_its_logprobs_match_transformers(hf, hf_llama):
    prompts = [hf_llama.tokenize(p) for p in PROMPTS]
    refs = [hf_greedy(hf, p) for p in prompts]
    greedy = SamplingParams(temperature=0)
    # both prompts at once: decoded in the same batches, as a server with two slots would
    with Engine(hf_llama, n_ctx=256, n_slots=2, n_threads=1, cache_type="f32", flash_attn=False) as eng:
        streams = [eng.submit(Request(p, max_tokens=N, sampling=greedy, logprobs=K, ignore_eos=True))
                   for p in prompts]
        events = [list(s) for s in streams]
        # logprobs=0: the chosen token's log-probability only
        chosen_only = list(eng.submit(Request(prompts[0], max_tokens=N, sampling=greedy, logprobs=0, ignore_eos=True)))
    for evs, s, (want, lps) in zip(events, streams, refs):
        assert s.result.finish_reason == "length"
        assert [e.token for e in evs] == want  # token for token
        np.testing.assert_allclose([e.logprob for e in evs], [lp[t] for t, lp in zip(want, lps)], rtol=0, atol=PARITY)
        for e, lp in zip(evs, lps):
            check_top(e.top_logprobs, lp, K, PARITY)
    want, lps = refs[0]
    assert [e.token for e in chosen_only] == want and all(e.top_logprobs is None for e in chosen_only)
    np.testing.assert_allclose([e.logprob for e in chosen_only], [lp[t] for t, lp in zip(want, lps)], rtol=0, atol=PARITY)


def test_model_complete_logprobs_match_transformers(hf):
    """The Python API (`Model.complete(..., logprobs=5)`, `Model.generate`) with its defaults: the
    same tokens, log-probabilities within the f16 cache's error, top lists as token texts."""
    with Model(hf["gguf"], ctx=256, threads=1) as m:
        prompt = m.tokenize(PROMPTS[1])
        want, lps = hf_greedy(hf, prompt)
        c = m.complete(prompt, max_tokens=N, temperature=0, logprobs=K, ignore_eos=True)
        assert c.finish_reason == "length" and c.completion_tokens == N
        assert [t.token for t in c.logprobs] == want
        assert c.text == m.detokenize(want) == m.generate(prompt, max_tokens=N, temperature=0, ignore_eos=True)
        np.testing.assert_allclose([t.logprob for t in c.logprobs], [lp[t] for t, lp in zip(want, lps)],
                                   rtol=0, atol=F16_CACHE)
        # the top lists name tokens by their text (several byte tokens share the text "\ufffd")
        ids: dict[str, list[int]] = {}
        for i in range(m.llama.n_vocab):
            ids.setdefault(m.llama.piece(i, special=True).decode("utf-8", "replace"), []).append(i)
        for t, lp in zip(c.logprobs, lps):
            assert t.token in ids[t.text] and len(t.top) == K
            values = [v for _, v in t.top]
            np.testing.assert_allclose(values, np.sort(lp)[::-1][:K], rtol=0, atol=F16_CACHE)  # the K best
            for text, v in t.top:  # each one a token of that text with that log-probability
                assert min(abs(lp[i] - v) for i in ids[text]) <= F16_CACHE, (text, v)
