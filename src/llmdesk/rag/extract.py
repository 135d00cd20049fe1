"""Documents to text: one reader per kind of file, each giving the text and its blocks.

    doc = extract(Path("guide.pdf"))   # Extracted: .text, .blocks (headings, paragraphs), .kind

A block is a heading or a paragraph with where it came from: its character span in `doc.text`,
its lines (1-based; on a PDF, lines of its page) and its page (PDFs). For plain text and
Markdown `doc.text` is the file itself, so spans point into the file as it is on disk.

Readers (chosen because they are maintained, pure Python and pull in no heavy dependencies):
- text and Markdown: read as they are (UTF-8, else Windows-1252); Markdown's `#` headings and
  fenced code blocks are kept whole.
- HTML: the standard library's `html.parser`; script, style and template are skipped, h1-h6 are
  headings. Text a browser does not show (HTML comments, elements with `hidden`,
  `display:none` or `visibility:hidden`) is not content, but it is kept aside as the block's
  `hidden` text, so the injection guard sees what a page hides from its reader.
- PDF: `pypdf` (pure Python, BSD): text per page; an encrypted, corrupt or text-less PDF is one
  clear error.
- DOCX: `python-docx` (MIT): paragraphs and tables in order, "Heading N" and "Title" styles as
  headings; runs marked hidden are kept aside like HTML's hidden text.

A new kind of file is one function decorated with `@reader(".ext", ...)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import LlmdeskError


@dataclass
class Block:
    text: str
    char_start: int  # span in Extracted.text
    char_end: int
    line_start: int  # 1-based, inclusive; on a PDF, lines of its page
    line_end: int
    page: int | None = None  # 1-based (PDF)
    level: int = 0  # a heading's level (1 = top); 0 for a paragraph
    hidden: str = ""  # text in the source a reader does not see (HTML comments, hidden runs)


@dataclass
class Extracted:
    kind: str  # "text", "markdown", "html", "pdf", "docx"
    text: str
    blocks: list[Block] = field(default_factory=list)


Reader = Callable[[Path, bytes], Extracted]
READERS: dict[str, tuple[str, Reader]] = {}  # ".md" -> ("markdown", reader)


def reader(kind: str, *suffixes: str):
    """Register a reader for files ending in `suffixes` (lower case, with the dot)."""
    def register(fn: Reader) -> Reader:
        for s in suffixes:
            READERS[s] = (kind, fn)
        return fn
    return register


def supported(path: Path) -> bool:
    return path.suffix.lower() in READERS


def extract(path: Path, data: bytes | None = None) -> Extracted:
    """The text and blocks of the file at `path` (its bytes `data` if already read). Raises one
    LlmdeskError line for a file that cannot be read as a document."""
    suffix = path.suffix.lower()
    if suffix not in READERS:
        kinds = ", ".join(sorted(READERS))
        raise LlmdeskError(f"{path}: unsupported file type '{suffix or '(no extension)'}'; llmdesk reads {kinds}")
    if data is None:
        data = path.read_bytes()
    if not data:
        raise LlmdeskError(f"{path}: the file is empty (0 bytes)")
    kind, fn = READERS[suffix]
    doc = fn(path, data)
    if not any(b.text.strip() for b in doc.blocks if not b.level):
        raise LlmdeskError(f"{path}: no text found in this {kind} file"
                           + (" (a scanned PDF? run OCR on it first)" if kind == "pdf" else ""))
    return doc


# ---------------------------------------------------------------------------------------------
# building blocks from text

_BLANK_RE = re.compile(r"\n[ \t]*\n\s*")


class _Builder:
    """Appends headings and paragraphs to one text, keeping spans and line numbers."""

    def __init__(self, kind: str):
        self.kind = kind
        self.parts: list[str] = []
        self.pos = 0
        self.line = 1
        self.page_line0 = 1  # the line the current page starts on
        self.blocks: list[Block] = []

    def add(self, text: str, *, level: int = 0, page: int | None = None, hidden: str = "") -> None:
        text = text.strip()
        if not text:
            if hidden and self.blocks:  # hidden text with nothing shown around it: the last block holds it
                self.blocks[-1].hidden = (self.blocks[-1].hidden + "\n" + hidden).strip()
            return
        if self.parts:
            self.parts.append("\n\n")
            self.pos += 2
            self.line += 2
        start, first = self.pos, self.line
        self.parts.append(text)
        self.pos += len(text)
        self.line += text.count("\n")
        off = self.page_line0 - 1
        self.blocks.append(Block(text, start, self.pos, first - off, self.line - off, page, level, hidden.strip()))

    def new_page(self) -> None:
        self.page_line0 = self.line + (2 if self.parts else 0)

    def done(self) -> Extracted:
        return Extracted(self.kind, "".join(self.parts), self.blocks)


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise LlmdeskError(f"{path}: this is a binary file, not text; give a text, Markdown, HTML, PDF or DOCX file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            raise LlmdeskError(f"{path}: this is not UTF-8 text (a binary file?); save it as UTF-8") from None


def _line_of(text: str, pos: int, starts: list[int]) -> int:
    import bisect

    return bisect.bisect_right(starts, pos)


def _source_blocks(kind: str, text: str, markdown: bool) -> Extracted:
    """Paragraphs (separated by blank lines) of a text kept as it is; with `markdown`, ATX
    headings (`# Title`) are headings and a fenced code block is one paragraph."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    blocks: list[Block] = []

    def para(s: int, e: int) -> None:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            blocks.append(Block(text[s:e], s, e, _line_of(text, s, starts), _line_of(text, e - 1, starts)))

    if not markdown:
        s = 0
        for m in _BLANK_RE.finditer(text):
            para(s, m.start())
            s = m.end()
        para(s, len(text))
        return Extracted(kind, text, blocks)

    s = 0  # start of the paragraph being gathered
    fence = None
    for i, ls in enumerate(starts):
        le = starts[i + 1] if i + 1 < len(starts) else len(text)
        line = text[ls:le].rstrip("\n")
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence = None
                para(s, le)
                s = le
            continue
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if m:
            para(s, ls)
            s, fence = ls, m.group(1)
            continue
        h = re.match(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", line)
        if h:
            para(s, ls)
            title = h.group(2).strip()
            if title:
                blocks.append(Block(title, ls, ls + len(line), i + 1, i + 1, level=len(h.group(1))))
            s = le
        elif not stripped:
            para(s, ls)
            s = le
    para(s, len(text))
    return Extracted(kind, text, blocks)


@reader("text", ".txt", ".text", ".rst")
def read_text(path: Path, data: bytes) -> Extracted:
    return _source_blocks("text", _decode(path, data), markdown=False)


@reader("markdown", ".md", ".markdown")
def read_markdown(path: Path, data: bytes) -> Extracted:
    return _source_blocks("markdown", _decode(path, data), markdown=True)


# ---------------------------------------------------------------------------------------------
# HTML

_SKIP = {"script", "style", "template", "noscript", "head", "svg", "math"}
_BREAK = {"p", "div", "li", "ul", "ol", "tr", "table", "br", "section", "article", "pre", "blockquote", "dt", "dd",
          "dl", "header", "footer", "nav", "main", "aside", "figure", "figcaption", "hr", "form", "details", "summary",
          "caption", "title", "body"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_HIDDEN_STYLE_RE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0(?![.\d])", re.I)


class _HTML(HTMLParser):
    def __init__(self, b: _Builder):
        super().__init__(convert_charrefs=True)
        self.b = b
        self.buf: list[str] = []
        self.hidden: list[str] = []
        self.heading = 0
        self.skip: list[str] = []  # open elements whose text is skipped
        self.hide: list[str] = []  # open elements whose text is hidden (kept aside)
        self.pre = 0

    def flush(self) -> None:
        text = "".join(self.buf)
        if not self.pre:
            text = re.sub(r"[ \t\r\f\v]*\n[ \t\r\f\v\n]*", "\n", re.sub(r"[ \t\r\f\v]+", " ", text))
        self.b.add(text, level=self.heading, hidden="\n".join(self.hidden))
        self.buf, self.hidden = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.skip:
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if tag in _SKIP:
            self.skip.append(tag)
            return
        if self.hide or "hidden" in a or a.get("aria-hidden") == "true" or _HIDDEN_STYLE_RE.search(a.get("style") or ""):
            if tag not in _VOID:
                self.hide.append(tag)
            return
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.flush()
            self.heading = int(tag[1])
        elif tag in _BREAK:
            if tag == "br":
                self.buf.append("\n")
            else:
                self.flush()
            if tag == "pre":
                self.pre += 1
        elif tag in ("td", "th"):
            self.buf.append(" | " if self.buf and not "".join(self.buf).endswith("\n") else "")

    def handle_endtag(self, tag):
        for stack in (self.skip, self.hide):
            if stack:
                if tag in stack:  # close up to the matching element (forgiving of unclosed ones)
                    while stack and stack.pop() != tag:
                        pass
                return
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6") and self.heading:
            self.flush()
            self.heading = 0
        elif tag in _BREAK:
            self.flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.skip:
            return
        (self.hidden if self.hide else self.buf).append(data)

    def handle_comment(self, data):
        if data.strip() and not self.skip:
            self.hidden.append(data.strip())


@reader("html", ".html", ".htm", ".xhtml")
def read_html(path: Path, data: bytes) -> Extracted:
    b = _Builder("html")
    p = _HTML(b)
    p.feed(_decode(path, data))
    p.close()
    p.flush()
    return b.done()


# ---------------------------------------------------------------------------------------------
# PDF and DOCX


@reader("pdf", ".pdf")
def read_pdf(path: Path, data: bytes) -> Extracted:
    import io
    import logging

    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about odd files are not the user's business
    try:
        pdf = pypdf.PdfReader(io.BytesIO(data))
        if pdf.is_encrypted:
            try:
                ok = pdf.decrypt("")  # many "encrypted" PDFs only restrict printing: empty user password
            except Exception:  # noqa: BLE001 - pypdf raises several kinds here (unsupported algorithm, ...)
                ok = 0
            if not ok:
                raise LlmdeskError(f"{path}: the PDF is encrypted with a password; decrypt it first "
                                   "(e.g. `qpdf --decrypt --password=... in.pdf out.pdf`)")
        b = _Builder("pdf")
        for n, page in enumerate(pdf.pages, 1):
            b.new_page()
            text = page.extract_text() or ""
            for para in _BLANK_RE.split(text):
                b.add(para, page=n)
        return b.done()
    except LlmdeskError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt PDF fails inside pypdf in many ways
        raise LlmdeskError(f"{path}: cannot read this PDF ({type(e).__name__}: {str(e)[:120]}); "
                           "is it complete and not damaged?") from None


@reader("docx", ".docx")
def read_docx(path: Path, data: bytes) -> Extracted:
    import io

    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        d = docx.Document(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - zipfile, lxml and python-docx errors alike
        raise LlmdeskError(f"{path}: cannot read this DOCX ({type(e).__name__}: {str(e)[:120]}); "
                           "is it a Word document, complete and not damaged?") from None
    b = _Builder("docx")
    for item in d.iter_inner_content():
        if isinstance(item, Paragraph):
            shown = "".join(r.text for r in item.runs if not r.font.hidden) if item.runs else item.text
            hidden = "".join(r.text for r in item.runs if r.font.hidden)
            style = (item.style.name if item.style is not None else "") or ""
            m = re.match(r"Heading (\d)", style)
            level = int(m.group(1)) if m else 1 if style == "Title" else 0
            b.add(shown, level=level, hidden=hidden)
        elif isinstance(item, Table):
            for row in item.rows:
                b.add(" | ".join(dict.fromkeys(c.text.strip() for c in row.cells)))
    return b.done()
