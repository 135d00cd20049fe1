"""The Python API a user scripts against: llmdesk.load(...) and the Model's methods."""

import math

import pytest

import llmdesk
from llmdesk.errors import BadModelFile, LlmdeskError, ModelNotFound


@pytest.fixture(scope="module")
def model(tiny_gguf):
    m = llmdesk.load(tiny_gguf, ctx=512)
    yield m
    m.close()


def test_generate_equals_joined_stream(model):
    kw = dict(max_tokens=24, temperature=0)
    text = model.generate("The quick brown fox", **kw)
    assert text
    assert "".join(model.stream("The quick brown fox", **kw)) == text
    # sampled too: the same seed gives the same pieces
    kw = dict(max_tokens=24, temperature=0.9, seed=3)
    assert "".join(model.stream("Hello", **kw)) == model.generate("Hello", **kw)


def test_seed_and_greedy_determinism(model):
    a = model.generate("Hello", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=11)
    b = model.generate("Hello", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=11)
    c = model.generate("Hello", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=12)
    assert a == b
    assert a != c
    assert model.generate("Hello", max_tokens=20, temperature=0) == model.generate("Hello", max_tokens=20, temperature=0)


def test_stop_strings(model):
    full = model.generate("The quick brown fox", max_tokens=30, temperature=0)
    # stop on a piece of the greedy answer: the answer is cut right before it
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    assert len(stop.strip()) >= 1
    c = model.complete("The quick brown fox", max_tokens=30, temperature=0, stop=[stop])
    assert c.finish_reason == "stop"
    assert c.text == full[: full.index(stop)]
    assert stop not in c.text


def test_completion_counts(model):
    c = model.complete("Hello, world!", max_tokens=7, temperature=0)
    assert c.finish_reason == "length"
    assert c.completion_tokens == 7
    assert c.prompt_tokens == len(model.tokenize("Hello, world!"))
    assert c.tokens_per_second > 0 and c.ttft_s > 0


def test_tokenize_roundtrip(model):
    text = "Hello, world! Ünïcode ✓ and code: def f(x): return x**2\n\ttabs"
    toks = model.tokenize(text, add_special=False)
    assert model.detokenize(toks) == text
    # special tokens are parsed only when asked
    assert len(model.tokenize("<|im_start|>", add_special=False, parse_special=True)) == 1
    assert len(model.tokenize("<|im_start|>", add_special=False)) > 1


def test_logprobs(model):
    c = model.complete("Hello", max_tokens=5, temperature=0, logprobs=3)
    assert len(c.logprobs) == 5
    for t in c.logprobs:
        assert t.logprob <= 0
        assert len(t.top) == 3
        assert t.top[0] == (t.text, pytest.approx(t.logprob))
    assert sum(math.exp(p) for _, p in c.logprobs[0].top) <= 1.0 + 1e-6


def test_chat_uses_the_models_template(model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = model.render_chat(msgs)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert model.template.origin.startswith("from the model")
    toks = model.chat_tokens(msgs)
    assert toks[0] == model.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]
    reply = model.chat(msgs, max_tokens=10, temperature=0)
    assert reply == model.generate(toks, max_tokens=10, temperature=0, stop=["<|im_end|>"])
    assert "".join(model.chat_stream(msgs, max_tokens=10, temperature=0)) == reply


def test_embed(model):
    a, b, a2 = model.embed(["The quick brown fox", "def main(): return 0", "The quick brown fox"])
    assert len(a) == model.llama.n_embd
    assert sum(x * x for x in a) == pytest.approx(1.0)
    assert a == pytest.approx(a2)
    assert a != pytest.approx(b)


def test_bad_arguments(model):
    with pytest.raises(LlmdeskError, match="temperature"):
        model.generate("x", temperature=-1)
    with pytest.raises(LlmdeskError, match="top_p"):
        model.generate("x", top_p=2)
    with pytest.raises(LlmdeskError, match="context"):
        model.generate("word " * 600)


def test_load_errors(tmp_path):
    with pytest.raises(ModelNotFound):
        llmdesk.load(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(BadModelFile, match="bad.gguf"):
        llmdesk.load(bad)


def test_repeat_penalty_discourages_repeats(model):
    def tokens(**kw):
        return model.start("Hello", max_tokens=60, temperature=0, ignore_eos=True, **kw).wait().tokens

    plain, penalised = tokens(), tokens(repeat_penalty=1.8)
    assert len(penalised) == 60
    # a strong penalty over the last 64 tokens leaves fewer repeated tokens
    assert len(set(penalised)) > len(set(plain))
