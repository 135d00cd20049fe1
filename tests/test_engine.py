"""The Engine: continuous batching over slots must give exactly what each request gets alone."""

import time

import llama_cpp as C
import pytest

from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.runtime.engine import ContextOverflow, Engine, Request, SamplingParams, _TextOut
from llmdesk.runtime.llama import LlamaModel

PROMPTS = [
    "The quick brown fox",
    "Hello, world! How are you today?",
    "Tokens per second measures speed.",
    "def main(): return 0",
    "Quantization stores weights in fewer bits",
    "The KV cache holds the keys",
]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = write_llama_gguf(tmp_path_factory.mktemp("engine") / "tiny.gguf", SynthConfig(n_layer=3))
    model = LlamaModel(path)
    yield model
    model.close()


def solo_runs(llama, prompts, max_tokens=20, **kw):
    with Engine(llama, n_ctx=256, n_slots=1, **kw) as eng:
        return [eng.submit(Request(llama.tokenize(p), max_tokens=max_tokens, sampling=GREEDY)).wait().tokens
                for p in prompts]


def test_concurrent_greedy_equals_solo(llama):
    alone = solo_runs(llama, PROMPTS)
    assert len({tuple(t) for t in alone}) > 1, "prompts should lead to different outputs"
    # more requests than slots: some wait, then join the running batch as others leave
    with Engine(llama, n_ctx=256, n_slots=3) as eng:
        streams = [eng.submit(Request(llama.tokenize(p), max_tokens=20 - i, sampling=GREEDY))
                   for i, p in enumerate(PROMPTS)]
        results = [s.wait() for s in streams]
        steps = eng.steps
    for i, (r, solo) in enumerate(zip(results, alone)):
        assert r.finish_reason == "length"
        assert r.tokens == solo[: 20 - i]
    # batched: far fewer decode calls than tokens generated
    assert steps < sum(r.n_gen for r in results)


def test_chunked_prefill_matches_one_chunk(llama):
    long_prompt = " ".join(PROMPTS * 4)
    toks = llama.tokenize(long_prompt)
    assert len(toks) > 64
    big = solo_runs(llama, [long_prompt], n_batch=512)
    small = solo_runs(llama, [long_prompt], n_batch=16)
    assert big == small


def test_prefix_reuse(llama):
    first = llama.tokenize(PROMPTS[1])
    follow = llama.tokenize(PROMPTS[1] + " " + PROMPTS[2])
    fresh = solo_runs(llama, [PROMPTS[1] + " " + PROMPTS[2]])[0]
    with Engine(llama, n_ctx=256, n_slots=2) as eng:
        eng.submit(Request(first, max_tokens=5, sampling=GREEDY)).wait()
        r = eng.submit(Request(follow, max_tokens=20, sampling=GREEDY)).wait()
        again = eng.submit(Request(follow, max_tokens=20, sampling=GREEDY)).wait()
    common = next(i for i, (a, b) in enumerate(zip(first, follow)) if a != b) if follow[: len(first)] != first else len(first)
    assert r.n_cached == common > 0
    assert r.tokens == fresh  # reuse changes nothing in the result
    assert again.n_cached == len(follow) - 1  # everything but the last token, which gives the logits
    assert again.tokens == fresh


def test_cancel_frees_slot_and_cells(llama):
    with Engine(llama, n_ctx=256, n_slots=1) as eng:
        s = eng.submit(Request(llama.tokenize(PROMPTS[0]), max_tokens=None, sampling=GREEDY, ignore_eos=True))
        for i, _ in enumerate(s):
            if i == 3:
                break  # dropping the iterator cancels the request
        s.done.wait(10)
        assert s.result.finish_reason == "cancelled"
        deadline = time.time() + 5
        while eng.busy_slots and time.time() < deadline:
            time.sleep(0.01)
        assert eng.busy_slots == 0
        assert C.llama_memory_seq_pos_max(eng.mem, 0) == -1  # the KV cells are free
        # the slot serves the next request
        r = eng.submit(Request(llama.tokenize(PROMPTS[1]), max_tokens=5, sampling=GREEDY)).wait()
        assert r.n_gen == 5 and r.n_cached == 0


def test_cancel_while_waiting(llama):
    with Engine(llama, n_ctx=256, n_slots=1) as eng:
        busy = eng.submit(Request(llama.tokenize(PROMPTS[0]), max_tokens=200, sampling=GREEDY, ignore_eos=True))
        queued = eng.submit(Request(llama.tokenize(PROMPTS[1]), max_tokens=5, sampling=GREEDY))
        queued.cancel()
        assert queued.wait().finish_reason == "cancelled"
        assert queued.result.n_gen == 0
        busy.cancel()
        assert busy.wait().finish_reason == "cancelled"


def test_context_limits(llama):
    with Engine(llama, n_ctx=32, n_slots=2) as eng:
        with pytest.raises(ContextOverflow, match="32"):
            eng.submit(Request(llama.tokenize(" ".join(PROMPTS)), max_tokens=4))
        toks = llama.tokenize(PROMPTS[0])
        r = eng.submit(Request(toks, max_tokens=None, sampling=GREEDY, ignore_eos=True)).wait()
        assert r.finish_reason == "length"
        assert len(toks) + r.n_gen == 32  # filled the slot's context, not more


def test_seed_determinism(llama):
    def sample(seed):
        with Engine(llama, n_ctx=128, n_slots=1) as eng:
            sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
            return eng.submit(Request(llama.tokenize(PROMPTS[0]), max_tokens=30, sampling=sp)).wait().tokens

    assert sample(42) == sample(42)
    assert sample(42) != sample(7)


def test_logprobs(llama):
    with Engine(llama, n_ctx=128, n_slots=1) as eng:
        s = eng.submit(Request(llama.tokenize(PROMPTS[2]), max_tokens=8, sampling=GREEDY, logprobs=5))
        events = list(s)
    assert len(events) == 8
    for ev in events:
        assert len(ev.top_logprobs) == 5
        lps = [lp for _, lp in ev.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert all(lp <= 0 for lp in lps)
        # greedy picks the most likely token, and its logprob is the top one
        assert ev.top_logprobs[0][0] == ev.token
        assert ev.logprob == pytest.approx(lps[0])


def test_stop_string_across_tokens():
    out = _TextOut(["STOP"])
    shown = [out.feed(p) for p in (b"hello S", b"T", b"OP and more")]
    assert "".join(shown) == "hello "
    assert out.hit == "STOP"
    assert out.flush() == ""


def test_text_out_holds_back_partial_utf8_and_prefixes():
    out = _TextOut(["</end>"])
    euro = "€".encode()
    assert out.feed(euro[:1]) == ""  # half a character waits
    assert out.feed(euro[1:] + b" <") == "€ "  # "<" might start the stop string
    assert out.feed(b"b>") == "<b>"  # it did not
    assert out.flush() == ""
    assert out.hit is None and out.text == "€ <b>"
