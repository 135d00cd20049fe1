// A small Markdown renderer for the chat: headings, paragraphs, emphasis, inline code, fenced
// code blocks (with a copy button), lists (nested by indentation), block quotes, tables, rules,
// and links. Everything the model wrote is HTML-escaped first, so no markup of its own gets
// through; links keep only http(s) and mailto targets. An unclosed code fence (an answer still
// streaming) renders as a code block to the end.
"use strict";

(function () {
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escape = (s) => s.replace(/[&<>"']/g, (c) => ESC[c]);

  function safeUrl(url) {
    const u = url.trim();
    return /^(https?:\/\/|mailto:)/i.test(u) ? u : null;
  }

  // inline: `code` first (its content stays literal), then links, emphasis, autolinks
  function inline(text) {
    const parts = text.split(/(`+[^`]*?`+)/g);
    return parts
      .map((part, i) => {
        if (i % 2 === 1) {
          const m = part.match(/^(`+)([\s\S]*?)\1$/);
          if (m) return "<code>" + escape(m[2].replace(/^ (.*) $/, "$1")) + "</code>";
        }
        let s = escape(part);
        s = s.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (all, label, href) => {
          const url = safeUrl(href.replace(/&amp;/g, "&"));
          return url ? `<a href="${escape(url)}" target="_blank" rel="noopener noreferrer">${label}</a>` : all;
        });
        s = s.replace(/(^|[\s(])(https?:\/\/[^\s<)]+)/g, (all, pre, url) =>
          `${pre}<a href="${url}" target="_blank" rel="noopener noreferrer">${url}</a>`);
        s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
        s = s.replace(/__(?=\S)([\s\S]*?\S)__/g, "<strong>$1</strong>");
        s = s.replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\*)/g, "$1<em>$2</em>");
        s = s.replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
        s = s.replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
        return s;
      })
      .join("");
  }

  function codeBlock(code, lang) {
    const label = lang ? escape(lang) : "code";
    return (
      `<div class="code"><div class="code-head"><span>${label}</span>` +
      `<button type="button" class="copy-code" title="Copy code">Copy</button></div>` +
      `<pre><code${lang ? ` class="language-${escape(lang)}"` : ""}>${escape(code)}</code></pre></div>`
    );
  }

  const isTableSep = (line) => /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(line);
  const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

  function render(src) {
    const lines = src.replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      // fenced code
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        i++; // the closing fence (or past the end)
        out.push(codeBlock(body.join("\n"), fence[2]));
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const h = line.match(/^(#{1,6})\s+(.*?)\s*#*\s*$/);
      if (h) { out.push(`<h${h[1].length}>${inline(h[2])}</h${h[1].length}>`); i++; continue; }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { out.push("<hr>"); i++; continue; }
      if (/^\s*>/.test(line)) {
        const body = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
        out.push(`<blockquote>${render(body.join("\n"))}</blockquote>`);
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && isTableSep(lines[i + 1])) {
        const head = cells(line);
        i += 2;
        const rows = [];
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(cells(lines[i++]));
        out.push(
          "<table><thead><tr>" + head.map((c) => `<th>${inline(c)}</th>`).join("") + "</tr></thead><tbody>" +
          rows.map((r) => "<tr>" + r.map((c) => `<td>${inline(c)}</td>`).join("") + "</tr>").join("") +
          "</tbody></table>");
        continue;
      }
      const li = line.match(LIST);
      if (li) {
        const indent = li[1].length;
        const ordered = /\d/.test(li[2]);
        const items = [];
        while (i < lines.length) {
          const m = lines[i].match(LIST);
          if (m && m[1].length === indent) { items.push([m[3]]); i++; continue; }
          if (lines[i].trim() && (/^\s/.test(lines[i]) || (m && m[1].length > indent)) && items.length) {
            items[items.length - 1].push(lines[i].slice(Math.min(indent + 2, lines[i].search(/\S/))));
            i++;
            continue;
          }
          if (!lines[i].trim() && i + 1 < lines.length && (lines[i + 1].match(LIST) || /^\s{2,}\S/.test(lines[i + 1]))) {
            i++;
            continue;
          }
          break;
        }
        const tag = ordered ? "ol" : "ul";
        const start = ordered ? parseInt(li[2], 10) : 1;
        out.push(`<${tag}${ordered && start !== 1 ? ` start="${start}"` : ""}>` +
          items.map((it) => {
            const [first, ...rest] = it;
            const nested = rest.length ? render(rest.join("\n")) : "";
            return `<li>${inline(first)}${nested}</li>`;
          }).join("") + `</${tag}>`);
        continue;
      }
      // a paragraph: up to a blank line or the start of another block
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>)/.test(lines[i]) &&
             !(para.length && LIST.test(lines[i]))) {
        para.push(lines[i++]);
      }
      out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    }
    return out.join("\n");
  }

  window.renderMarkdown = render;
  window.escapeHtml = escape;
})();
