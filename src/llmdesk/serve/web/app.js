// llmdesk's web chat: plain JavaScript over the server's OpenAI API (/v1/models,
// /v1/chat/completions streamed as server-sent events; with the MCP servers of `serve --mcp`,
// /v1/mcp/servers, and each tool call the server ran shown in the answer). Conversations and settings live in this
// browser's localStorage; nothing is stored on the server (but the documents uploaded in the
// Documents panel, documents.js).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const docs = window.llmdeskDocs; // documents.js: the collection to answer from, and the answers' sources
  const els = {
    sidebar: $("sidebar"), list: $("conversations"), newChat: $("new-chat"), toggleSidebar: $("toggle-sidebar"),
    model: $("model"), status: $("status"), toggleSettings: $("toggle-settings"), settings: $("settings"),
    system: $("system"), temperature: $("temperature"), top_p: $("top_p"), top_k: $("top_k"),
    max_tokens: $("max_tokens"), seed: $("seed"), messages: $("messages"), empty: $("empty"),
    form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
    keyDialog: $("key-dialog"), keyInput: $("key-input"), keySave: $("key-save"),
    toolsPick: $("tools-pick"), useTools: $("use-tools"),
  };

  // -- storage ------------------------------------------------------------------------------
  const KEYS = { conversations: "llmdesk.conversations", settings: "llmdesk.settings", apiKey: "llmdesk.apiKey",
                 model: "llmdesk.model", current: "llmdesk.current" };
  const load = (key, fallback) => {
    try { const v = JSON.parse(localStorage.getItem(key)); return v === null ? fallback : v; } catch (e) { return fallback; }
  };
  const save = (key, value) => { try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* full */ } };

  let conversations = load(KEYS.conversations, []);
  let current = conversations.find((c) => c.id === load(KEYS.current, null)) || null;
  let apiKey = load(KEYS.apiKey, "");
  let controller = null; // the AbortController of the answer being streamed
  let mcpServers = []; // the server's running MCP servers with tools it may run (serve --mcp)
  const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed"];

  function saveConversations() {
    save(KEYS.conversations, conversations);
    save(KEYS.current, current ? current.id : null);
  }

  // -- settings -----------------------------------------------------------------------------
  function loadSettings() {
    const s = load(KEYS.settings, {});
    for (const name of SETTINGS) if (s[name] !== undefined && s[name] !== null) els[name].value = s[name];
  }
  function saveSettings() {
    const s = {};
    for (const name of SETTINGS) s[name] = els[name].value;
    save(KEYS.settings, s);
  }
  function number(el, parse) {
    const v = el.value.trim();
    if (v === "") return undefined;
    const n = parse(v);
    return Number.isFinite(n) ? n : undefined;
  }

  // the settings panel, as request fields: the chat and the Arena send the same ones
  function samplingOptions() {
    const out = {};
    const t = number(els.temperature, parseFloat); if (t !== undefined) out.temperature = t;
    const p = number(els.top_p, parseFloat); if (p !== undefined) out.top_p = p;
    const k = number(els.top_k, (v) => parseInt(v, 10)); if (k !== undefined) out.top_k = k;
    const mt = number(els.max_tokens, (v) => parseInt(v, 10)); if (mt !== undefined) out.max_tokens = mt;
    const seed = number(els.seed, (v) => parseInt(v, 10)); if (seed !== undefined) out.seed = seed;
    return out;
  }
  function withSystem(messages) {
    const system = els.system.value.trim();
    return (system ? [{ role: "system", content: system }] : []).concat(messages);
  }

  // -- the server ---------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    if (apiKey) h.Authorization = "Bearer " + apiKey;
    return h;
  }
  function setStatus(text, isError) {
    els.status.textContent = text || "";
    els.status.classList.toggle("error", !!isError);
  }
  function askKey() {
    els.keyDialog.hidden = false;
    els.keyInput.value = "";
    els.keyInput.focus();
  }
  async function loadModels() {
    let resp;
    try {
      resp = await fetch("/v1/models", { headers: headers() });
    } catch (e) {
      setStatus("cannot reach the server", true);
      return;
    }
    if (resp.status === 401) { askKey(); setStatus("API key needed", true); return; }
    if (!resp.ok) { setStatus(`the server answered ${resp.status}`, true); return; }
    const data = await resp.json();
    const wanted = (current && current.model) || load(KEYS.model, null);
    els.model.textContent = "";
    for (const m of data.data || []) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.loaded ? "" : " (not loaded)");
      els.model.appendChild(opt);
    }
    if (wanted && [...els.model.options].some((o) => o.value === wanted)) els.model.value = wanted;
    setStatus(els.model.options.length ? "" : "this server has no models", !els.model.options.length);
  }

  // the MCP servers whose tools the server runs for a request that names them (none without --mcp)
  async function loadTools() {
    try {
      const resp = await fetch("/v1/mcp/servers", { headers: headers() });
      const data = resp.ok ? await resp.json() : { data: [] };
      mcpServers = (data.data || []).filter((s) => s.running && s.tools.length);
    } catch (e) {
      mcpServers = [];
    }
    els.toolsPick.hidden = !mcpServers.length;
    els.toolsPick.title = "The server may run these tools while it answers: " +
      mcpServers.map((s) => s.tools.map((t) => `${s.server_label}/${t.name}`).join(", ")).join(", ");
  }

  // the one line of an error answer: OpenAI's {"error": {"message"}} or {"error": "..."}
  async function errorText(resp) {
    const err = await resp.json().catch(() => null);
    return (err && err.error && (err.error.message || err.error)) || `the server answered ${resp.status}`;
  }

  // server-sent events from a fetch response: yields each `data:` payload parsed as JSON
  async function* events(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  // -- rendering ----------------------------------------------------------------------------
  function titleOf(conv) {
    const first = conv.messages.find((m) => m.role === "user");
    const t = first ? first.content.trim().replace(/\s+/g, " ") : "New chat";
    return t.length > 48 ? t.slice(0, 47) + "…" : t || "New chat";
  }

  function renderList() {
    els.list.textContent = "";
    const sorted = [...conversations].sort((a, b) => b.updated - a.updated);
    for (const conv of sorted) {
      const li = document.createElement("li");
      li.className = conv === current ? "active" : "";
      li.dataset.id = conv.id;
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = titleOf(conv);
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.title = "Delete this conversation";
      del.textContent = "×";
      del.addEventListener("click", (ev) => { ev.stopPropagation(); removeConversation(conv.id); });
      li.append(title, del);
      li.addEventListener("click", () => { if (!controller) { current = conv; saveConversations(); renderAll(); } });
      els.list.appendChild(li);
    }
  }

  function statsText(m) {
    return m.stats || "";
  }

  function messageElement(m) {
    const wrap = document.createElement("div");
    wrap.className = "msg " + m.role + (m.error ? " error" : "");
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    fillBubble(bubble, m, false);
    const meta = document.createElement("div");
    meta.className = "meta";
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = statsText(m);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-message";
    copy.textContent = "Copy";
    copy.title = "Copy this message";
    copy.addEventListener("click", () => copyText(m.content, copy));
    meta.append(stats, copy);
    wrap.append(callList(m), bubble, meta);
    docs.decorate(wrap, bubble, m);
    return wrap;
  }

  // the tool calls the server ran for an answer: one collapsible block each, the call (server,
  // tool, arguments) as its summary and the result (or the error) inside
  function callList(m) {
    const box = document.createElement("div");
    box.className = "tool-calls";
    for (const c of m.calls || []) {
      const block = document.createElement("details");
      block.className = "tool-call" + (c.error ? " failed" : "");
      const summary = document.createElement("summary");
      const name = document.createElement("span");
      name.className = "tool-name";
      name.textContent = `${c.server_label ? c.server_label + "/" : ""}${c.name}`;
      const args = document.createElement("code");
      args.className = "tool-args";
      args.textContent = c.arguments;
      summary.append(name, args);
      if (c.error) {
        const mark = document.createElement("span");
        mark.className = "tool-failed";
        mark.textContent = "failed";
        summary.append(mark);
      }
      const result = document.createElement("pre");
      result.className = "tool-result";
      result.textContent = c.error || c.output || "";
      block.append(summary, result);
      box.appendChild(block);
    }
    box.hidden = !box.children.length;
    return box;
  }

  function fillBubble(bubble, m, streaming) {
    if (m.role === "user") {
      bubble.textContent = m.content;
    } else if (m.error) {
      bubble.textContent = (m.content ? m.content + "\n\n" : "") + "Error: " + m.error;
    } else {
      bubble.innerHTML = window.renderMarkdown(m.content || "");
      if (streaming) bubble.classList.add("cursor"); else bubble.classList.remove("cursor");
    }
  }

  function renderAll() {
    renderList();
    els.messages.textContent = "";
    if (!current || !current.messages.length) {
      els.messages.appendChild(els.empty);
      return;
    }
    for (const m of current.messages) els.messages.appendChild(messageElement(m));
    els.messages.scrollTop = els.messages.scrollHeight;
    if (current.model && [...els.model.options].some((o) => o.value === current.model)) els.model.value = current.model;
  }

  function nearBottom() {
    const box = els.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  async function copyText(text, button) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
      } else {
        const area = document.createElement("textarea");
        area.value = text;
        area.style.position = "fixed";
        area.style.opacity = "0";
        document.body.appendChild(area);
        area.select();
        document.execCommand("copy");
        area.remove();
      }
      const old = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = old; }, 1200);
    } catch (e) {
      button.textContent = "Copy failed";
    }
  }

  // -- conversations ------------------------------------------------------------------------
  function newConversation() {
    current = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7), messages: [],
                model: els.model.value, updated: Date.now() };
    conversations.push(current);
    saveConversations();
    renderAll();
    els.input.focus();
  }

  function removeConversation(id) {
    if (controller && current && current.id === id) return;
    conversations = conversations.filter((c) => c.id !== id);
    if (current && current.id === id) current = null;
    saveConversations();
    renderAll();
  }

  // -- sending ------------------------------------------------------------------------------
  function busy(on) {
    els.send.hidden = on;
    els.stop.hidden = !on;
    els.model.disabled = on;
  }

  function describe(n, tps, ttft) {
    const parts = [`${n} token${n === 1 ? "" : "s"}`];
    if (tps > 0) parts.push(`${tps.toFixed(1)} tokens/s`);
    if (ttft !== null && ttft !== undefined) parts.push(`first token ${ttft.toFixed(2)} s`);
    return parts.join(" · ");
  }

  async function send(text) {
    if (!els.model.value) { setStatus("no model to send to", true); return; }
    if (!current) newConversation();
    current.model = els.model.value;
    save(KEYS.model, current.model);
    current.messages.push({ role: "user", content: text });
    const { collection } = docs.fields(); // answered from this collection of documents, if any
    const answer = { role: "assistant", content: "", stats: "", collection, calls: [] };
    current.messages.push(answer);
    current.updated = Date.now();
    saveConversations();
    renderAll();
    const el = els.messages.lastElementChild;
    const bubble = el.querySelector(".bubble");
    const stats = el.querySelector(".stats");
    fillBubble(bubble, answer, true);

    const history = current.messages.slice(0, -1).filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content }));
    const body = {
      model: current.model,
      messages: withSystem(history),
      stream: true,
      stream_options: { include_usage: true },
      // a long conversation drops its oldest turns to fit the model's context: asked for
      // explicitly, and shown under the answer
      truncate: true,
      ...samplingOptions(),
      ...docs.fields(),
    };
    // the MCP tools of the server, asked for unless the answer comes from documents (the server
    // does not run tools while quoting passages, which may carry instructions)
    if (els.useTools.checked && !collection) {
      await loadTools(); // a server that stopped since the page loaded is left out
      if (mcpServers.length) body.tools = mcpServers.map((s) => ({ type: "mcp", server_label: s.server_label }));
    }

    controller = new AbortController();
    busy(true);
    setStatus("");
    const t0 = performance.now();
    let tFirst = null, pieces = 0, timings = null, usage = null, pending = false, dropped = 0;
    const repaint = () => {
      pending = false;
      const stick = nearBottom();
      fillBubble(bubble, answer, true);
      const secs = tFirst === null ? 0 : (performance.now() - tFirst) / 1000;
      stats.textContent = describe(pieces, secs > 0.2 ? (pieces - 1) / secs : 0, tFirst === null ? null : (tFirst - t0) / 1000);
      if (stick) els.messages.scrollTop = els.messages.scrollHeight;
    };
    try {
      const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                          signal: controller.signal });
      if (resp.status === 401) { askKey(); throw new Error("an API key is needed"); }
      if (!resp.ok) throw new Error(await errorText(resp));
      for await (const chunk of events(resp)) {
        if (chunk.error) throw new Error(chunk.error.message || "generation failed");
        if (chunk.usage) usage = chunk.usage;
        docs.take(answer, chunk);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (chunk.timings) timings = chunk.timings;
        if (chunk.truncated_prompt_tokens) dropped = chunk.truncated_prompt_tokens;
        const ran = choice.delta && choice.delta.mcp_calls;
        if (ran) {
          answer.calls.push(...ran);
          el.querySelector(".tool-calls").replaceWith(callList(answer));
        }
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (tFirst === null) tFirst = performance.now();
          answer.content += delta;
          pieces += 1;
          if (!pending) { pending = true; requestAnimationFrame(repaint); }
        }
      }
      const n = usage ? usage.completion_tokens : timings ? timings.predicted_n : pieces;
      const tps = timings ? timings.predicted_per_second : 0;
      const ttft = timings ? timings.prompt_ms / 1000 : tFirst === null ? null : (tFirst - t0) / 1000;
      answer.stats = describe(n, tps, ttft) + (dropped ? ` · ${dropped} earlier tokens left out to fit the context` : "");
    } catch (e) {
      if (e.name === "AbortError") {
        const secs = tFirst === null ? 0 : (performance.now() - tFirst) / 1000;
        answer.stats = "stopped · " + describe(pieces, secs > 0.2 ? (pieces - 1) / secs : 0, null);
      } else {
        answer.error = e.message || String(e);
      }
    } finally {
      controller = null;
      busy(false);
      current.updated = Date.now();
      saveConversations();
      const stick = nearBottom();
      el.replaceWith(messageElement(answer));
      if (stick) els.messages.scrollTop = els.messages.scrollHeight;
      renderList();
      els.input.focus();
    }
  }

  // -- wiring -------------------------------------------------------------------------------
  // a prompt box: Enter sends (Shift+Enter starts a line), it grows with its text, and
  // `onText(text)` gets what was typed unless `isBusy()` (the chat's and the Arena's)
  function promptBox(form, input, onText, isBusy) {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = input.value.trim();
      if (!text || isBusy()) return;
      input.value = "";
      input.style.height = "";
      onText(text);
    });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        form.requestSubmit();
      }
    });
    input.addEventListener("input", () => {
      input.style.height = "auto";
      input.style.height = Math.min(input.scrollHeight, window.innerHeight * 0.4) + "px";
    });
  }
  promptBox(els.form, els.input, send, () => controller !== null);
  els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
  els.newChat.addEventListener("click", () => { if (!controller) newConversation(); });
  els.toggleSettings.addEventListener("click", () => {
    els.settings.hidden = !els.settings.hidden;
    els.toggleSettings.setAttribute("aria-expanded", String(!els.settings.hidden));
  });
  els.toggleSidebar.addEventListener("click", () => {
    if (window.innerWidth <= 720) els.sidebar.classList.toggle("open");
    else els.sidebar.classList.toggle("hidden");
  });
  for (const name of SETTINGS) els[name].addEventListener("change", saveSettings);
  els.model.addEventListener("change", () => {
    save(KEYS.model, els.model.value);
    if (current && !current.messages.length) current.model = els.model.value;
  });
  els.messages.addEventListener("click", (ev) => {
    const btn = ev.target.closest(".copy-code");
    if (!btn) return;
    const code = btn.closest(".code").querySelector("code");
    copyText(code.textContent, btn);
  });
  els.keySave.addEventListener("click", () => {
    apiKey = els.keyInput.value.trim();
    save(KEYS.apiKey, apiKey);
    els.keyDialog.hidden = true;
    loadModels();
    loadTools();
  });
  els.keyInput.addEventListener("keydown", (ev) => { if (ev.key === "Enter") els.keySave.click(); });

  // for arena.js, the Arena mode, which talks to the same server with the same settings
  window.llmdeskChat = { headers, events, errorText, setStatus, askKey, describe, copyText, samplingOptions, withSystem,
                        promptBox };

  loadSettings();
  renderAll();
  loadModels().then(() => renderAll());
  loadTools();
  els.input.focus();
})();
