"""The prompt-injection flagger measured on a labelled set: detection rate and false-positive rate.

    .venv/bin/python benchmarks/injection_guard.py                 # both splits, per style
    .venv/bin/python benchmarks/injection_guard.py --misses dev    # what the rules miss or wrongly flag
    .venv/bin/python benchmarks/injection_guard.py --corpus /usr/share/doc/python3.11/html/library

benchmarks/data/injection_passages.jsonl holds injection passages in many styles (direct orders,
fake system/role tags, delimiter escapes, encoded instructions, hidden text, role-play,
multilingual, exfiltration, indirect "note to the AI") and benign passages on the same topics,
with hard negatives (docs that say "ignore", "system", "instructions", chat-template docs with
role tags in code, base64 in code). Each row is in the "dev" split (the rules were tuned while
looking at it) or the "test" split (held out: read only to report): the test figures are the
honest ones. The same author wrote the rules and the set, so even the test split flatters them;
real attacks vary more.

`--corpus DIR` adds a false-positive rate on text nobody here wrote: every document in DIR
(Debian's python3-doc library reference, say: `apt-get install python3-doc`) extracted and
chunked as `llmdesk docs add` does (tokens counted as 4/3 of the words), each chunk flagged as at
ingest. The manual gives no orders to a model, so every flagged chunk is a false positive (they
are listed, to be read).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmdesk.rag.guard import injection_flags  # noqa: E402

DATA = Path(__file__).with_name("data") / "injection_passages.jsonl"


def load(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rates(rows: list[dict]) -> tuple[int, int, int, int]:
    """(injections flagged, injections, benign flagged, benign)."""
    inj = [r for r in rows if r["label"] == "injection"]
    ben = [r for r in rows if r["label"] == "benign"]
    return sum(bool(r["flags"]) for r in inj), len(inj), sum(bool(r["flags"]) for r in ben), len(ben)


def pct(a: int, b: int) -> str:
    return f"{a}/{b} = {100 * a / b:5.1f}%" if b else "-"


def corpus_false_positives(folder: Path) -> None:
    from llmdesk.errors import LlmdeskError
    from llmdesk.rag.chunk import chunk
    from llmdesk.rag.extract import READERS, extract

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in READERS)
    chunks = []
    for path in files:
        try:
            doc = extract(path)
        except LlmdeskError:
            continue
        for ch in chunk(doc, count_tokens=lambda t: len(t.split()) * 4 // 3):
            hidden = "\n<!-- " + ch.hidden.replace("-->", "- ->") + " -->" if ch.hidden else ""
            chunks.append((path, ch.text + hidden))
    t0 = time.process_time()
    flagged = [(path, text, injection_flags(text)) for path, text in chunks]
    took = time.process_time() - t0
    flagged = [f for f in flagged if f[2]]
    chars = sum(len(t) for _, t in chunks)
    print(f"\ncorpus {folder}: {len(files)} files, {len(chunks)} chunks ({chars / max(len(chunks), 1):.0f} characters "
          f"on average); flagged {pct(len(flagged), len(chunks))} (all false positives); "
          f"{1e3 * took / max(len(chunks), 1):.2f} ms of CPU a chunk")
    for path, text, flags in flagged:
        print(f"  FALSE+ {path.name}: {flags} {' '.join(text.split())[:140]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--misses", choices=["dev", "test", "all"], help="list the misses and false positives of a split")
    ap.add_argument("--corpus", type=Path, help="a folder of benign documents: the false-positive rate on its chunks")
    args = ap.parse_args()
    rows = load(args.data)
    took = float("inf")
    for _ in range(5):  # the best of five passes: the machine's other work only adds time
        t0 = time.process_time()
        for r in rows:
            r["flags"] = injection_flags(r["text"])
        took = min(took, time.process_time() - t0)
    chars = sum(len(r["text"]) for r in rows)

    print(f"{len(rows)} passages from {args.data.name}; the flagger took {1e6 * took / len(rows):.0f} us a passage "
          f"({1e6 * took / chars * 1000:.0f} us per 1000 characters, CPU time, best of 5 passes)\n")
    print(f"{'split':<6} {'detected (injections flagged)':<32} {'false positives (benign flagged)':<32}")
    for split in ("dev", "test"):
        d, n, f, m = rates([r for r in rows if r["split"] == split])
        print(f"{split:<6} {pct(d, n):<32} {pct(f, m):<32}")
    d, n, f, m = rates(rows)
    print(f"{'all':<6} {pct(d, n):<32} {pct(f, m):<32}")

    print(f"\nper style, test split (dev in brackets)")
    print(f"{'style':<14} {'detected':<22} {'false positives':<22}")
    by_style: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_style[r["style"]][r["split"]].append(r)
    for style, splits in by_style.items():
        td, tn, tf, tm = rates(splits["test"])
        dd, dn, df, dm = rates(splits["dev"])
        print(f"{style:<14} {f'{td}/{tn} ({dd}/{dn})':<22} {f'{tf}/{tm} ({df}/{dm})':<22}")

    if args.corpus is not None:
        corpus_false_positives(args.corpus)

    if args.misses:
        print()
        for r in rows:
            if args.misses != "all" and r["split"] != args.misses:
                continue
            missed = r["label"] == "injection" and not r["flags"]
            wrong = r["label"] == "benign" and r["flags"]
            if missed or wrong:
                print(f"{'MISSED' if missed else 'FALSE+'} {r['id']}: {r['flags']} {r['text'][:110]!r}")


if __name__ == "__main__":
    main()
