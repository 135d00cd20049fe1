"""The Engine scores and embeds: log-probabilities of continuations against transformers on a tiny
real Llama checkpoint converted to GGUF, batched scoring against one pair at a time, the shared
context copied between slots against recomputing it, prompt log-probabilities, batched
embeddings for each pooling type against one text at a time and against transformers' hidden
states, and cancelling a scoring job.

Parity tolerances are the converter's (tests/test_convert.py: logits within 1e-3 of transformers
with an f32 KV cache and no flash attention); batched against one-at-a-time differs only by the
order of float sums.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest

import torch  # noqa: E402  (the train extra: missing, this fails)
import transformers  # noqa: E402

from llmdesk.errors import LlmdeskError  # noqa: E402
from llmdesk.eval.ppl import perplexity  # noqa: E402
from llmdesk.formats.convert import convert  # noqa: E402
from llmdesk.formats.synth import SynthConfig, write_llama_gguf  # noqa: E402
from llmdesk.runtime.engine import ContextOverflow, Engine, Request, SamplingParams, ScoreRequest  # noqa: E402
from llmdesk.runtime import engine as engine_mod  # noqa: E402
from llmdesk.runtime.limits import InvalidRequest  # noqa: E402
from llmdesk.runtime.llama import LlamaModel, blas  # noqa: E402
from llmdesk.runtime.model import Model  # noqa: E402
from llmdesk.train.tokenizer import save_hf_tokenizer, train_bpe  # noqa: E402

TEXT = [
    "The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits.",
    "Question: what is the capital of France? Answer: Paris. Question: what is two plus two? Answer: four.",
    "def main(argv):\n    return sum(int(x) for x in argv)  # 12345 67890\n",
    "The KV cache holds keys and values; tokens per second measures speed.",
] * 4
FEW_SHOT = ("Question: what colour is the sky? Answer: blue.\nQuestion: what is two plus two? Answer: four.\n"
            "Question: which animal barks? Answer: the dog.\n")
QUESTIONS = [
    ("Question: what is the capital of France? Answer:", [" Paris.", " London.", " blue.", " four."]),
    ("Question: which one is quick? Answer:", [" the fox.", " the dog.", " the cache.", " Paris."]),
    ("Question: what holds keys and values? Answer:", [" the KV cache.", " the fox.", " tokens.", " bits."]),
]
PARITY = 1e-3  # max abs difference in log-probabilities and pooled, normalised embeddings
# batched against one at a time: the same llama.cpp, sums in another order. A build on a BLAS
# library (`make mkl`) runs batches of 32 tokens or more through the library's kernels and smaller
# ones through ggml's, so a request's numbers move a little more with what it is batched with.
BATCHED = 1e-4 if blas() is None else 1e-3
# llama.cpp's CPU flash-attention kernel, and its f16 KV cache, round to f16 in ways that depend
# on how many tokens a ubatch holds and how many cells it attends over: on these large random
# weights that moves log-probabilities by up to 0.1 between a batched and a lone decode. The
# batching comparisons turn both off to be exact to float noise.
EXACT = dict(flash_attn=False, cache_type="f32")
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One llama.cpp thread: the machine is shared and these models are tiny."""
    import llmdesk.runtime.llama as rl

    monkeypatch.setattr(rl, "default_threads", lambda: 1)


# ---------------------------------------------------------------------------------------------
# a tiny real Llama: HF checkpoint, its f32 GGUF, and transformers as the reference


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("hf")
    ckpt = d / "ckpt"
    tok = train_bpe(TEXT, 320, pre="llama-bpe")
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=eos, eos_token_id=eos, initializer_range=0.15)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(ckpt)
    save_hf_tokenizer(tok, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    gguf = d / "tiny-f32.gguf"
    convert(ckpt, gguf, out_type="f32", check_with=LlamaModel)
    return {"ckpt": ckpt, "gguf": gguf, "model": model, "dir": d}


def hf_logprobs(hf: dict, tokens: list[int]) -> np.ndarray:
    """(n, n_vocab) float64 log-softmax of transformers' logits at every position."""
    with torch.no_grad():
        logits = hf["model"](torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def hf_states(hf: dict, tokens: list[int]) -> np.ndarray:
    """(n, n_embd) float64: the last hidden states, after the final norm (what llama.cpp pools)."""
    with torch.no_grad():
        return hf["model"].model(torch.tensor([tokens])).last_hidden_state[0].double().numpy()


def ref_scores(hf: dict, context: list[int], continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' log P(cont[i] | context + cont[:i]) and whether cont[i] is the argmax there."""
    lp = hf_logprobs(hf, context + continuation)
    rows = lp[len(context) - 1 : len(context) - 1 + len(continuation)]
    cont = np.asarray(continuation)
    return rows[np.arange(len(cont)), cont], rows.argmax(axis=1) == cont


@pytest.fixture(scope="module")
def hf_llama(hf):
    m = LlamaModel(hf["gguf"])
    yield m
    m.close()


@pytest.mark.parametrize("unified", [False, True], ids=["cache-per-slot", "unified-cache"])
def test_scores_match_transformers(hf, hf_llama, unified):
    few = hf_llama.tokenize(FEW_SHOT)
    pairs = []
    for q, choices in QUESTIONS:
        ctx = few + hf_llama.tokenize(q, add_special=False)
        pairs += [(ctx, hf_llama.tokenize(c, add_special=False)) for c in choices]
    # a continuation transformers itself would choose: greedy, four tokens after the context
    ctx = hf_llama.tokenize(QUESTIONS[0][0])
    greedy = []
    for _ in range(4):
        greedy.append(int(hf_logprobs(hf, ctx + greedy)[-1].argmax()))
    pairs.append((ctx, greedy))
    # an f32 KV cache and no flash attention, as the converter's parity test has (an f16 cache
    # alone moves logits ~1e-2; the CPU flash-attention kernel rounds queries to f16)
    with Engine(hf_llama, n_ctx=256, n_slots=4, cache_type="f32", flash_attn=False, kv_unified=unified) as eng:
        results = eng.score([ScoreRequest(c, k) for c, k in pairs]).wait()
        assert eng.seq_copies > 0  # the choices got their question's context from another slot
    for (c, k), r in zip(pairs, results):
        ref_lp, ref_greedy = ref_scores(hf, c, k)
        assert r.tokens == k and r.n_tokens == len(k)
        np.testing.assert_allclose(r.logprobs, ref_lp, rtol=0, atol=PARITY)
        assert r.logprob == pytest.approx(ref_lp.sum(), abs=PARITY * len(k))
        assert r.greedy == ref_greedy.tolist()
        assert r.is_greedy == bool(ref_greedy.all())
    assert results[-1].is_greedy  # the continuation transformers chose greedily
    assert not all(r.is_greedy for r in results[:-1])
    # acc as lm-evaluation-harness computes it: argmax of the summed log-probabilities
    for qi in range(len(QUESTIONS)):
        got = [r.logprob for r in results[4 * qi : 4 * qi + 4]]
        ref = [ref_scores(hf, *pairs[4 * qi + j])[0].sum() for j in range(4)]
        assert int(np.argmax(got)) == int(np.argmax(ref))


def test_prompt_logprobs_match_transformers(hf, hf_llama):
    toks = hf_llama.tokenize(TEXT[1] + " " + TEXT[3])
    ref = hf_logprobs(hf, toks)
    want = ref[np.arange(len(toks) - 1), toks[1:]]
    with Engine(hf_llama, n_ctx=256, n_slots=1, n_batch=16, cache_type="f32", flash_attn=False) as eng:  # several decodes
        r = eng.score([ScoreRequest(toks[:1], toks[1:], top_k=3)]).wait()[0]
    np.testing.assert_allclose(r.logprobs, want, rtol=0, atol=PARITY)
    for i, top in enumerate(r.top):
        assert [t for t, _ in top] == list(np.argsort(-ref[i])[:3])
        assert [lp for _, lp in top] == pytest.approx(sorted(ref[i])[::-1][:3], abs=PARITY)
    # the Python API, with the default f16 cache: the same tokens, the same numbers within its error
    with Model(hf["gguf"], ctx=256, threads=1) as m:
        lps = m.prompt_logprobs(toks, top_k=2)
        assert [t.token for t in lps] == toks[1:]
        np.testing.assert_allclose([t.logprob for t in lps], want, rtol=0, atol=5e-2)
        assert all(len(t.top) == 2 for t in lps)
        assert m.prompt_logprobs(toks[:1]) == []


# ---------------------------------------------------------------------------------------------
# batching, prefix reuse and the shared-context copy, on a random model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = write_llama_gguf(tmp_path_factory.mktemp("score") / "tiny.gguf", SynthConfig(n_layer=3))
    m = LlamaModel(path)
    yield m
    m.close()


def mc_requests(llama) -> list[ScoreRequest]:
    few = llama.tokenize(FEW_SHOT)
    out = []
    for q, choices in QUESTIONS:
        ctx = few + llama.tokenize(q, add_special=False)
        out += [ScoreRequest(ctx, llama.tokenize(c, add_special=False)) for c in choices]
    return out


def alone(llama, req: ScoreRequest):
    """One pair on a fresh Engine: every token computed, nothing reused or copied."""
    with Engine(llama, n_ctx=256, n_slots=1, **EXACT) as eng:
        r = eng.score([req]).wait()[0]
        assert r.n_cached == 0 and eng.seq_copies == 0
        return r, eng.steps


@pytest.mark.parametrize("unified", [False, True], ids=["cache-per-slot", "unified-cache"])
def test_batched_scoring_equals_one_at_a_time(llama, unified):
    reqs = mc_requests(llama)
    solo = [alone(llama, r) for r in reqs]
    with Engine(llama, n_ctx=256, n_slots=4, kv_unified=unified, **EXACT) as eng:
        batched = eng.score(reqs).wait()
        steps = eng.steps
        computed = eng.step_tokens
    for r, (s, _) in zip(batched, solo):
        np.testing.assert_allclose(r.logprobs, s.logprobs, rtol=1e-6, atol=BATCHED)
        assert r.greedy == s.greedy
    assert steps < sum(n for _, n in solo)  # several pairs per llama_decode
    # the few-shot prefix and each question's context were computed once, then reused or copied
    assert sum(r.n_cached for r in batched) >= (len(reqs) - 1) * len(llama.tokenize(FEW_SHOT))
    # the decodes computed exactly what no cache held: each pair's tokens less its reused ones
    assert computed == sum(len(q.context) + len(q.continuation) - 1 - r.n_cached for q, r in zip(reqs, batched))


@pytest.mark.parametrize("unified", [False, True], ids=["cache-per-slot", "unified-cache"])
def test_shared_context_copy_equals_recomputing(llama, unified):
    reqs = mc_requests(llama)[:4]  # one question's choices: the same context
    ctx_len = len(reqs[0].context)
    with Engine(llama, n_ctx=256, n_slots=4, kv_unified=unified, **EXACT) as eng:
        got = eng.score(reqs).wait()
        copies = eng.seq_copies
        # each sequence holds the context (copied, shared or computed) and its own choice
        for slot in eng.slots:
            assert C.llama_memory_seq_pos_max(eng.mem, slot.seq) == len(slot.cache) - 1
        # a second question after the first: in a unified cache the slots' old cells must not
        # stay beside the ones shared from another slot
        more = eng.score(mc_requests(llama)[4:8]).wait()
    for r, req in zip(more, mc_requests(llama)[4:8]):
        np.testing.assert_allclose(r.logprobs, alone(llama, req)[0].logprobs, rtol=1e-6, atol=BATCHED)
    # one slot computed the context; the others had it copied (llama_memory_seq_cp) or reused it
    assert copies >= 2
    assert [r.n_cached for r in got].count(ctx_len - 1) == 3
    for r, req in zip(got, reqs):
        s, _ = alone(llama, req)
        np.testing.assert_allclose(r.logprobs, s.logprobs, rtol=1e-6, atol=BATCHED)


def test_scoring_shares_decodes_with_generation(llama):
    prompt = llama.tokenize("The quick brown fox")
    with Engine(llama, n_ctx=256, n_slots=1, **EXACT) as eng:
        want = eng.submit(Request(prompt, max_tokens=12, sampling=GREEDY)).wait().tokens
    reqs = mc_requests(llama)
    with Engine(llama, n_ctx=256, n_slots=3, **EXACT) as eng:
        stream = eng.submit(Request(prompt, max_tokens=12, sampling=GREEDY))
        job = eng.score(reqs)
        results = job.wait()
        assert stream.wait().tokens == want
    for r, req in zip(results, reqs[:4]):
        np.testing.assert_allclose(r.logprobs, alone(llama, req)[0].logprobs, rtol=1e-6, atol=BATCHED)


def test_long_continuation_and_prefix_reuse(llama):
    """A continuation longer than a batch is scored over several decodes; a second job with
    the same context reuses the slot's cells."""
    ctx = llama.tokenize(FEW_SHOT)
    cont = llama.tokenize(" " + TEXT[0] + " " + TEXT[3], add_special=False)
    with Engine(llama, n_ctx=256, n_slots=1, n_batch=16, **EXACT) as eng:
        first = eng.score([ScoreRequest(ctx, cont)]).wait()[0]
        again = eng.score([ScoreRequest(ctx, cont[:5])]).wait()[0]
    assert first.n_cached == 0 and again.n_cached == len(ctx) - 1
    ref, _ = alone(llama, ScoreRequest(ctx, cont))
    np.testing.assert_allclose(first.logprobs, ref.logprobs, rtol=1e-6, atol=BATCHED)
    np.testing.assert_allclose(again.logprobs, ref.logprobs[:5], rtol=1e-6, atol=BATCHED)


def test_perplexity_is_prompt_logprobs(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", SynthConfig(weight_std=0.05))
    text = " ".join(TEXT[:4])
    with Model(path, ctx=512, threads=1) as m:
        lps = m.prompt_logprobs(text)
        n = len(m.tokenize(text))
    r = perplexity(path, text, ctx=n)  # one window over the whole text
    assert r.tokens == len(lps) == n - 1
    assert r.ppl == pytest.approx(math.exp(-np.mean([t.logprob for t in lps])), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the Python API: text pairs split as lm-evaluation-harness splits them


def test_model_score_splits_text_like_lm_eval(llama):
    with Model(llama.path, ctx=256, threads=1) as m:
        ctx, cont = m.score_tokens("Question: two plus two? Answer:", " four")
        whole = m.tokenize("Question: two plus two? Answer: four")
        assert ctx == m.tokenize("Question: two plus two? Answer:") and cont == whole[len(ctx):]
        # trailing spaces of the context belong to the continuation (lm-eval's _encode_pair)
        assert m.score_tokens("Answer: ", "four") == m.score_tokens("Answer:", " four")
        # an empty context is the prefix token: BOS
        assert m.score_tokens("", "four") == ([m.llama.bos], m.tokenize("four", add_special=False))
        texts = [(FEW_SHOT + q, c) for q, cs in QUESTIONS for c in cs]
        by_text = m.score(texts)
        by_ids = m.score([m.score_tokens(c, k) for c, k in texts])
        assert [r.tokens for r in by_text] == [r.tokens for r in by_ids]
        # the second pass reuses the cached prefixes: flash attention's f16 rounding moves the numbers a little
        for a, b in zip(by_text, by_ids):
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-2)
        lp, greedy = m.loglikelihood(*texts[0])
        assert lp == pytest.approx(by_text[0].logprob, rel=1e-2) and greedy == by_text[0].is_greedy
        with pytest.raises(LlmdeskError, match="both as text or both"):
            m.score([("context", [1, 2])])


def test_score_reads_special_tokens_like_the_hf_tokenizer(hf):
    # a chat-formatted context: lm-eval's Hugging Face tokenizer reads <|im_start|> as one token
    tok = transformers.AutoTokenizer.from_pretrained(hf["ckpt"])
    context, continuation = "<|im_start|>user\nwhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", "four"
    with Model(hf["gguf"], ctx=256, threads=1) as m:
        ctx, cont = m.score_tokens(context, continuation)
    # (the context's trailing newline moves to the continuation, as lm-eval's _encode_pair moves it)
    assert ctx == tok.encode(context.rstrip()) and tok.convert_ids_to_tokens(ctx[:1]) == ["<|im_start|>"]
    assert ctx + cont == tok.encode(context + continuation)


def test_bad_score_requests(llama):
    with Engine(llama, n_ctx=32, n_slots=1) as eng:
        with pytest.raises(InvalidRequest, match="empty context"):
            eng.score([ScoreRequest([], [1])])
        with pytest.raises(InvalidRequest, match="nothing to score"):
            eng.score([ScoreRequest([1], [])])
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            eng.score([ScoreRequest([1], [10**6])])
        with pytest.raises(InvalidRequest, match="top_logprobs"):
            eng.score([ScoreRequest([1], [2], top_k=1000)])
        with pytest.raises(ContextOverflow, match="32"):
            eng.score([ScoreRequest([1] * 30, [2] * 4)])
        assert eng.score([]).wait() == []
        assert eng.score([ScoreRequest([1] * 30, [2] * 3)]).wait()[0].n_tokens == 3  # 32 tokens fit


# ---------------------------------------------------------------------------------------------
# cancelling and time limits


def test_cancel_a_waiting_and_a_running_job(llama):
    reqs = mc_requests(llama)
    with Engine(llama, n_ctx=256, n_slots=1, **EXACT) as eng:
        busy = eng.submit(Request(llama.tokenize("The quick"), max_tokens=None, sampling=GREEDY, ignore_eos=True))
        queued = eng.score(reqs)  # the only slot is generating: the job waits
        limited = eng.score(reqs, time_limit=0.05)
        queued.cancel()
        with pytest.raises(LlmdeskError, match="cancelled"):
            queued.wait()
        assert queued.n_done == 0
        with pytest.raises(LlmdeskError, match="time limit"):
            limited.wait()
        busy.cancel()  # (on a fast machine it may have filled its 256 tokens already)
        assert busy.wait().finish_reason in ("cancelled", "length")
        # a long job, cancelled once it has started: it ends, and frees its slot and cells
        big = eng.score(reqs * 500)
        while big.n_done == 0 and not big.done.is_set():
            time.sleep(0.001)
        big.cancel()
        with pytest.raises(LlmdeskError, match="cancelled"):
            big.wait()
        assert big.n_done < len(reqs) * 500
        while eng.busy_slots:
            time.sleep(0.01)
        assert C.llama_memory_seq_pos_max(eng.mem, 0) == -1
        # and the Engine scores on
        r = eng.score(reqs[:1]).wait()[0]
    np.testing.assert_allclose(r.logprobs, alone(llama, reqs[0])[0].logprobs, rtol=1e-6, atol=BATCHED)


# ---------------------------------------------------------------------------------------------
# embeddings: batched, with the model's pooling

EMBED_TEXTS = ["The quick brown fox", "Hello, world! How are you today?", "def main(): return 0",
               "Quantization stores weights in fewer bits", "The KV cache holds the keys", "Tokens per second",
               " ".join(TEXT[:2])]  # the last is longer than one embeddings decode (n_batch 64)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_batched_embeddings_equal_one_at_a_time(tmp_path, pooling, monkeypatch):
    # an idle Engine's embeddings decode may take as long as it needs: on a loaded machine the
    # default slice (EMBED_SLICE_S) would cut the texts into pieces, and this is about packing
    monkeypatch.setattr(engine_mod, "EMBED_SLICE_S", 60.0)
    path = write_llama_gguf(tmp_path / f"{pooling}.gguf", SynthConfig(n_layer=2, pooling=pooling, seed=3))
    m = LlamaModel(path)
    try:
        assert m.pooling == pooling
        toks = [m.tokenize(t) for t in EMBED_TEXTS]
        assert len(toks[-1]) > 64 > sum(len(t) for t in toks[:-1]) / 2
        with Engine(m, n_ctx=256, n_slots=1, n_batch=64, **EXACT) as eng:
            together = eng.embed(toks).wait()
            steps = eng.steps
            apart = [eng.embed([t]).wait()[0] for t in toks]
            assert eng.pooling == pooling
        assert steps < len(toks)  # several texts per decode
        for a, b in zip(together, apart):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert not np.allclose(together[0], together[1], atol=1e-3)
    finally:
        m.close()


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embeddings_beside_a_generation_come_in_small_pieces_and_the_same(tmp_path, pooling, monkeypatch):
    """While a slot generates, an embeddings decode takes about one generation step's time (a
    text in pieces), so a flood of embeddings cannot stall chats; the vectors do not change."""
    monkeypatch.setattr(engine_mod, "EMBED_SLICE_S", 60.0)  # alone: whole texts whatever the load
    path = write_llama_gguf(tmp_path / f"{pooling}.gguf", SynthConfig(n_layer=2, pooling=pooling, seed=3))
    m = LlamaModel(path)
    try:
        toks = [m.tokenize(t) for t in EMBED_TEXTS]
        with Engine(m, n_ctx=256, n_slots=1, n_batch=64, **EXACT) as eng:
            alone = eng.embed(toks).wait()
            steps = eng.steps
            busy = eng.submit(Request([1, 2, 3], max_tokens=None, sampling=GREEDY, ignore_eos=True))
            while not busy.result.n_gen:
                time.sleep(0.001)
            beside = eng.embed(toks).wait()
            assert eng._embed_room_now < eng._embed_room  # the last embeddings decode was a small one
            embed_steps_alone = steps
            busy.cancel()
            busy.wait()
        for a, b in zip(alone, beside):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert embed_steps_alone < len(toks)  # alone: several texts per decode
    finally:
        m.close()


def with_pooling(src: Path, dst: Path, pooling: str) -> Path:
    """A copy of a GGUF with `{arch}.pooling_type` set (gguf's own metadata copier)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    key = f"{arch}.pooling_type"
    copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.UINT32,
                                                                 int(gguf.PoolingType[pooling.upper()]))}, [])
    return dst


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embeddings_match_transformers(hf, pooling):
    path = with_pooling(hf["gguf"], hf["dir"] / f"tiny-{pooling}.gguf", pooling)
    m = LlamaModel(path)
    try:
        toks = [m.tokenize(t) for t in EMBED_TEXTS]
        with Engine(m, n_ctx=256, n_slots=1, n_batch=64, cache_type="f32", flash_attn=False) as eng:
            got = eng.embed(toks).wait()
    finally:
        m.close()
    for t, v in zip(toks, got):
        h = hf_states(hf, t)
        ref = {"mean": h.mean(axis=0), "cls": h[0], "last": h[-1]}[pooling]
        ref = ref / np.linalg.norm(ref)
        np.testing.assert_allclose(v, ref, rtol=0, atol=PARITY)
