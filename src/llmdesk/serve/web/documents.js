// The web chat's Documents panel: pick a collection to answer from, add files to one (uploaded to
// /v1/collections/NAME/files, with progress and one line per file that could not be read), and
// the answers' [n] citations as links to their passages: file, heading, page or lines, the text,
// and a mark on passages that looked like instructions to the model. The server quotes the
// passages to the model (/v1/chat/completions with "collection") and sends them back as
// `sources`; this page only shows them. Loaded before app.js, which calls window.llmdeskDocs.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "llmdesk.collection";
  const chat = () => window.llmdeskChat; // app.js: headers, errorText, askKey, setStatus
  let els = null;
  let collections = [];

  const saved = () => { try { return JSON.parse(localStorage.getItem(KEY)) || ""; } catch (e) { return ""; } };
  const remember = (name) => { try { localStorage.setItem(KEY, JSON.stringify(name)); } catch (e) { /* private mode */ } };

  // -- where a passage is, in words -----------------------------------------------------------
  function where(s) {
    const parts = [];
    if (s.headings && s.headings.length) parts.push(s.headings.join(" › "));
    if (s.page !== null && s.page !== undefined) parts.push(`page ${s.page}`);
    parts.push(s.line_start === s.line_end ? `line ${s.line_start}` : `lines ${s.line_start}–${s.line_end}`);
    return parts.join(" · ");
  }
  const flagged = (s) => !!(s.flags && s.flags.length);

  // -- [n] in an answer -> buttons that open the passage --------------------------------------
  const CITE = /\[(\d+(?:\s*(?:,|;|-|–)\s*\d+)*)\](?!\()/g; // [1], [1, 2], [1-3]; not a [1](link)

  function numbers(group) {
    const out = [];
    for (const part of group.split(/\s*[,;]\s*/)) {
      const [a, b] = part.split(/\s*[-–]\s*/).map((x) => parseInt(x, 10));
      if (b !== undefined && b >= a && b - a < 50) for (let n = a; n <= b; n++) out.push(n);
      else out.push(a);
    }
    return out;
  }

  function citeButton(s) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "cite" + (flagged(s) ? " flagged" : "");
    b.dataset.n = s.n;
    b.textContent = String(s.n);
    b.title = `${s.path} · ${where(s)}` + (flagged(s) ? " · flagged" : "");
    b.setAttribute("aria-label", `source ${s.n}: ${s.path}, ${where(s)}`);
    return b;
  }

  function linkCitations(bubble, byN) {
    const walker = document.createTreeWalker(bubble, NodeFilter.SHOW_TEXT, {
      acceptNode: (node) => (node.parentElement.closest("code, pre, a") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT),
    });
    const nodes = [];
    while (walker.nextNode()) nodes.push(walker.currentNode);
    for (const node of nodes) {
      const text = node.nodeValue;
      const frag = document.createDocumentFragment();
      let last = 0, found = false, m;
      CITE.lastIndex = 0;
      while ((m = CITE.exec(text))) {
        const nums = numbers(m[1]);
        if (!nums.some((n) => byN.has(n))) continue; // no passage has it: left as the model wrote it
        found = true;
        frag.append(text.slice(last, m.index), "[");
        nums.forEach((n, i) => {
          if (i) frag.append(", ");
          frag.append(byN.has(n) ? citeButton(byN.get(n)) : String(n));
        });
        frag.append("]");
        last = m.index + m[0].length;
      }
      if (!found) continue;
      frag.append(text.slice(last));
      node.replaceWith(frag);
    }
  }

  // -- the sources under an answer ------------------------------------------------------------
  function sourceList(m) {
    const box = document.createElement("div");
    box.className = "sources";
    const head = document.createElement("div");
    head.className = "sources-head";
    head.textContent = m.collection ? `Sources from ${m.collection}` : "Sources";
    box.append(head);
    if (!m.sources.length) {
      const none = document.createElement("p");
      none.className = "hint";
      none.textContent = "nothing in the collection matched the question";
      box.append(none);
    }
    const list = document.createElement("ol");
    for (const s of m.sources) {
      const li = document.createElement("li");
      li.className = "source" + (flagged(s) ? " flagged" : "");
      const link = document.createElement("button");
      link.type = "button";
      link.className = "source-link";
      link.dataset.n = s.n;
      link.textContent = `[${s.n}] ${s.path}`;
      const at = document.createElement("span");
      at.className = "where";
      at.textContent = where(s);
      li.append(link, at);
      if (flagged(s)) {
        const flag = document.createElement("span");
        flag.className = "flag";
        flag.textContent = "flagged";
        flag.title = `looks like instructions to the model (${s.flags.join(", ")}): quoted to it as data, not obeyed`;
        li.append(flag);
      }
      list.append(li);
    }
    if (m.sources.length) box.append(list);
    const dropped = m.sourcesDropped || [];
    if (dropped.length) {
      const note = document.createElement("p");
      note.className = "hint";
      note.textContent = `${dropped.length} more passage${dropped.length > 1 ? "s" : ""} retrieved did not fit in the ` +
        "context and were left out: " + dropped.map((s) => `${s.path} (${where(s)})`).join("; ");
      box.append(note);
    }
    return box;
  }

  // -- the passage, in a popover --------------------------------------------------------------
  function showSource(button, s) {
    const pop = els.pop;
    if (!pop.hidden && pop.dataset.owner === button.dataset.key) { hideSource(); return; }
    pop.textContent = "";
    const head = document.createElement("div");
    head.className = "pop-head";
    head.textContent = `[${s.n}] ${s.path}`;
    const at = document.createElement("div");
    at.className = "pop-where";
    at.textContent = where(s);
    pop.append(head, at);
    if (flagged(s)) {
      const flag = document.createElement("div");
      flag.className = "pop-flag";
      flag.textContent = `Flagged: this passage looks like instructions to the model (${s.flags.join(", ")}). ` +
        "It was quoted to the model as data, not as instructions.";
      pop.append(flag);
    }
    const text = document.createElement("blockquote");
    text.className = "passage";
    text.textContent = s.text;
    pop.append(text);
    pop.hidden = false;
    pop.dataset.owner = button.dataset.key;
    const r = button.getBoundingClientRect();
    const w = pop.offsetWidth, h = pop.offsetHeight;
    pop.style.left = Math.max(8, Math.min(r.left, window.innerWidth - w - 8)) + "px";
    pop.style.top = (r.bottom + 6 + h < window.innerHeight ? r.bottom + 6 : Math.max(8, r.top - h - 6)) + "px";
  }
  function hideSource() {
    if (els && !els.pop.hidden) { els.pop.hidden = true; els.pop.dataset.owner = ""; }
  }

  let keys = 0;
  function decorate(wrap, bubble, m) {
    if (m.role !== "assistant" || m.error || !Array.isArray(m.sources)) return;
    const byN = new Map(m.sources.map((s) => [s.n, s]));
    linkCitations(bubble, byN);
    wrap.insertBefore(sourceList(m), bubble.nextSibling);
    wrap.addEventListener("click", (ev) => {
      const btn = ev.target.closest(".cite, .source-link");
      if (!btn) return;
      ev.stopPropagation();
      if (!btn.dataset.key) btn.dataset.key = String(++keys);
      showSource(btn, byN.get(parseInt(btn.dataset.n, 10)));
    });
  }

  // -- collections ----------------------------------------------------------------------------
  function showChoice() {
    const name = els.collection.value;
    els.toggle.textContent = name ? `Documents: ${name}` : "Documents";
    els.toggle.classList.toggle("on", !!name);
    const c = collections.find((x) => x.name === name);
    els.info.textContent = c ? `${c.documents} file${c.documents === 1 ? "" : "s"}, ${c.chunks} passages · ` +
      `embedding model ${c.model} · answers cite them as [1], [2]` : "answers come from the model alone";
    $("input").placeholder = name ? `Ask about ${name}` : "Type a message";
  }

  async function loadCollections(pick) {
    let resp;
    try {
      resp = await fetch("/v1/collections", { headers: chat().headers() });
    } catch (e) {
      return;
    }
    if (!resp.ok) return; // a missing key is asked for by the model list
    collections = (await resp.json()).data || [];
    const wanted = pick !== undefined ? pick : (els.collection.value || saved());
    els.collection.textContent = "";
    els.collection.append(new Option("no documents", ""));
    els.names.textContent = "";
    for (const c of collections) {
      els.collection.append(new Option(`${c.name} (${c.documents} file${c.documents === 1 ? "" : "s"})`, c.name));
      els.names.append(new Option(c.name));
    }
    els.collection.value = collections.some((c) => c.name === wanted) ? wanted : "";
    remember(els.collection.value);
    if (!els.uploadTo.value && els.collection.value) els.uploadTo.value = els.collection.value;
    showChoice();
  }

  // -- uploads --------------------------------------------------------------------------------
  function say(text, isError) {
    els.uploadStatus.textContent = text;
    els.uploadStatus.classList.toggle("error", !!isError);
  }

  function report(name, r) {
    els.results.textContent = "";
    const parts = [];
    for (const [k, label] of [["added", "added"], ["updated", "updated"], ["unchanged", "unchanged"]]) {
      if (r[k]) parts.push(`${r[k]} ${label}`);
    }
    say(`${name}: ${parts.join(", ") || "nothing added"}` + (r.chunks ? ` (${r.chunks} passages)` : "") +
        (r.errors.length ? `, ${r.errors.length} not read` : ""), !parts.length);
    for (const e of r.errors) {
      const li = document.createElement("li");
      li.className = "error";
      li.textContent = e.error.startsWith(e.file) ? e.error : `${e.file}: ${e.error}`; // errors name their file
      els.results.append(li);
    }
  }

  function upload(files) {
    files = [...files];
    if (!files.length) return;
    const name = els.uploadTo.value.trim() || els.collection.value;
    if (!name) { say("name the collection to add the files to", true); els.uploadTo.focus(); return; }
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/collections/${encodeURIComponent(name)}/files`);
    const h = chat().headers();
    if (h.Authorization) xhr.setRequestHeader("Authorization", h.Authorization);
    els.progress.hidden = false;
    els.progress.value = 0;
    els.results.textContent = "";
    const what = files.length === 1 ? files[0].name : `${files.length} files`;
    say(`uploading ${what}…`);
    xhr.upload.onprogress = (ev) => {
      if (!ev.lengthComputable) return;
      els.progress.max = ev.total;
      els.progress.value = ev.loaded;
      say(`uploading ${what}: ${Math.round((100 * ev.loaded) / ev.total)}%`);
    };
    xhr.upload.onload = () => { els.progress.removeAttribute("value"); say(`reading and indexing ${what}…`); };
    xhr.onerror = () => { els.progress.hidden = true; say("cannot reach the server", true); };
    xhr.onload = () => {
      els.progress.hidden = true;
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 401) { chat().askKey(); say("an API key is needed", true); return; }
      if (xhr.status !== 200) {
        const msg = body && body.error && (body.error.message || body.error);
        say(msg || `the server answered ${xhr.status}`, true);
        return;
      }
      report(name, body);
      if (body.added || body.updated || body.unchanged) loadCollections(name);
    };
    xhr.send(form);
    els.files.value = "";
  }

  // -- for app.js -----------------------------------------------------------------------------
  window.llmdeskDocs = {
    // the request fields: the collection picked, if any
    fields: () => (els && els.collection.value ? { collection: els.collection.value } : {}),
    // a streamed chunk: the sources come in one without choices, after the answer
    take(answer, chunk) {
      if (chunk.sources === undefined) return;
      answer.sources = chunk.sources;
      answer.sourcesDropped = chunk.sources_dropped || [];
    },
    decorate,
  };

  document.addEventListener("DOMContentLoaded", () => {
    els = {
      toggle: $("toggle-docs"), panel: $("documents"), collection: $("collection"), info: $("collection-info"),
      drop: $("drop"), uploadTo: $("upload-to"), names: $("collection-names"), files: $("doc-files"),
      progress: $("upload-progress"), uploadStatus: $("upload-status"), results: $("upload-results"), pop: $("cite-pop"),
    };
    els.toggle.addEventListener("click", () => {
      els.panel.hidden = !els.panel.hidden;
      els.toggle.setAttribute("aria-expanded", String(!els.panel.hidden));
      if (!els.panel.hidden) loadCollections();
    });
    els.collection.addEventListener("change", () => {
      remember(els.collection.value);
      if (els.collection.value) els.uploadTo.value = els.collection.value;
      showChoice();
    });
    els.files.addEventListener("change", () => upload(els.files.files));
    for (const type of ["dragenter", "dragover"]) {
      els.drop.addEventListener(type, (ev) => { ev.preventDefault(); els.drop.classList.add("over"); });
    }
    els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
    els.drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      els.drop.classList.remove("over");
      upload(ev.dataTransfer.files);
    });
    document.addEventListener("click", (ev) => { if (!els.pop.contains(ev.target)) hideSource(); });
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") hideSource(); });
    $("messages").addEventListener("scroll", hideSource);
    loadCollections();
  });
})();
