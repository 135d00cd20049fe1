"""The embedding model of a collection is one of the server's models: a chat request, a search or
an upload that needs it loads it through the same pool as the chat models, so it counts against
--max-memory, /api/ps and /v1/models list it, an idle model is unloaded to make room for it (and
it for others), and when room cannot be made the request is a 503 that says so. Real HTTP on
127.0.0.1 with the official `openai` and `ollama` clients, a tiny Llama and a tiny BERT.

And an encoder's Engine: no generation context, only its embeddings contexts; the server counts
it as `llmdesk fit` does."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
from test_serve_util import LONG, metric, running, wait_until

import llmdesk
from bert_fixtures import make_tiny_bert_gguf
from llmdesk.errors import LlmdeskError
from llmdesk.fit.memory import PROCESS_BASELINE_BYTES, estimate_memory
from llmdesk.fit.presets import shape_of_gguf
from llmdesk.formats.gguf import read_gguf
from llmdesk.rag.ingest import add, uploads_dir
from llmdesk.serve.memory import estimate_load_bytes
from llmdesk.store import catalog

OPS = "# Operations\n\n## Backups\n\nBackups run nightly at 02:00 UTC and are kept for thirty days.\n"
CTX, PARALLEL = 4096, 2  # the servers' settings (a long answer holds the tiny Llama a while; the BERT's is 128)
BERT = "tiny-bert:f32"
QUESTION = [{"role": "user", "content": "When do backups run?"}]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert_gguf(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def home(tmp_path_factory, bert):
    """A user directory: the tiny BERT in the store as tiny-bert:f32, and the collection 'notes'
    built with it (named by its file, as `llmdesk docs add --embed-model FILE` records it)."""
    home = tmp_path_factory.mktemp("home")
    docs = tmp_path_factory.mktemp("docs")
    (docs / "ops.md").write_text(OPS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMDESK_HOME", str(home))
        assert add([docs], "notes", embedder=str(bert)).added == 1
        catalog.add_file(bert, "tiny-bert", "f32", progress=False)
        yield home


@pytest.fixture(autouse=True)
def at_home(home, monkeypatch):
    monkeypatch.setenv("LLMDESK_HOME", str(home))


@pytest.fixture(scope="module")
def sizes(bert, tiny_gguf):
    """What the server counts for each model at these settings (the BERT at its trained context)."""
    b, t = read_gguf(bert), read_gguf(tiny_gguf)
    return {BERT: estimate_load_bytes(b, bert, n_ctx=b.context_length, n_slots=PARALLEL).total,
            "tiny.gguf": estimate_load_bytes(t, tiny_gguf, n_ctx=CTX, n_slots=PARALLEL).total}


def serve(tiny_gguf, max_memory: int):
    return running(tiny_gguf, parallel=PARALLEL, ctx=CTX, max_memory=max_memory)


def loaded(server) -> dict[str, dict]:
    return {m.model: m for m in ollama.Client(host=server.url).ps().models}


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(server, **extra):
    return client(server).chat.completions.create(
        model="tiny.gguf", messages=QUESTION, max_tokens=4, extra_body={"collection": "notes", **extra})


def test_the_embedding_model_is_counted_and_listed_beside_the_chat_model(tiny_gguf, sizes):
    with serve(tiny_gguf, sizes[BERT] + sizes["tiny.gguf"] + 2**20) as s:
        r = ask(s)  # hybrid: the question is embedded
        assert r.model_extra["sources"][0]["path"].endswith("ops.md")
        ps = loaded(s)
        assert set(ps) == {"tiny.gguf", BERT}  # the collection's file is the store's model: one name
        assert ps[BERT].size == sizes[BERT] and ps[BERT].context_length == 128  # its own context, not --ctx
        assert sum(m.size for m in ps.values()) <= sizes[BERT] + sizes["tiny.gguf"] + 2**20
        cards = {m.id: m for m in client(s).models.list()}
        assert cards[BERT].model_extra["loaded"] is True

        # an upload into a new collection records the model's name, and uses the loaded one
        up = httpx.post(s.url + "/v1/collections/fresh/files", files=[("files", ("ops.md", OPS.encode()))],
                        data={"embedder": BERT}, timeout=120)
        assert up.status_code == 200 and up.json()["added"] == 1, up.text
        assert httpx.get(s.url + "/v1/collections/fresh").json()["model"] == BERT
        assert metric(s.url, "llmdesk_model_loads_total", model=BERT) == 1
        assert set(loaded(s)) == {"tiny.gguf", BERT}


def test_an_idle_model_makes_room_for_the_embedding_model_and_the_other_way(tiny_gguf, sizes):
    budget = max(sizes.values()) + min(sizes.values()) // 2  # one at a time
    with serve(tiny_gguf, budget) as s:
        assert set(loaded(s)) == {"tiny.gguf"}  # preloaded
        c = ollama.Client(host=s.url, timeout=120)
        r = c.chat(model="tiny.gguf", messages=QUESTION, options={"collection": "notes", "num_predict": 4})
        assert r["message"]["role"] == "assistant"
        # the BERT came in for the question (the idle chat model went), then the chat model for
        # the answer (the idle BERT went)
        assert set(loaded(s)) == {"tiny.gguf"}
        assert metric(s.url, "llmdesk_model_unloads_total", model="tiny.gguf", reason="memory") == 1
        assert metric(s.url, "llmdesk_model_unloads_total", model=BERT, reason="memory") == 1

        hits = httpx.post(s.url + "/v1/collections/notes/search", json={"query": "backups", "mode": "vector"},
                          timeout=120).json()["data"]
        assert hits[0]["path"].endswith("ops.md")
        assert set(loaded(s)) == {BERT}
        assert metric(s.url, "llmdesk_model_unloads_total", model="tiny.gguf", reason="memory") == 2

        # words only: no model is needed, none is loaded or unloaded
        httpx.post(s.url + "/v1/collections/notes/search", json={"query": "backups", "mode": "bm25"}, timeout=120)
        assert set(loaded(s)) == {BERT}


def test_no_room_beside_a_busy_model_is_a_503_that_names_the_embedding_model(tiny_gguf, sizes):
    budget = max(sizes.values()) + min(sizes.values()) // 2
    with serve(tiny_gguf, budget) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=120,
                          json={"model": "tiny.gguf", "messages": QUESTION, "stream": True, **LONG}) as long:
            lines = long.iter_lines()  # (dropping this iterator would close the connection)
            next(lines)  # answering: the chat model is held
            with pytest.raises(openai.APIStatusError) as e:
                ask(s)
            assert e.value.status_code == 503 and e.value.code == "insufficient_memory"
            msg = e.value.message
            assert "the embedding model of collection 'notes', 'tiny-bert:f32', would not fit" in msg
            assert "--max-memory" in msg and "in use by tiny.gguf" in msg
            assert metric(s.url, "llmdesk_rejected_total", model=BERT, reason="memory") == 1
            # an upload that needs it is refused before any file is kept
            up = httpx.post(s.url + "/v1/collections/notes/files", timeout=120,
                            files=[("files", ("new.md", b"# New\n\nA new page.\n"))])
            assert up.status_code == 503 and "would not fit" in up.json()["error"]["message"]
            files = httpx.get(s.url + "/v1/collections/notes").json()["files"]
            assert not any(f["path"].endswith("new.md") for f in files)
            assert not (uploads_dir("notes") / "new.md").exists()
            assert set(loaded(s)) == {"tiny.gguf"}
        # the answer ended: the chat model is idle and makes room again
        r = wait_until(lambda: _answered(s))
        assert r.model_extra["sources"][0]["path"].endswith("ops.md")


def _answered(s):
    try:
        return ask(s)
    except openai.APIStatusError as e:  # the ended stream's lease is released a moment later
        assert e.status_code == 503
        return None


# ---------------------------------------------------------------------------------------------
# the Engine of an encoder


def test_an_encoder_has_no_generation_context_and_embeds(bert):
    with llmdesk.load(bert) as m:
        assert m.engine.ctx is None  # only embeddings contexts, made at the first embedding
        near, also, far = m.embed(["backups run nightly", "nightly backups run", "the cat sat on the mat"])
        cos = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731  (L2-normalised)
        assert cos(near, also) > cos(near, far)
        with pytest.raises(LlmdeskError, match="is an embedding model"):
            m.generate("hello", max_tokens=2)
    # the server counts what `llmdesk fit` estimates (less the process the server already is)
    info = read_gguf(bert)
    fit = estimate_memory(shape_of_gguf(info, bert), quant=None, ctx=info.context_length, gguf_info=info)
    assert estimate_load_bytes(info, bert, n_ctx=info.context_length, n_slots=4).total == \
        fit.required_bytes - PROCESS_BASELINE_BYTES
