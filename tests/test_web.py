"""The web chat at `/`, in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import json

import pytest
from test_serve_util import busy_slots, metric, running, wait_until

from playwright import sync_api  # noqa: E402  (the test extra: missing, this fails)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
# make test installs Debian's chromium: without it these tests fail rather than skip

MARKDOWN = """Here is a **plan**, with `inline code`:

1. Load the model
2. Ask it *anything*
   - nested item

```python
def hello(name):
    return f"Hello, {name}!"
```

| speed | tokens/s |
| --- | --- |
| prefill | 250 |

> Quoted text, and a [link](https://example.org)."""


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running(tiny_gguf, parallel=2, ctx=4096) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1180, "height": 760})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)

    # the tiny test model writes random tokens and may end at once: let every answer run to
    # its max_tokens, so there is something to stream and to stop
    def no_eos(route):
        body = json.loads(route.request.post_data)
        body["ignore_eos"] = True
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", no_eos)
    page.goto(server.url + "/")
    yield page
    context.close()
    assert problems == []


def test_chat_streams_an_answer_and_stop_stops_it(page, server, tmp_path):
    expect = sync_api.expect
    expect(page.locator("#model")).to_have_value("tiny.gguf")
    expect(page.locator("#settings")).to_be_hidden()
    page.click("#toggle-settings")
    expect(page.locator("#settings")).to_be_visible()
    page.fill("#system", "You are terse.")
    page.fill("#max_tokens", "60")
    page.fill("#input", "Hello! How fast are you?")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").last
    expect(page.locator(".msg.user .bubble").last).to_have_text("Hello! How fast are you?")
    expect(answer.locator(".stats")).to_contain_text("tokens/s", timeout=60_000)
    expect(page.locator("#send")).to_be_visible()
    assert answer.locator(".stats").inner_text().startswith("60 tokens")
    assert answer.locator(".bubble").inner_text().strip()
    page.screenshot(path=str(tmp_path / "web-chat-answer.png"))

    # a long answer, stopped: the browser aborts the request and the server frees the slot
    page.fill("#max_tokens", "100000")
    page.fill("#input", "Now tell me a very long story.")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    wait_until(lambda: len(answer_text(page)) > 20, timeout=60)
    page.click("#stop")
    stats = page.locator(".msg.assistant").last.locator(".stats")
    expect(stats).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    wait_until(lambda: busy_slots(server.url) == 0, timeout=20)
    wait_until(lambda: metric(server.url, "llmdesk_generations_total", finish_reason="cancelled") >= 1, timeout=20)

    # conversations are kept in the browser
    page.reload()
    expect(page.locator(".msg.user")).to_have_count(2)
    expect(page.locator("#conversations li")).to_have_count(1)
    expect(page.locator("#conversations li .title")).to_have_text("Hello! How fast are you?")
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#conversations li")).to_have_count(2)

    # copy a message
    page.locator("#conversations li").nth(1).click()
    first = page.locator(".msg.user").first
    first.locator(".copy-message").click()
    expect(first.locator(".copy-message")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "Hello! How fast are you?"


def answer_text(page) -> str:
    return page.locator(".msg.assistant").last.locator(".bubble").inner_text()


def test_markdown_and_code_blocks(page, server, tmp_path):
    expect = sync_api.expect
    conv = {"id": "demo", "model": "tiny.gguf", "updated": 1, "messages": [
        {"role": "user", "content": "How do I use it? <b>not bold</b>"},
        {"role": "assistant", "content": MARKDOWN, "stats": "96 tokens · 41.7 tokens/s · first token 0.12 s"},
        {"role": "assistant", "content": "<img src=x onerror=alert(1)> [bad](javascript:alert(1))"}]}
    page.evaluate("c => { localStorage.setItem('llmdesk.conversations', JSON.stringify([c]));"
                  " localStorage.setItem('llmdesk.current', JSON.stringify(c.id)); }", conv)
    page.reload()
    bubble = page.locator(".msg.assistant .bubble").first
    expect(bubble.locator("strong")).to_have_text("plan")
    expect(bubble.locator("ol > li")).to_have_count(2)
    expect(bubble.locator("ol ul li")).to_have_text("nested item")
    expect(bubble.locator(".code .code-head span")).to_have_text("python")
    expect(bubble.locator("pre code")).to_contain_text('return f"Hello, {name}!"')
    expect(bubble.locator("table td").first).to_have_text("prefill")
    expect(bubble.locator("blockquote a")).to_have_attribute("href", "https://example.org")
    # the user's text and the model's markup are shown as text, never run
    expect(page.locator(".msg.user .bubble")).to_have_text("How do I use it? <b>not bold</b>")
    hostile = page.locator(".msg.assistant .bubble").nth(1)
    expect(hostile).to_have_text("<img src=x onerror=alert(1)> [bad](javascript:alert(1))")
    assert hostile.locator("img").count() == 0 and hostile.locator("a").count() == 0
    bubble.locator(".copy-code").click()
    expect(bubble.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").startswith("def hello(name):")
    page.screenshot(path=str(tmp_path / "web-chat-markdown.png"))


def test_the_page_asks_for_the_api_key(browser, tiny_gguf):
    expect = sync_api.expect
    with running(tiny_gguf, api_key="web-test-key-123") as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        expect(page.locator("#key-dialog")).to_be_visible()
        page.fill("#key-input", "web-test-key-123")
        page.click("#key-save")
        expect(page.locator("#key-dialog")).to_be_hidden()
        expect(page.locator("#model")).to_have_value("tiny.gguf")
        page.close()


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(browser, tiny_gguf):
    expect = sync_api.expect
    with running(tiny_gguf, ctx=200) as s:
        page = browser.new_page()

        def short_answers(route):
            body = json.loads(route.request.post_data)
            body.update(ignore_eos=True, max_tokens=40, temperature=0, seed=1)
            route.continue_(post_data=json.dumps(body))

        page.route("**/v1/chat/completions", short_answers)
        page.goto(s.url + "/")
        expect(page.locator("#model")).to_have_value("tiny.gguf")
        for i in range(5):
            page.fill("#input", f"Question {i}: the quick brown fox jumps over the lazy dog.")
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant .stats")).to_have_count(i + 1, timeout=60_000)
            # finished, not just started (the stats line fills in while it streams, and the chat
            # takes no new message until the answer is done)
            expect(page.locator("#stop")).to_be_hidden(timeout=60_000)
            expect(page.locator(".msg.assistant .stats").nth(i)).to_contain_text("tokens", timeout=60_000)
        # once the conversation outgrows the context, the answer says what was left out
        stats = page.locator(".msg.assistant .stats").all_inner_texts()
        assert any("earlier tokens left out" in t for t in stats[2:]), stats
        assert page.locator(".msg.error").count() == 0
        page.close()
