"""Blocks to chunks: by headings and paragraphs, up to a token budget, with overlap.

    chunks = chunk(doc, count_tokens=model_token_count, budget=256, overlap=32)

A chunk never crosses a heading (or a PDF page): its heading path (["Guide", "Install"]) is
what it sits under. Within a section, whole paragraphs are packed while they fit in `budget`
tokens of the embedding model (the heading path, which is embedded with the text, counts too);
a paragraph longer than that is cut at sentence ends, and a sentence longer than that at words.
A new chunk in the same section starts with the last pieces of the one before that fit in
`overlap` tokens, so a passage cut in two is whole in one of them. Each chunk's text is the
document's own text over its span, so its char span and lines point at what the user wrote.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .extract import Block, Extracted

DEFAULT_BUDGET = 256  # tokens: all-MiniLM-L6-v2 was trained on passages of at most 256 word pieces
DEFAULT_OVERLAP = 32


@dataclass
class Chunk:
    text: str
    headings: list[str]
    page: int | None
    line_start: int
    line_end: int
    char_start: int
    char_end: int
    hidden: str = ""  # hidden text (HTML comments, hidden runs) inside the chunk's span
    n_tokens: int = 0

    @property
    def embed_text(self) -> str:
        """What is embedded: the heading path, then the text."""
        return " > ".join(self.headings) + "\n" + self.text if self.headings else self.text


@dataclass
class _Unit:  # a paragraph, or a piece of a long one
    start: int
    end: int
    line_start: int
    line_end: int
    tokens: int
    hidden: str = ""


@dataclass
class _Section:
    headings: list[str]
    page: int | None
    blocks: list[Block] = field(default_factory=list)


_SENTENCE_RE = re.compile(r"(?<=[.!?:;])\s+|\n")


def _sections(doc: Extracted) -> list[_Section]:
    out: list[_Section] = []
    path: list[tuple[int, str]] = []  # (level, title)
    for b in doc.blocks:
        if b.level:
            while path and path[-1][0] >= b.level:
                path.pop()
            path.append((b.level, " ".join(b.text.split())))
            if b.hidden:  # a heading's hidden text goes with the section it opens
                out.append(_Section([t for _, t in path], b.page))
                out[-1].blocks.append(Block("", b.char_end, b.char_end, b.line_end, b.line_end, b.page, 0, b.hidden))
            continue
        heads = [t for _, t in path]
        if not out or out[-1].headings != heads or out[-1].page != b.page:
            out.append(_Section(heads, b.page))
        out[-1].blocks.append(b)
    return out


def _sentences(text: str, start: int, end: int, count: Callable[[str], int],
               line_of: Callable[[int], int]) -> list[_Unit]:
    """text[start:end] cut at sentence ends (and line breaks)."""
    pieces, s = [], start
    for m in _SENTENCE_RE.finditer(text, start, end):
        if m.start() > s:
            pieces.append((s, m.start()))
        s = m.end()
    if s < end:
        pieces.append((s, end))
    return [_Unit(a, b, line_of(a), line_of(b - 1), count(text[a:b])) for a, b in pieces]


def chunk(doc: Extracted, *, count_tokens: Callable[[str], int], budget: int = DEFAULT_BUDGET,
          overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """The chunks of `doc`, in order. `count_tokens(text)` counts the embedding model's tokens."""
    text = doc.text
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    import bisect

    line_base: dict[int | None, int] = {}  # PDF: lines count from each page's first line

    def line_of(pos: int) -> int:
        return bisect.bisect_right(starts, pos)

    for b in doc.blocks:
        if b.page is not None and b.page not in line_base:
            line_base[b.page] = line_of(b.char_start) - b.line_start

    chunks: list[Chunk] = []
    for sec in _sections(doc):
        head_tokens = count_tokens(" > ".join(sec.headings)) + 1 if sec.headings else 0
        room = max(16, budget - head_tokens - 2)  # 2: the model's own start and end tokens
        units: list[_Unit] = []
        for b in sec.blocks:
            if not b.text:  # hidden text only
                if units:
                    units[-1].hidden = (units[-1].hidden + "\n" + b.hidden).strip()
                continue
            n = count_tokens(b.text)
            if n <= room:
                units.append(_Unit(b.char_start, b.char_end, line_of(b.char_start), line_of(b.char_end - 1), n,
                                   b.hidden))
            else:
                parts = _words_if_needed(text, b, count_tokens, room, line_of)
                parts[-1].hidden = b.hidden
                units.extend(parts)
        if not units:
            continue
        base = line_base.get(sec.page, 0)
        cur: list[_Unit] = []
        used = 0
        for u in units:
            if cur and used + u.tokens > room:
                chunks.append(_make(text, cur, sec, base))
                # overlap: the last units of the chunk just made that fit in `overlap` tokens
                keep: list[_Unit] = []
                kept = 0
                for prev in reversed(cur):
                    if kept + prev.tokens > overlap or kept + prev.tokens + u.tokens > room:
                        break
                    keep.insert(0, prev)
                    kept += prev.tokens
                cur, used = keep, kept
            cur.append(u)
            used += u.tokens
        chunks.append(_make(text, cur, sec, base))
    return chunks


def _words_if_needed(text: str, b: Block, count, room: int, line_of) -> list[_Unit]:
    units = _sentences(text, b.char_start, b.char_end, count, line_of)
    out: list[_Unit] = []
    for u in units:
        if u.tokens > room:  # one sentence longer than the room: cut it at words
            out.extend(_by_words(text, u.start, u.end, count, room, line_of))
        else:
            out.append(u)
    return out


def _by_words(text: str, start: int, end: int, count, room: int, line_of) -> list[_Unit]:
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[start:end])]
    out: list[_Unit] = []
    i = 0
    while i < len(words):
        j, lo, hi = i + 1, i + 1, len(words)
        while lo <= hi:  # the most words from i that fit (binary search on the count)
            mid = (lo + hi) // 2
            a, b = start + words[i][0], start + words[mid - 1][1]
            if count(text[a:b]) <= room:
                j, lo = mid, mid + 1
            else:
                hi = mid - 1
        a, b = start + words[i][0], start + words[j - 1][1]
        out.append(_Unit(a, b, line_of(a), line_of(b - 1), count(text[a:b])))
        i = j
    return out


def _make(text: str, units: list[_Unit], sec: _Section, base: int) -> Chunk:
    a, b = units[0].start, units[-1].end
    return Chunk(text[a:b], list(sec.headings), sec.page, units[0].line_start - base, units[-1].line_end - base, a, b,
                 "\n".join(u.hidden for u in units if u.hidden), sum(u.tokens for u in units))
