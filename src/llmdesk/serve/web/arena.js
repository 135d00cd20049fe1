// The web chat's Arena mode: one prompt, two anonymous models answering side by side, a vote,
// and only then their names. The server draws the two models and keeps their names until the
// vote (/api/arena/battles, serve/arena.py); this page never knows them before.
"use strict";

(function () {
  const chat = window.llmdeskChat; // app.js: headers, events, errorText, describe, settings
  const $ = (id) => document.getElementById(id);
  const els = {
    app: $("app"), modeChat: $("mode-chat"), modeArena: $("mode-arena"), arena: $("arena"),
    messages: $("messages"), composer: $("composer"), chatInput: $("input"),
    empty: $("arena-empty"), prompt: $("arena-prompt"), panes: $("arena-panes"), vote: $("arena-vote"),
    result: $("arena-result"), form: $("arena-form"), input: $("arena-input"), send: $("arena-send"),
    stop: $("arena-stop"), newBattle: $("new-battle"), pool: $("arena-pool"), poolList: $("arena-pool-list"),
    poolSummary: $("arena-pool-summary"),
  };
  const SIDES = ["a", "b"];
  const MODE_KEY = "llmdesk.mode";
  const POOL_KEY = "llmdesk.arenaPool";
  const LABELS = { a: "A is better", b: "B is better", tie: "Tie", both_bad: "Both are bad" };
  let battle = null; // {id, sides: {a: {text, done, error, stats}, b: ...}, voted}
  let controller = null; // aborts both answers

  const pane = (side) => els.panes.querySelector(`.pane[data-side="${side}"]`);
  const voteButtons = () => [...els.vote.querySelectorAll("button[data-winner]")];

  // -- the mode switch ----------------------------------------------------------------------
  function setMode(mode, focus) {
    const arena = mode === "arena";
    els.app.classList.toggle("arena-mode", arena);
    els.arena.hidden = !arena;
    els.messages.hidden = arena;
    els.composer.hidden = arena;
    els.modeChat.setAttribute("aria-pressed", String(!arena));
    els.modeArena.setAttribute("aria-pressed", String(arena));
    try { localStorage.setItem(MODE_KEY, mode); } catch (e) { /* private mode */ }
    const url = location.pathname + location.search + (arena ? "#arena" : "");
    if (location.pathname + location.search + location.hash !== url) history.replaceState(null, "", url);
    chat.setStatus("");
    if (arena) loadPool();
    if (focus) (arena ? els.input : els.chatInput).focus();
  }

  // -- the models to draw from (names of the pool, never which side is which) ---------------
  function savedPool() {
    try { return JSON.parse(localStorage.getItem(POOL_KEY)) || []; } catch (e) { return []; }
  }
  function pool() {
    return [...els.poolList.querySelectorAll("input:checked")].map((box) => box.value);
  }
  function showPool() {
    const names = pool();
    els.poolSummary.textContent = names.length ? names.join(", ") : "the server's choice";
    try { localStorage.setItem(POOL_KEY, JSON.stringify(names)); } catch (e) { /* private mode */ }
  }
  async function loadPool() {
    let data;
    try {
      const resp = await fetch("/v1/models", { headers: chat.headers() });
      if (!resp.ok) return;
      data = await resp.json();
    } catch (e) {
      return;
    }
    const wanted = new Set(savedPool());
    els.poolList.textContent = "";
    for (const m of data.data || []) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = m.id;
      box.checked = wanted.has(m.id);
      box.addEventListener("change", showPool);
      label.append(box, " " + m.id);
      els.poolList.appendChild(label);
    }
    showPool();
  }

  // -- the board ----------------------------------------------------------------------------
  function reset() {
    battle = null;
    els.empty.hidden = false;
    els.prompt.hidden = true;
    els.panes.hidden = true;
    els.vote.hidden = true;
    els.result.textContent = "";
    els.newBattle.hidden = true;
    for (const side of SIDES) {
      const p = pane(side);
      p.querySelector(".bubble").textContent = "";
      p.querySelector(".stats").textContent = "";
      p.querySelector(".answer").classList.remove("error");
      p.querySelector(".reveal").hidden = true;
      p.querySelector(".reveal").textContent = "";
    }
    for (const b of voteButtons()) { b.disabled = true; b.setAttribute("aria-pressed", "false"); }
  }

  function busy(on) {
    els.send.hidden = on;
    els.stop.hidden = !on;
    els.input.disabled = on;
  }

  function paint(side, streaming) {
    const s = battle.sides[side];
    const p = pane(side);
    const bubble = p.querySelector(".bubble");
    p.querySelector(".answer").classList.toggle("error", !!s.error);
    if (s.error) bubble.textContent = (s.text ? s.text + "\n\n" : "") + "Error: " + s.error;
    else bubble.innerHTML = window.renderMarkdown(s.text);
    bubble.classList.toggle("cursor", streaming);
    p.querySelector(".stats").textContent = s.stats;
  }

  // -- a battle -----------------------------------------------------------------------------
  async function post(path, body, signal) {
    const resp = await fetch(path, { method: "POST", headers: chat.headers(), signal,
                                     body: body === undefined ? undefined : JSON.stringify(body) });
    if (resp.status === 401) { chat.askKey(); throw new Error("an API key is needed"); }
    if (!resp.ok) throw new Error(await chat.errorText(resp));
    return resp;
  }

  async function start(text) {
    const names = pool();
    if (names.length === 1) {
      els.result.textContent = "Check at least two models in the draw, or none for the server's choice.";
      els.pool.open = true;
      els.input.value = text; // kept, to send once the draw is fixed
      return;
    }
    reset();
    busy(true);
    els.empty.hidden = true;
    els.prompt.hidden = false;
    els.prompt.textContent = text;
    controller = new AbortController();
    try {
      const resp = await post("/api/arena/battles",
                              { messages: chat.withSystem([{ role: "user", content: text }]), ...chat.samplingOptions(),
                                ...(names.length ? { models: names } : {}) },
                              controller.signal);
      const created = await resp.json();
      battle = { id: created.id, voted: false, sides: {} };
      for (const side of SIDES) battle.sides[side] = { text: "", done: false, error: null, stats: "" };
      els.panes.hidden = false;
      els.vote.hidden = false;
      chat.setStatus("two anonymous models are answering");
      await Promise.all(SIDES.map((side) => answer(side, controller.signal)));
    } catch (e) {
      els.result.textContent = e.name === "AbortError" ? "Stopped." : "The battle could not start: " + (e.message || e);
      chat.setStatus(e.name === "AbortError" ? "" : "the battle could not start", e.name !== "AbortError");
    } finally {
      controller = null;
      busy(false);
      finished();
    }
  }

  async function answer(side, signal) {
    const s = battle.sides[side];
    const t0 = performance.now();
    let tFirst = null, pieces = 0, pending = false;
    const repaint = () => {
      pending = false;
      // a frame due after the answer ended must not put the running count (pieces of text, not
      // tokens) over the final figures
      if (s.done || s.error) return;
      const secs = tFirst === null ? 0 : (performance.now() - tFirst) / 1000;
      s.stats = chat.describe(pieces, secs > 0.2 ? (pieces - 1) / secs : 0, tFirst === null ? null : (tFirst - t0) / 1000);
      paint(side, true);
    };
    paint(side, true);
    try {
      const resp = await post(`/api/arena/battles/${encodeURIComponent(battle.id)}/${side}`, undefined, signal);
      for await (const ev of chat.events(resp)) {
        if (ev.error) throw new Error(ev.error.message || ev.error);
        if (ev.content) {
          if (tFirst === null) tFirst = performance.now();
          s.text += ev.content;
          pieces += 1;
          if (!pending) { pending = true; requestAnimationFrame(repaint); }
        }
        if (ev.finish_reason) {
          const t = ev.timings;
          s.stats = t ? chat.describe(t.predicted_n, t.predicted_per_second, t.prompt_ms / 1000) : chat.describe(pieces, 0, null);
          s.done = true;
        }
      }
      if (!s.done) throw new Error("the answer ended before it was finished");
    } catch (e) {
      s.error = e.name === "AbortError" ? "stopped" : (e.message || String(e));
    } finally {
      paint(side, false);
    }
  }

  function finished() {
    if (!battle) { els.newBattle.hidden = false; return; }
    const ready = SIDES.every((side) => battle.sides[side].done);
    for (const b of voteButtons()) b.disabled = !ready;
    if (ready) {
      els.result.textContent = "Both answers are in: which is better? The names are shown after your vote.";
      chat.setStatus("");
      const active = document.activeElement;
      if (!active || active === document.body || active === els.input || active === els.stop) voteButtons()[0].focus();
    } else {
      els.result.textContent = "An answer did not finish, so this battle cannot be voted on: start a new battle.";
      els.newBattle.hidden = false;
    }
  }

  async function vote(winner) {
    if (!battle || battle.voted) return;
    for (const b of voteButtons()) b.disabled = true;
    try {
      const resp = await post(`/api/arena/battles/${encodeURIComponent(battle.id)}/vote`, { winner });
      const out = await resp.json();
      battle.voted = true;
      const names = { a: out.model_a, b: out.model_b };
      for (const side of SIDES) {
        const reveal = pane(side).querySelector(".reveal");
        reveal.textContent = "";
        const strong = document.createElement("strong");
        strong.textContent = names[side];
        reveal.append(`Model ${side.toUpperCase()} was `, strong);
        reveal.hidden = false;
      }
      for (const b of voteButtons()) b.setAttribute("aria-pressed", String(b.dataset.winner === winner));
      els.result.textContent = `You voted “${LABELS[winner]}”: model A was ${names.a}, model B was ${names.b}. ` +
                               "The votes add up in “llmdesk arena leaderboard”.";
      els.newBattle.hidden = false;
      els.newBattle.focus();
    } catch (e) {
      for (const b of voteButtons()) b.disabled = false;
      els.result.textContent = "The vote was not recorded: " + (e.message || e);
      chat.setStatus("the vote was not recorded", true);
    }
  }

  // -- wiring -------------------------------------------------------------------------------
  els.modeChat.addEventListener("click", () => { if (!controller) setMode("chat", true); });
  els.modeArena.addEventListener("click", () => setMode("arena", true));
  chat.promptBox(els.form, els.input, start, () => controller !== null);
  els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
  els.newBattle.addEventListener("click", () => { if (!controller) { reset(); els.input.focus(); } });
  els.vote.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-winner]");
    if (b && !b.disabled) vote(b.dataset.winner);
  });
  els.panes.addEventListener("click", (ev) => {
    const btn = ev.target.closest(".copy-code");
    if (btn) chat.copyText(btn.closest(".code").querySelector("code").textContent, btn);
  });

  reset();
  let saved = null;
  try { saved = localStorage.getItem(MODE_KEY); } catch (e) { /* private mode */ }
  if (location.hash === "#arena" || saved === "arena") setMode("arena", true);
})();
