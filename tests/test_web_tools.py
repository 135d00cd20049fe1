"""The web chat shows the MCP tool calls the server ran for an answer (`serve --mcp`): each call,
its arguments and its result as a collapsible block, in a real headless browser (Debian's
chromium driven by Playwright) against a real server, a real stdio MCP server and the tiny model
made to call (the grammar of a named tool_choice forces its call)."""

from __future__ import annotations

import json
import re

import pytest
from test_mcp import MARK, SERVER, entry
from test_serve_util import running
from test_web import ARGS, CHROMIUM

from llmdesk.tools.mcp_client import parse_config
from playwright import sync_api


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gguf):
    tmp = tmp_path_factory.mktemp("web_tools")
    script = tmp / "calc_server.py"
    script.write_text(SERVER)
    servers = parse_config({"mcpServers": {"calc": entry(script, tmp / "calc.pid", alwaysAllow=["add"])}}, "test")
    with running(tiny_gguf, mcp_servers=servers) as s:
        yield s


def test_the_chat_shows_each_call_and_its_result(server, tmp_path):
    expect = sync_api.expect
    sent = []

    def forced(route):  # the tiny model calls only when made to: the test adds what forces it
        body = json.loads(route.request.post_data)
        sent.append(body)
        body.update(tool_choice={"type": "function", "function": {"name": "add"}}, max_steps=1, max_tokens=60,
                    temperature=0)
        route.continue_(post_data=json.dumps(body))

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.route("**/v1/chat/completions", forced)
        page.goto(server.url + "/")
        expect(page.locator("#tools-pick")).to_be_visible()  # the server runs MCP tools: the chat offers them
        expect(page.locator("#use-tools")).to_be_checked()
        expect(page.locator("#tools-pick")).to_have_attribute("title", re.compile(r"calc/add$"))
        page.fill("#input", "What is two plus three?")
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant .stats")).to_contain_text("token", timeout=60_000)  # the answer is done
        assert page.locator(".msg.error").count() == 0
        assert sent[0]["tools"] == [{"type": "mcp", "server_label": "calc"}]

        block = page.locator(".msg.assistant .tool-call")
        expect(block).to_have_count(1)
        summary = block.locator("summary")
        expect(summary.locator(".tool-name")).to_have_text("calc/add")
        args = json.loads(summary.locator(".tool-args").inner_text())
        result = block.locator(".tool-result")
        expect(result).to_be_hidden()  # collapsed until opened
        summary.click()
        expect(result).to_be_visible()
        expect(result).to_have_text(MARK.format("calc/add") + f"\n{args['a'] + args['b']}")
        page.screenshot(path=str(tmp_path / "web-chat-tool-call.png"))

        # kept with the conversation in the browser
        page.reload()
        expect(page.locator(".msg.assistant .tool-call .tool-name")).to_have_text("calc/add")
        browser.close()
    assert problems == []
