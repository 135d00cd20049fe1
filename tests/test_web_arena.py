"""The web chat's Arena mode: the battle API (serve/arena.py) over real HTTP against a real server
of two models, and the page in a real headless browser (Debian's chromium driven by Playwright).

The two models are the bundled demo model and the tests' tiny model, served under names that
neither can write by chance, so a name in any response before the vote is a leak."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from test_serve_util import LONG, busy_slots, running, wait_until
from test_web import browser  # noqa: F401 (the fixture: Debian's chromium, launched as the chat's tests do)

from llmdesk.demo import default_model_path
from llmdesk.eval.arena import votes
from llmdesk.runtime.conversation import sampling_params
from llmdesk.serve.arena import Battle, Battles, Side
from llmdesk.serve.errors import APIError
from llmdesk.store import catalog
from llmdesk.store.db import connect

from playwright import sync_api  # noqa: E402  (the test extra: missing, this fails)

NAMES = ("contender-quokka.gguf", "contender-pangolin.gguf")
SECRETS = ("quokka", "pangolin")  # what must not be in any answer before the vote
QUICK = {"max_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def contenders(tmp_path_factory, tiny_gguf):
    folder = tmp_path_factory.mktemp("arena")
    demo = default_model_path()
    assert demo is not None, "the demo model is not bundled: `make demo-model` builds it"
    shutil.copyfile(tiny_gguf, folder / NAMES[0])
    shutil.copyfile(demo, folder / NAMES[1])
    return [str(folder / n) for n in NAMES]


@pytest.fixture(scope="module")
def server(contenders):
    # a long answer (LONG) runs to the end of a 4096-token context: far longer than the tests
    # take to act on its first tokens (to cut it off, to keep a model busy, to press Stop)
    with running(None, models=contenders, parallel=2, ctx=4096) as s:
        yield s


class Client:
    """httpx against the server, keeping every response body to check for names."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.bodies: list[str] = []

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        r = self.http.request(method, path, **kw)
        self.bodies.append(r.text)
        return r

    def answer(self, battle: str, side: str) -> tuple[str, list[dict]]:
        """A side's answer, streamed: (the text, the events)."""
        r = self.call("POST", f"/api/arena/battles/{battle}/{side}")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        return "".join(e.get("content", "") for e in events), events

    def assert_no_names(self) -> None:
        for body in self.bodies:
            for secret in SECRETS:
                assert secret not in body.lower(), f"a model's name before the vote: {body[:300]}"


def sse(text: str) -> list[dict]:
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text[:300]
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert isinstance(message, str) and message and "\n" not in message, r.text
    return message


def test_a_battle_hides_the_names_until_the_vote_and_records_what_the_server_generated(server):
    c = Client(server.url)
    r = c.call("POST", "/api/arena/battles", json={"prompt": "What is llmdesk?", **QUICK})
    assert r.status_code == 200, r.text
    battle = r.json()["id"]
    assert r.json()["sides"] == ["a", "b"]
    vote = f"/api/arena/battles/{battle}/vote"

    assert "not finished" in one_line_error(c.call("POST", vote, json={"winner": "a"}), 409)
    text_a, events_a = c.answer(battle, "a")
    assert text_a and events_a[-1]["finish_reason"] == "length" and events_a[-1]["timings"]["predicted_n"] == 24
    assert "answer B has not finished" in one_line_error(c.call("POST", vote, json={"winner": "a"}), 409)
    assert "already done" in one_line_error(c.call("POST", f"/api/arena/battles/{battle}/a"), 409)
    text_b, _ = c.answer(battle, "b")
    state = c.call("GET", f"/api/arena/battles/{battle}").json()
    assert state["winner"] is None and {s["state"] for s in state["sides"].values()} == {"done"}
    assert "model_a" not in state and "model_b" not in state
    one_line_error(c.call("POST", vote, json={"winner": "c"}), 400)
    c.assert_no_names()

    r = c.call("POST", vote, json={"winner": "b"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["winner"] == "b" and {out["model_a"], out["model_b"]} == set(NAMES)
    assert "voted on already" in one_line_error(c.call("POST", vote, json={"winner": "a"}), 409)
    assert "voted on" in one_line_error(c.call("POST", f"/api/arena/battles/{battle}/b"), 409)
    assert c.call("GET", f"/api/arena/battles/{battle}").json()["model_a"] == out["model_a"]

    # the vote holds what the server generated, in the arena_votes table
    (row,) = votes(source="web")
    assert row["id"] == out["vote_id"]
    assert (row["model_a"], row["model_b"], row["winner"]) == (out["model_a"], out["model_b"], "b")
    assert (row["prompt"], row["answer_a"], row["answer_b"]) == ("What is llmdesk?", text_a, text_b)
    assert row["details"]["battle"] == battle
    db = connect()
    try:
        rows = db.execute("SELECT source, winner, answer_a FROM arena_votes").fetchall()
        assert [tuple(r) for r in rows] == [("web", "b", text_a)]
    finally:
        db.close()


def test_battle_errors_are_one_line(server):
    c = Client(server.url)
    for bad in ({}, {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, {"prompt": "   "},
                {"prompt": "hi", "max_tokens": "5"}, {"prompt": "hi", "temperature": -1},
                {"messages": [{"role": "wizard", "content": "hi"}]}, {"prompt": "hi", "model": NAMES[0]}):
        one_line_error(c.call("POST", "/api/arena/battles", json=bad), 400)
    assert "JSON" in one_line_error(c.call("POST", "/api/arena/battles", content="prompt=hi"), 400)
    assert "not found" in one_line_error(c.call("POST", "/api/arena/battles",
                                                json={"prompt": "hi", "models": [NAMES[0], "nonesuch"]}), 404)
    for method, path, body in (("GET", "/api/arena/battles/battle-nope", None),
                               ("POST", "/api/arena/battles/battle-nope/a", None),
                               ("POST", "/api/arena/battles/battle-nope/vote", {"winner": "a"})):
        assert "no arena battle" in one_line_error(c.call(method, path, json=body), 404)
    c.assert_no_names()


def test_a_battle_with_a_system_prompt_from_a_pool_of_models(server):
    c = Client(server.url)
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hello?"}]
    r = c.call("POST", "/api/arena/battles", json={"messages": messages, "models": list(NAMES), **QUICK})
    battle = r.json()["id"]
    texts = [c.answer(battle, side)[0] for side in "ab"]
    c.assert_no_names()
    out = c.call("POST", f"/api/arena/battles/{battle}/vote", json={"winner": "both_bad"}).json()
    (row,) = votes(source="web")
    assert (row["prompt"], row["winner"], [row["answer_a"], row["answer_b"]]) == ("Hello?", "both_bad", texts)
    assert row["details"]["messages"] == messages and row["model_a"] == out["model_a"]


def test_a_side_cut_off_can_be_asked_for_again_and_is_not_voted_on_until_it_ends(server):
    c = Client(server.url)
    # 400 tokens: long enough to act on its first ones, short enough to run to the end twice
    battle = c.call("POST", "/api/arena/battles",
                    json={"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}).json()["id"]
    with c.http.stream("POST", f"/api/arena/battles/{battle}/a") as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {\"content\"") for line in got)
        # while it runs, a second stream of the same side is refused
        assert "being generated" in one_line_error(c.call("POST", f"/api/arena/battles/{battle}/a"), 409)
    # the client went away: the server cancels it and frees the slot
    wait_until(lambda: busy_slots(server.url) == 0, timeout=30)
    wait_until(lambda: c.call("GET", f"/api/arena/battles/{battle}").json()["sides"]["a"]["state"] == "stopped")
    assert "not finished" in one_line_error(c.call("POST", f"/api/arena/battles/{battle}/vote",
                                                   json={"winner": "tie"}), 409)
    # asked for again, it runs to the end
    for side in "ab":
        _, events = c.answer(battle, side)
        assert events[-1]["finish_reason"] == "length"
    assert c.call("POST", f"/api/arena/battles/{battle}/vote", json={"winner": "tie"}).status_code == 200
    assert [v["winner"] for v in votes(source="web")] == ["tie"]


def test_a_busy_model_is_named_by_its_side_only(contenders):
    # one slot per model and no queue: while a battle holds both models, another one gets 429
    with running(None, models=contenders, parallel=1, max_queue=0, ctx=4096) as s:
        c = Client(s.url)
        first = c.call("POST", "/api/arena/battles", json={"prompt": "Go on.", **LONG}).json()["id"]
        second = c.call("POST", "/api/arena/battles", json={"prompt": "Hello", **QUICK}).json()["id"]
        with c.http.stream("POST", f"/api/arena/battles/{first}/a") as ra, \
                c.http.stream("POST", f"/api/arena/battles/{first}/b") as rb:
            assert ra.status_code == rb.status_code == 200
            for side in "ab":
                r = c.call("POST", f"/api/arena/battles/{second}/{side}")
                message = one_line_error(r, 429)
                assert f"model {side.upper()} is busy" in message and r.headers["retry-after"]
        c.assert_no_names()


def test_the_server_holds_a_bounded_number_of_battles_for_a_bounded_time():
    def battle(i: int) -> Battle:
        return Battle(id=f"b{i}", messages=[], sampling=sampling_params(), max_tokens=None, ignore_eos=False,
                      sides={"a": Side("x"), "b": Side("y")})

    kept = Battles(max_battles=2)
    for i in range(3):
        kept.add(battle(i))
    with pytest.raises(APIError) as e:
        kept.get("b0")  # the oldest went first
    assert e.value.status == 404 and "b0" in e.value.message
    assert kept.get("b1").id == "b1" and kept.get("b2").id == "b2"
    gone = Battles(ttl_s=0)  # kept for no time at all
    gone.add(battle(0))
    with pytest.raises(APIError):
        gone.get("b0")


def fight(c: Client, **body) -> set[str]:
    """A battle, answered and voted a tie: the two names."""
    battle = c.call("POST", "/api/arena/battles", json={"prompt": "Hi", **QUICK, **body}).json()["id"]
    for side in "ab":
        c.answer(battle, side)
    out = c.call("POST", f"/api/arena/battles/{battle}/vote", json={"winner": "tie"}).json()
    return {out["model_a"], out["model_b"]}


def test_battles_draw_from_the_models_the_server_was_started_with(server, tiny_gguf, contenders):
    catalog.add_file(tiny_gguf, "walrus", "latest", progress=False)  # in the store, not given with -m
    c = Client(server.url)
    for _ in range(3):
        assert fight(c) == set(NAMES)
    # a server started with one model draws from the store too
    with running(None, models=contenders[:1], ctx=1024) as s:
        assert fight(Client(s.url)) == {NAMES[0], "walrus:latest"}


def test_a_server_of_one_model_has_no_arena(tiny_gguf, browser):
    with running(tiny_gguf) as s:
        r = httpx.post(s.url + "/api/arena/battles", json={"prompt": "hi"})
        assert "two models" in one_line_error(r, 400)
        # the page says so, in that line
        page = browser.new_page()
        page.goto(s.url + "/#arena")
        expect = sync_api.expect
        expect(page.locator("#arena")).to_be_visible()
        page.fill("#arena-input", "hi")
        page.press("#arena-input", "Enter")
        expect(page.locator("#arena-result")).to_contain_text("The battle could not start: an arena battle needs two models")
        expect(page.locator("#arena-panes")).to_be_hidden()
        expect(page.locator("#arena-send")).to_be_visible()
        page.close()


# ---------------------------------------------------------------------------------------------
# the page


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1180, "height": 760})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.goto(server.url + "/")
    yield page
    context.close()
    assert problems == []


def quick_answers(route):
    # the tiny model may end at once: every answer runs to its max_tokens
    body = json.loads(route.request.post_data)
    body.update(ignore_eos=True, max_tokens=40)
    route.continue_(post_data=json.dumps(body))


def test_arena_mode_in_the_browser(page, server, tmp_path):
    expect = sync_api.expect
    page.route("**/api/arena/battles", quick_answers)
    expect(page.locator("#arena")).to_be_hidden()
    page.click("#mode-arena")
    expect(page.locator("#arena")).to_be_visible()
    expect(page.locator("#messages")).to_be_hidden()
    expect(page.locator("#mode-arena")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#arena-input")).to_be_focused()

    page.fill("#arena-input", "Which model are you?")
    page.press("#arena-input", "Enter")
    expect(page.locator("#arena-prompt")).to_have_text("Which model are you?")
    vote_a = page.locator('#arena-vote button[data-winner="a"]')
    expect(vote_a).to_be_enabled(timeout=60_000)
    for side in "ab":
        pane = page.locator(f'.pane[data-side="{side}"]')
        expect(pane.locator(".stats")).to_contain_text("40 tokens")
        assert pane.locator(".bubble").inner_text().strip()
        expect(pane.locator(".reveal")).to_be_hidden()
    # (the pool's list of names, closed, is the user's choice, not which side is which)
    board = " ".join(page.locator(sel).inner_text() for sel in ("#arena-panes", "#arena-vote", "#arena-result", "#status"))
    assert not any(secret in board.lower() for secret in SECRETS), board
    page.screenshot(path=str(tmp_path / "arena-before-vote.png"))

    # by keyboard: the first vote button has the focus once both answers are in
    expect(vote_a).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator('#arena-vote button[data-winner="b"]')).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(".pane .reveal")).to_have_count(2)
    reveal_a = page.locator('.pane[data-side="a"] .reveal strong')
    expect(reveal_a).to_be_visible()
    revealed = [reveal_a.inner_text(), page.locator('.pane[data-side="b"] .reveal strong').inner_text()]
    assert set(revealed) == set(NAMES)
    expect(page.locator('#arena-vote button[data-winner="b"]')).to_have_attribute("aria-pressed", "true")
    for b in page.locator("#arena-vote button").all():
        expect(b).to_be_disabled()
    expect(page.locator("#new-battle")).to_be_focused()
    page.screenshot(path=str(tmp_path / "arena-after-vote.png"))

    (row,) = votes(source="web")
    assert (row["prompt"], row["winner"], [row["model_a"], row["model_b"]]) == ("Which model are you?", "b", revealed)
    assert row["answer_a"] and row["answer_b"]

    page.keyboard.press("Enter")  # New battle
    expect(page.locator("#arena-empty")).to_be_visible()
    expect(page.locator("#arena-panes")).to_be_hidden()
    expect(page.locator("#arena-input")).to_be_focused()

    # the mode is kept; the chat is one click away
    page.reload()
    expect(page.locator("#arena")).to_be_visible()
    assert page.url.endswith("#arena")
    page.click("#mode-chat")
    expect(page.locator("#messages")).to_be_visible()
    expect(page.locator("#arena")).to_be_hidden()
    expect(page.locator("#input")).to_be_focused()


def test_a_stopped_battle_cannot_be_voted_on(page, server):
    expect = sync_api.expect

    def long_answers(route):
        body = json.loads(route.request.post_data)
        body.update(LONG)
        route.continue_(post_data=json.dumps(body))

    page.route("**/api/arena/battles", long_answers)
    # answer B's request is held in the browser, so the battle is surely unfinished at Stop
    held = []
    page.route("**/api/arena/battles/*/b", lambda route: held.append(route))
    page.click("#mode-arena")
    page.fill("#arena-input", "Tell me everything.")
    page.click("#arena-send")
    expect(page.locator("#arena-stop")).to_be_visible()
    answer_a = page.locator('.pane[data-side="a"] .bubble')
    # (the page is asked first: Playwright's sync API runs route handlers during its own calls)
    wait_until(lambda: len(answer_a.inner_text()) > 10 and held, timeout=60)
    page.click("#arena-stop")
    expect(page.locator("#arena-result")).to_contain_text("cannot be voted on")
    expect(page.locator("#new-battle")).to_be_visible()
    for b in page.locator("#arena-vote button").all():
        expect(b).to_be_disabled()
    wait_until(lambda: busy_slots(server.url) == 0, timeout=30)
    assert votes(source="web") == []


def test_the_user_picks_the_models_to_draw_from(page, tiny_gguf):
    expect = sync_api.expect
    catalog.add_file(tiny_gguf, "walrus", "latest", progress=False)
    page.route("**/api/arena/battles", quick_answers)
    page.click("#mode-arena")
    page.click("#arena-pool summary")
    boxes = page.locator("#arena-pool-list input[type=checkbox]")
    expect(boxes).to_have_count(3)
    assert [b.get_attribute("value") for b in boxes.all()] == [*NAMES, "walrus:latest"]
    expect(page.locator("#arena-pool-summary")).to_have_text("the server's choice")
    page.check(f'#arena-pool-list input[value="{NAMES[1]}"]')
    page.fill("#arena-input", "Hi")
    page.press("#arena-input", "Enter")
    expect(page.locator("#arena-result")).to_contain_text("Check at least two models")
    expect(page.locator("#arena-panes")).to_be_hidden()
    page.check('#arena-pool-list input[value="walrus:latest"]')
    expect(page.locator("#arena-pool-summary")).to_have_text(f"{NAMES[1]}, walrus:latest")
    page.press("#arena-input", "Enter")
    expect(page.locator('#arena-vote button[data-winner="tie"]')).to_be_enabled(timeout=60_000)
    page.click('#arena-vote button[data-winner="tie"]')
    expect(page.locator(".pane .reveal strong")).to_have_count(2)
    assert set(page.locator(".pane .reveal strong").all_inner_texts()) == {NAMES[1], "walrus:latest"}
    # the choice is kept
    page.reload()
    expect(page.locator("#arena-pool-summary")).to_have_text(f"{NAMES[1]}, walrus:latest")
