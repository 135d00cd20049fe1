"""Per-request LoRA adapters in `llmdesk serve`: one base loaded once, two real PEFT adapters
(test_lora's tiny Llama and its LoRA GGUFs) loaded beside it, chosen per request by model name
(`BASE+NAME`) or an `adapters` field, through the official `openai` and `ollama` clients over
real HTTP. Each set answers as the base with that set applied for the whole model
(`Model(lora=...)`, what `llmdesk run --lora` runs), alone or mixed with other sets in flight.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import ollama
import openai
import pytest

import llmdesk
from llmdesk.formats.lora_gguf import write_lora_gguf
from llmdesk.serve.config import parse_lora

from test_lora import PROMPT, cli, other_base, peft_model, tuned  # noqa: F401  (fixtures)
from test_engine_scoring import hf, one_thread  # noqa: F401  (fixtures)
from test_serve_util import running

N = 12  # greedy tokens per answer
CTX = 256
PROMPTS = [PROMPT, "Keys and values sit in the cache of every layer.", "The lazy dog sleeps."]


@pytest.fixture(scope="module")
def adapters(hf, tuned):
    """Two adapters for the base: 'style' (test_lora's) and 'terse' (another seed; named by its file)."""
    pm = peft_model(hf["ckpt"], seed=3)
    pm.save_pretrained(hf["dir"] / "adapter-terse")
    terse = write_lora_gguf(hf["dir"] / "adapter-terse", hf["ckpt"], hf["dir"] / "terse.gguf")
    return {"style": tuned["lora"], "terse": terse}


SETS = {"base": [], "style": ["style"], "terse": ["terse"], "style+terse": ["style", "terse"]}


@pytest.fixture(scope="module")
def expected(hf, adapters):
    """Every set's greedy answers and log-probabilities from the base with that set applied to
    the whole model, as `llmdesk run --lora` runs it."""
    out = {}
    for key, names in SETS.items():
        with llmdesk.Model(hf["gguf"], ctx=CTX, threads=1, lora=[(adapters[n], 1.0) for n in names]) as m:
            out[key] = {"text": [m.generate(p, temperature=0, max_tokens=N, ignore_eos=True) for p in PROMPTS],
                        "logprobs": [t.logprob for t in m.complete(PROMPT, temperature=0, max_tokens=N,
                                                                    ignore_eos=True, logprobs=0).logprobs],
                        "prompt": [t.logprob for t in m.prompt_logprobs(PROMPT)]}
    assert len({tuple(v["text"]) for v in out.values()}) == len(SETS)  # the adapters matter
    return out


@pytest.fixture(scope="module")
def server(hf, adapters):
    lora = parse_lora([f"style={adapters['style']}", str(adapters["terse"])])
    with running(hf["gguf"], parallel=4, ctx=CTX, lora=lora) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


BASE = "tiny-f32"


def complete(client, prompt: str, model: str = BASE, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0,
                                     extra_body={"ignore_eos": True, **kw.pop("extra_body", {})}, **kw)


def test_models_list_the_adapters(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-f32.gguf", "tiny-f32.gguf+style", "tiny-f32.gguf+terse"]
    assert client.models.retrieve("tiny-f32+style").id == "tiny-f32.gguf+style"
    tags = [(m.model, m.details.parent_model) for m in ollama.Client(host=server.url).list().models]
    assert tags == [("tiny-f32.gguf", ""), ("tiny-f32.gguf+style", "tiny-f32.gguf"),
                    ("tiny-f32.gguf+terse", "tiny-f32.gguf")]


@pytest.mark.parametrize("key", list(SETS))
def test_model_name_and_adapters_field_answer_as_run_with_lora(client, expected, key):
    names = SETS[key]
    by_name = complete(client, PROMPT, model="+".join([BASE, *names]), logprobs=0)
    by_field = complete(client, PROMPT, extra_body={"adapters": names})
    assert by_name.choices[0].text == by_field.choices[0].text == expected[key]["text"][0]
    assert by_name.model == "+".join(["tiny-f32.gguf", *names])
    np.testing.assert_allclose(by_name.choices[0].logprobs.token_logprobs, expected[key]["logprobs"], atol=1e-3)
    # a scale in the field: 0 is the base
    zero = complete(client, PROMPT, extra_body={"adapters": [{"name": n, "scale": 0} for n in names]})
    assert zero.choices[0].text == expected["base"]["text"][0]


def test_prompt_logprobs_use_the_chosen_set(client, expected):
    """/v1/completions with echo and logprobs (the Engine's scoring): the prompt's own log-probabilities."""
    for key in ("base", "style"):
        r = client.completions.create(model="+".join([BASE, *SETS[key]]), prompt=PROMPT, max_tokens=0, echo=True,
                                      logprobs=0)
        np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:], expected[key]["prompt"], atol=1e-3)


def test_mixed_sets_in_flight_each_get_their_own_answer(client, server, expected):
    """Twelve requests of four sets on four slots at once: each answer is its set's, and the
    Engine switched adapters between the sets' decodes (they did share steps)."""
    engine = server.config.app.state.llmdesk.models.loaded["tiny-f32.gguf"].model.engine
    switches = engine.lora_switches
    jobs = [(key, i) for i in range(len(PROMPTS)) for key in SETS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: complete(client, PROMPTS[job[1]], extra_body={"adapters": SETS[job[0]]}),
                            jobs))
    for (key, i), r in zip(jobs, got):
        assert r.choices[0].text == expected[key]["text"][i], (key, i)
    assert engine.lora_switches > switches


def test_embeddings_use_the_chosen_set(client, hf, adapters):
    """/v1/embeddings under BASE+NAME embeds as the base with that set applied to the whole model
    (`Model(lora=...).embed`); requests of different sets in flight at once each get their own."""
    want = {}
    for key in ("base", "style", "style+terse"):
        with llmdesk.Model(hf["gguf"], ctx=CTX, threads=1, lora=[(adapters[n], 1.0) for n in SETS[key]]) as m:
            want[key] = np.array(m.embed(PROMPTS))
    assert np.abs(want["style"] - want["base"]).max() > 1e-2  # the adapters move the vectors

    def embed(key):
        model = "+".join([BASE, *SETS[key]])
        return key, np.array([d.embedding for d in client.embeddings.create(model=model, input=PROMPTS).data])

    with ThreadPoolExecutor(6) as pool:
        for key, got in pool.map(embed, list(want) * 2):
            assert np.abs(got - want[key]).max() < 1e-3, key


def test_unknown_adapters_are_one_clear_error(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, PROMPT, model=BASE + "+nope")
    assert "has no LoRA adapter 'nope'" in e.value.message and "style, terse" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, PROMPT, extra_body={"adapters": ["style", "nope"]})
    assert "'adapters'" in e.value.message and "no LoRA adapter 'nope'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, PROMPT, extra_body={"adapters": [{"name": "style", "scale": "high"}]})
    assert "finite number" in e.value.message
    r = httpx.post(server.url + "/api/generate", json={"model": BASE + "+nope", "prompt": "hi", "stream": False})
    assert r.status_code == 404 and "no LoRA adapter 'nope'" in r.json()["error"]


def test_ollama_client_chooses_by_name_and_by_options(server, hf, adapters):
    c = ollama.Client(host=server.url, timeout=120)
    msgs = [{"role": "user", "content": "Hello there"}]
    opts = {"temperature": 0, "num_predict": N}
    with llmdesk.Model(hf["gguf"], ctx=CTX, threads=1, lora=[(adapters["style"], 1.0)]) as m:
        want = m.chat(msgs, temperature=0, max_tokens=N)
    by_name = c.chat(model=BASE + "+style", messages=msgs, options=opts)
    by_option = c.chat(model=BASE, messages=msgs, options={**opts, "adapters": ["style"]})
    assert by_name.message.content == by_option.message.content == want
    assert by_name.model == "tiny-f32.gguf+style"
    assert c.chat(model=BASE, messages=msgs, options=opts).message.content != want


def test_an_adapter_for_another_base_stops_serve_in_one_line(hf, other_base, tmp_path):
    wrong = write_lora_gguf(other_base["adapter"], other_base["config"], tmp_path / "wrong.gguf")
    p = cli("serve", "-m", hf["gguf"], "--lora", f"mine={wrong}", "--port", "0", "--threads", "1", "--ctx", "64",
            home=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "wrong.gguf" in lines[0] and "no -m model can take it as a LoRA adapter" in lines[0]
    for bad, needle in [(f"{tmp_path / 'none.gguf'}", "no such file"), (f"a b={wrong}", "cannot name an adapter")]:
        p = cli("serve", "-m", hf["gguf"], "--lora", bad, "--port", "0", home=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr
