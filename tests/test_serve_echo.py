"""Prompt log-probabilities through the server: /v1/completions with `echo` and `logprobs`, driven
by the official `openai` client over real HTTP on 127.0.0.1, checked against the Python API and
against logits computed directly with llama.cpp; vLLM's tokenizer routes; RemoteModel.score."""

from __future__ import annotations

import math
import shutil

import gguf
import httpx
import numpy as np
import openai
import pytest
from test_serve_util import running

import llmdesk
from llmdesk.errors import LlmdeskError
from llmdesk.runtime import llama as L

TOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog. The KV cache"


def with_bos(src, path):
    """A copy of the GGUF `src` with `tokenizer.ggml.add_bos_token` set: llama.cpp then reads its
    texts after a BOS, as it reads Llama 2's or Gemma's."""
    shutil.copy(src, path)
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = 1
    del reader  # flushes the memory map
    return path


@pytest.fixture(scope="module")
def bos_gguf(tiny_gguf, tmp_path_factory):
    return with_bos(tiny_gguf, tmp_path_factory.mktemp("bos") / "tiny_bos.gguf")


@pytest.fixture(scope="module")
def server(tiny_gguf, bos_gguf):
    with running(None, models=[str(tiny_gguf), str(bos_gguf)], parallel=4, ctx=256) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_gguf):
    with llmdesk.load(tiny_gguf, ctx=256) as m:
        yield m


@pytest.fixture(scope="module")
def local_bos(bos_gguf):
    with llmdesk.load(bos_gguf, ctx=256) as m:
        yield m


def direct_logprobs(model, tokens: list[int]) -> np.ndarray:
    """(len(tokens), n_vocab) float64: log-softmax of llama.cpp's logits at every position of
    `tokens`, computed in one decode with the project's llama.cpp wrapper, no Engine involved."""
    ctx = L.new_context(model.llama, n_ctx=256, n_batch=256, n_threads=1)
    batch = L.Batch(len(tokens))
    try:
        for pos, t in enumerate(tokens):
            batch.add(t, pos, 0, output=True)
        assert L.decode(ctx, batch) == 0
        x = L.output_logits(ctx, batch, model.llama.n_vocab).astype(np.float64)
    finally:
        batch.free()
        L.free_context(ctx)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def expected(model, tokens: list[int]) -> list[float]:
    """log P(tokens[i] | tokens[:i]) for i >= 1, directly."""
    lp = direct_logprobs(model, tokens)
    return [float(lp[i - 1, t]) for i, t in enumerate(tokens) if i]


def close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOL for x, y in zip(a, b))


def test_string_prompt_matches_python_api_and_llama_cpp(client, local):
    r = client.completions.create(model="tiny.gguf", prompt=TEXT, echo=True, logprobs=3, max_tokens=0)
    choice = r.choices[0]
    lp = choice.logprobs
    tokens = local.tokenize(TEXT)  # this model adds no BOS: these are the text's tokens
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokens) and r.usage.completion_tokens == 0
    assert lp.tokens == [local.llama.piece(t, special=True).decode() for t in tokens]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # the same numbers as the Python API and as llama.cpp's logits, log-softmaxed here
    assert close(lp.token_logprobs[1:], [t.logprob for t in local.prompt_logprobs(TEXT)])
    direct = direct_logprobs(local, tokens)
    assert close(lp.token_logprobs[1:], expected(local, tokens))
    # text_offset: where each token starts in the echoed text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(tokens))]
    assert all(TEXT[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    # top_logprobs: the 3 most likely tokens there, and the prompt's own token
    for i in range(1, len(tokens)):
        top = lp.top_logprobs[i]
        best = np.argsort(-direct[i - 1])[:3]
        want: dict[str, float] = {}
        for t in best:  # most likely first; byte tokens written alike ("\ufffd") keep the likeliest's value
            want.setdefault(local.llama.piece(int(t), special=True).decode("utf-8", "replace"), direct[i - 1, t])
        assert set(want) <= set(top) and len(top) <= 4 and lp.tokens[i] in top
        assert all(abs(top[k] - v) <= TOL for k, v in want.items())
        assert abs(top[lp.tokens[i]] - lp.token_logprobs[i]) <= TOL


def test_token_id_prompt_is_used_as_given(client, local, local_bos):
    ids = local.tokenize(TEXT)[:12]
    for name, model in (("tiny.gguf", local), ("tiny_bos.gguf", local_bos)):
        # no BOS is put in front of token ids, even for a model that reads texts after one
        lp = client.completions.create(model=name, prompt=ids, echo=True, logprobs=1, max_tokens=0).choices[0].logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        assert close(lp.token_logprobs[1:], expected(model, ids))
        assert close(lp.token_logprobs[1:], [t.logprob for t in model.prompt_logprobs(ids)])


def test_bos_added_to_a_text_is_not_reported(client, local_bos):
    r = client.completions.create(model="tiny_bos.gguf", prompt=TEXT, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    read = local_bos.tokenize(TEXT)
    assert read[0] == local_bos.llama.bos and r.usage.prompt_tokens == len(read)
    own = read[1:]  # what the client's tokenizer gives for the text (lm-eval: add_special_tokens=False)
    assert lp.tokens == [local_bos.llama.piece(t, special=True).decode() for t in own] and lp.text_offset[0] == 0
    # the text's first token has its log-probability given the BOS, not null
    assert lp.token_logprobs[0] is not None and lp.top_logprobs[0] is not None
    assert close(lp.token_logprobs, expected(local_bos, read))
    assert close(lp.token_logprobs, [t.logprob for t in local_bos.prompt_logprobs(TEXT)])


def test_many_prompts_and_one_generated_token(client, local):
    texts = ["Hello world", "The KV cache is", TEXT, "Tokens"]
    single = [client.completions.create(model="tiny.gguf", prompt=t, echo=True, logprobs=2, max_tokens=0)
              .choices[0].logprobs for t in texts]
    many = client.completions.create(model="tiny.gguf", prompt=texts, echo=True, logprobs=2, max_tokens=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and [c.text for c in many.choices] == texts
    for c, one in zip(many.choices, single):
        assert c.logprobs.tokens == one.tokens and c.logprobs.text_offset == one.text_offset
        assert c.logprobs.token_logprobs[0] is None and close(c.logprobs.token_logprobs[1:], one.token_logprobs[1:])
    # token-id prompts, several, with one token generated after each (what lm-eval's local-completions sends)
    ids = [local.tokenize(t) for t in texts]
    r = client.completions.create(model="tiny.gguf", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    for c, toks, one in zip(r.choices, ids, single):
        lp = c.logprobs
        assert len(lp.tokens) == len(toks) + 1 and close(lp.token_logprobs[1:-1], one.token_logprobs[1:])
        # the generated token: the most likely one after the prompt (greedy), with its log-probability
        after = direct_logprobs(local, toks)[-1]
        best = int(np.argmax(after))
        assert lp.tokens[-1] == local.llama.piece(best, special=True).decode("utf-8", "replace")
        assert abs(lp.token_logprobs[-1] - after[best]) <= TOL
        assert c.text == local.detokenize(toks, special=True) + local.detokenize([best])
        assert lp.text_offset[-1] == len(local.detokenize(toks, special=True))
    assert r.usage.completion_tokens == len(texts)


def test_streamed_echo_equals_the_answer(client):
    kw = dict(model="tiny.gguf", prompt="The quick brown fox", echo=True, logprobs=2, max_tokens=4, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    got = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert got[0] is None and close(got[1:], whole.logprobs.token_logprobs[1:])
    offsets = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_text_offset_counts_characters(client):
    text = "Crème brûlée, s'il vous plaît"  # characters split over several byte tokens
    lp = client.completions.create(model="tiny.gguf", prompt=text, echo=True, logprobs=0,
                                   max_tokens=0).choices[0].logprobs
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    # a token's offset is where its text starts, counting whole characters
    whole = [(o, t) for o, t in zip(lp.text_offset, lp.tokens) if "\ufffd" not in t]
    assert whole and all(text[o:].startswith(t) for o, t in whole)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs 0: the token's own only


def test_bad_requests_are_one_line_400s(client, local):
    too_long = " ".join(["fox"] * 300)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny.gguf", prompt=["Hello", too_long], echo=True, logprobs=1, max_tokens=0)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    n = len(local.tokenize(too_long))
    assert f"prompt 1 has {n} tokens" in err["message"] and "256" in err["message"] and "\n" not in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny.gguf", prompt="Hello", echo=True, logprobs=21, max_tokens=0)
    assert e.value.body["param"] == "logprobs" and "20" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny.gguf", prompt=[[5, 10**6]], echo=True, logprobs=1, max_tokens=0)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny.gguf", prompt="Hello", echo=True, logprobs=1, max_tokens=0,
                                  extra_body={"truncate": True})
    assert e.value.body["param"] == "truncate"
    # the server goes on answering
    assert client.completions.create(model="tiny.gguf", prompt="Hello", echo=True, logprobs=1, max_tokens=0).choices


def test_tokenizer_routes_round_trip(server, local):
    url = server.url
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["bos_token"] == "<s>" and info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 256
    assert "<|im_start|>" in info["chat_template"]
    r = httpx.post(url + "/tokenize", json={"model": "tiny.gguf", "prompt": TEXT}).json()
    assert r["tokens"] == local.tokenize(TEXT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    back = httpx.post(url + "/detokenize", json={"model": "tiny.gguf", "tokens": r["tokens"]}).json()
    assert back == {"prompt": TEXT}
    # what lm-eval's remote tokenizer sends: no model, no special tokens added; special tokens in
    # the text are read as themselves (its bos_token_id is tokenize(bos_token)[0])
    r = httpx.post(url + "/tokenize", json={"prompt": "<s>", "add_special_tokens": False}).json()
    assert r["tokens"] == [local.llama.bos]
    bos = httpx.post(url + "/tokenize", json={"model": "tiny_bos.gguf", "prompt": "Hi"}).json()["tokens"]
    assert bos[0] == local.llama.bos and bos[1:] == local.tokenize("Hi")
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == local.chat_tokens([{"role": "user", "content": "Hi"}])
    for path, body in (("/tokenize", {"prompt": "x", "messages": []}), ("/detokenize", {"tokens": [-1]}),
                       ("/tokenize", {"model": "nope", "prompt": "x"})):
        bad = httpx.post(url + path, json=body)
        assert bad.status_code in (400, 404) and "\n" not in bad.json()["error"]["message"]


def test_remote_score_equals_local_score(server, local):
    pairs = [("Question: what is the capital of France? Answer:", " Paris"),
             ("Question: what is the capital of France? Answer:", " London"),
             ("The quick brown fox ", "jumps over the lazy dog"),  # a space moves to the continuation
             ("Hello", " world, how are you?")]
    want = local.score(pairs)
    with llmdesk.load(f"openai:{server.url}/v1#tiny.gguf") as remote:
        got = remote.score(pairs, batch=3)  # two requests
        assert [g.tokens for g in got] == [[local.llama.piece(t).decode() for t in w.tokens] for w in want]
        for g, w in zip(got, want):
            assert math.isclose(g.logprob, w.logprob, abs_tol=TOL) and g.is_greedy == w.is_greedy
            assert close(g.logprobs, w.logprobs) and g.greedy == w.greedy
        lp, greedy = remote.loglikelihood(*pairs[0])
        assert math.isclose(lp, local.loglikelihood(*pairs[0])[0], abs_tol=TOL)
        # what the endpoint refuses is one line naming the problem
        with pytest.raises(LlmdeskError) as e:
            remote.score([("Hello", " fox" * 300)])
        assert "more than the context holds (256)" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(LlmdeskError, match="pair 0: a remote model scores"):
            remote.score([([1, 2], [3])])


def test_one_token_generated_by_sampling_or_greedily(client, local):
    """lm-eval's request (greedy, one token) takes the token from the scores; anything else
    (a stop string, sampling, streaming) generates it: the same token and numbers when greedy."""
    ids = local.tokenize(TEXT)
    kw = dict(model="tiny.gguf", prompt=ids, echo=True, logprobs=2, max_tokens=1, temperature=0)
    from_scores = client.completions.create(**kw).choices[0]
    generated = client.completions.create(**kw, stop=["never in this text"]).choices[0]
    assert from_scores.text == generated.text and from_scores.logprobs.tokens == generated.logprobs.tokens
    assert close(from_scores.logprobs.token_logprobs[1:], generated.logprobs.token_logprobs[1:])
    assert from_scores.logprobs.text_offset == generated.logprobs.text_offset
    assert set(from_scores.logprobs.top_logprobs[-1]) == set(generated.logprobs.top_logprobs[-1])
    streamed = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.text for c in streamed) == from_scores.text
    # sampled (temperature, top-k, min-p): the token drawn, reported with its log-probability there
    after = direct_logprobs(local, ids)[-1]
    for seed in range(3):
        c = client.completions.create(**{**kw, "temperature": 1.5, "seed": seed}).choices[0]
        token = c.logprobs.tokens[-1]
        drawn = [t for t in range(local.llama.n_vocab)
                 if local.llama.piece(t, special=True).decode("utf-8", "replace") == token]
        assert any(abs(after[t] - c.logprobs.token_logprobs[-1]) <= TOL for t in drawn)
        assert len(c.logprobs.tokens) == len(ids) + 1 and c.logprobs.text_offset[-1] == len(local.detokenize(ids))
