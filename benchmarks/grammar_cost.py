"""What llama.cpp's grammar sampler costs per token, for the shapes of JSON schema that make it grow.

    .venv/bin/python benchmarks/grammar_cost.py [--vocab synth32k,letters32k] [--unchecked] [--quick]
        [--only SUBSTRING] [--json out.json]

A grammar sampler (llama.cpp's llama-grammar.cpp) keeps one parse stack per way the text so far
can be read; for every token of the vocabulary it walks the token's characters through those
stacks, and after a token is accepted it advances every stack. Its cost per token is therefore
(vocabulary size) x (live stacks), plus the work of advancing the stacks, which grows with how
ambiguous the grammar is at that point of the text. Ambiguity is what grows: a quantified group
whose body can match nothing or repeat ("([a-z]*){0,40}"), overlapping alternatives under a
repetition ("(a|aa){0,40}"), many optional properties, many anyOf branches that start alike.

Each row is one schema: converted to GBNF (`llmdesk.runtime.grammars.schema_grammar`, timed), the
grammar sampler made for the vocabulary (timed: llama.cpp parses and expands the grammar), then
applied to the whole vocabulary (every token a candidate, as in generation) at step 0 and after
accepting a walk of single characters the grammar allows ("aaaa...", '{"p0": 0, "p1": ...'),
the apply timed at steps 0, 8 and 32, and the slowest accept. The blow-up grows as the parse
advances, so the later steps matter as much as the first. Each grammar is measured in a worker
process, ended when it takes longer than --timeout (one apply is one C call: it cannot be
interrupted), and a series stops growing N after a timeout.

Vocabularies (the cost is per vocabulary token, so a real-sized vocabulary is needed):
  synth32k    llmdesk's synthetic Llama tokenizer padded to 32000 tokens (TinyLlama's size):
              byte-level BPE, most filler tokens are " word" (a leading space)
  letters32k  32000 tokens that are all lowercase strings of 1-4 letters, digits and the 256
              bytes: the worst case for letter patterns, where every token is a candidate
  synth152k   the synthetic tokenizer at Qwen 2.5's 152064 tokens (with --vocab)

By default schemas go through `schema_grammar`, so shapes that llmdesk refuses print the refusal;
--unchecked converts them with llama-cpp-python's converter directly, to measure what a refused
shape would have cost.

Runs on one thread (the grammar sampler is single-threaded anyway); no model weights are used.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import itertools
import json
import string
import sys
import time
from pathlib import Path

import llama_cpp as C
import numpy as np

from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.runtime.llama import init_backend
from llmdesk.serve.errors import APIError
from llmdesk.runtime.grammars import live_parses, schema_grammar

CACHE = Path.home() / ".cache" / "llmdesk-bench-models"

# ---------------------------------------------------------------------------------------------
# vocabularies


def letters_vocab_gguf(path: Path, n_vocab: int = 32000) -> Path:
    """A vocabulary-only GGUF shaped like a real one for letter patterns: the 256 byte tokens,
    lowercase words of 2-16 letters (pure: a letter pattern accepts them whole) and words that
    end in a non-letter ("ing,", "tion_", "abcA", 'ed"'), which a letter pattern rejects only at
    their last character, after walking every parse of the letters before it."""
    import gguf

    from llmdesk.formats.synth import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    have = set(tokens)
    rng = np.random.default_rng(1)
    letters = np.array(list(string.ascii_lowercase))
    tails = list(".,_-'1A") + [b2u[ord('"')]]
    merges = []

    def add(t: str) -> None:
        if t not in have and len(tokens) < n_vocab - 3:
            tokens.append(t)
            have.add(t)
            merges.append(f"{t[:-1]} {t[-1]}")

    for p in itertools.product(string.ascii_lowercase, repeat=2):
        add("".join(p))
    plan = [(3, 3, 8000), (4, 8, 8000), (9, 16, 4000)]
    for lo, hi, n in plan:
        start = len(tokens)
        while len(tokens) - start < n:
            add("".join(rng.choice(letters, size=int(rng.integers(lo, hi + 1)))))
    while len(tokens) < n_vocab - 3:
        add("".join(rng.choice(letters, size=int(rng.integers(2, 13)))) + tails[int(rng.integers(len(tails)))])
    tokens += ["<s>", "</s>", "<unk>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 3) + [gguf.TokenType.CONTROL] * 3
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("letters vocabulary")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def vocab_file(name: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"grammar-cost-{name}.gguf"
    if not path.exists():
        if name == "letters32k":
            letters_vocab_gguf(path)
        elif name.startswith("synth"):
            n = {"synth32k": 32000, "synth152k": 152064}[name]
            write_llama_gguf(path, SynthConfig(n_vocab=n, n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=32))
        else:
            raise SystemExit(f"unknown vocabulary {name!r}: synth32k, letters32k or synth152k")
    return path


class Vocab:
    """A vocabulary loaded without weights, a full candidates array, and one token per character."""

    def __init__(self, path: Path):
        init_backend()
        params = C.llama_model_default_params()
        params.vocab_only = True
        self.model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise SystemExit(f"{path}: llama.cpp could not load the vocabulary")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n = C.llama_vocab_n_tokens(self.vocab)
        dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
        self.fresh = np.zeros(self.n, dtype=dtype)
        self.fresh["id"] = np.arange(self.n)
        self.fresh["logit"] = np.random.default_rng(0).standard_normal(self.n)
        self.work = self.fresh.copy()
        self.char_token: dict[str, int] = {}
        buf = ctypes.create_string_buffer(64)
        for t in range(self.n):
            k = C.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            if k == 1:
                self.char_token.setdefault(buf.raw[:1].decode("latin-1"), t)

    def apply(self, smpl) -> np.ndarray:
        """Apply the sampler to every token; returns the logits after (rejected: -inf)."""
        np.copyto(self.work, self.fresh)
        arr = C.llama_token_data_array(
            data=self.work.ctypes.data_as(C.llama_token_data_p), size=self.n, selected=-1, sorted=False)
        C.llama_sampler_apply(smpl, ctypes.byref(arr))
        return self.work["logit"]


# ---------------------------------------------------------------------------------------------
# one measurement


def measure(vocab: Vocab, gbnf: str, walk: str, steps=(0, 8, 32), report=lambda *a: None) -> dict:
    """Init a grammar sampler, then apply it to the whole vocabulary at each step of `walk` (one
    character accepted per step). Times in seconds; a step not reached is missing. `report(step,
    seconds)` is called after each timed apply (the parent process learns how far a slow one got)."""
    t = time.thread_time()
    smpl = C.llama_sampler_init_grammar(vocab.vocab, gbnf.encode(), b"root")
    out = {"init": time.thread_time() - t, "apply": {}, "accept": 0.0, "allowed0": None, "stopped": ""}
    if not smpl:
        out["stopped"] = "llama.cpp refused the grammar"
        return out
    try:
        for i in range(max(steps) + 1):
            # CPU time of this thread (the machine may be shared); a timed step is the best of 3
            # applies (an apply does not change the sampler's state)
            dt = float("inf")
            for _ in range(3 if i in steps else 1):
                t = time.thread_time()
                logits = vocab.apply(smpl)
                dt = min(dt, time.thread_time() - t)
                if dt > 1.0:
                    break
            if i in steps:
                out["apply"][i] = dt
            report(i, dt)
            if i == 0:
                out["allowed0"] = int(np.isfinite(logits).sum())
            if i == max(steps) or i >= len(walk):
                break
            tok = vocab.char_token.get(walk[i])
            if tok is None or not np.isfinite(logits[tok]):
                out["stopped"] = f"walk ends at {walk[:i]!r}"
                break
            t = time.thread_time()
            C.llama_sampler_accept(smpl, tok)
            out["accept"] = max(out["accept"], time.thread_time() - t)
    finally:
        C.llama_sampler_free(smpl)
    return out


def _worker(path: str, conn) -> None:
    vocab = Vocab(Path(path))
    conn.send(("ready", vocab.n))
    while True:
        job = conn.recv()
        if job is None:
            return
        gbnf, walk = job
        out = measure(vocab, gbnf, walk, report=lambda i, dt: conn.send(("step", i, dt)))
        conn.send(("done", out))


class Worker:
    """A process that holds the vocabulary and measures one grammar at a time. One grammar apply
    cannot be interrupted (it is one C call), so a slow one is stopped by ending the process."""

    def __init__(self, path: Path):
        import multiprocessing as mp

        self.path = path
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(str(path), child), daemon=True)
        self.proc.start()
        kind, self.n = self.conn.recv()

    def measure(self, gbnf: str, walk: str, timeout_s: float) -> dict:
        self.conn.send((gbnf, walk))
        end = time.perf_counter() + timeout_s
        last = {"init": None, "apply": {}, "accept": None, "allowed0": None}
        while True:
            left = end - time.perf_counter()
            if left <= 0 or not self.conn.poll(left):
                self.close(kill=True)
                reached = max(last["apply"], default=None)
                last["stopped"] = f"timeout: no answer within {timeout_s:g} s" + (
                    f" after step {reached}" if reached is not None else " (first apply)")
                last["timed_out"] = True
                return last
            msg = self.conn.recv()
            if msg[0] == "step":
                if msg[1] in (0, 8, 32):
                    last["apply"][msg[1]] = msg[2]
            else:
                return msg[1]

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.conn.send(None)
        self.proc.join()


def convert(schema, checked: bool) -> tuple[str | None, float, str]:
    """(GBNF or None, seconds, refusal message)."""
    t = time.perf_counter()
    try:
        if checked:
            g = schema_grammar(copy.deepcopy(schema))
        else:
            from llama_cpp.llama_grammar import SchemaConverter

            conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            conv.visit(conv.resolve_refs(copy.deepcopy(schema), "request"), "")
            g = conv.format_grammar()
        return g, time.perf_counter() - t, ""
    except APIError as e:
        return None, time.perf_counter() - t, e.message
    except Exception as e:  # noqa: BLE001 - the converter's own failures are a result here
        return None, time.perf_counter() - t, f"converter: {type(e).__name__}: {e}"[:120]


# ---------------------------------------------------------------------------------------------
# the shapes: (family, label, N, schema, walk)


def pattern(p: str) -> dict:
    return {"type": "string", "pattern": p}


def words(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen = set()
    while len(out) < n:
        w = "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(4, 10))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def optional_props(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)},
            "additionalProperties": False}


def props_walk(n: int) -> str:
    return "{" + ", ".join(f'"p{i}": {i}' for i in range(min(n, 8))) + ","


def nested_objects(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"], "additionalProperties": False}
    return s


def lockstep_branches(n: int) -> dict:
    """anyOf of n objects that start alike (same first key), so all n stay live for a while."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"type": "string"}, f"k{i}": {"type": "integer"}},
                       "required": ["name", f"k{i}"], "additionalProperties": False} for i in range(n)]}


PYDANTIC_LIKE = {
    "$defs": {
        "Address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": r"^\d{5}(-\d{4})?$"},
            "country": {"type": "string", "enum": ["US", "CA", "MX", "FR", "DE", "GB", "IT", "ES"]}},
            "required": ["street", "city", "country"], "title": "Address"},
        "Role": {"type": "string", "enum": ["admin", "editor", "viewer"], "title": "Role"},
    },
    "type": "object", "title": "User",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "email": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}$"},
        "phone": {"anyOf": [{"type": "string", "pattern": r"^\+?[0-9 ()-]{7,20}$"}, {"type": "null"}],
                  "default": None},
        "birthday": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "role": {"$ref": "#/$defs/Role"},
        "address": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "score": {"type": "number"},
        "active": {"type": "boolean", "default": True},
    },
    "required": ["id", "name", "email", "role"],
}


def shapes(quick: bool):
    big = not quick
    a40 = "a" * 40
    ab = "ab" * 20
    for n in (5, 10, 20, 30, 40, 60) if big else (5, 20):
        yield "nested repetition", "([a-z]*){0,N}", n, pattern(f"^([a-z]*){{0,{n}}}$"), '"' + a40
    yield "nested repetition", "(a+)+", 1, pattern("^(a+)+$"), '"' + a40
    yield "nested repetition", "([a-z]+)*", 1, pattern("^([a-z]+)*$"), '"' + a40
    for n in (5, 10, 20, 40) if big else (5, 20):
        yield "nested repetition", "((a|b)*c?){0,N}", n, pattern(f"^((a|b)*c?){{0,{n}}}$"), '"' + ab
    for n in (5, 10, 20, 40, 100) if big else (5, 40):
        yield "counted groups", "([a-z]{1,3}){0,N}", n, pattern(f"^([a-z]{{1,3}}){{0,{n}}}$"), '"' + a40
    for n in (10, 100, 1000) if big else (10, 1000):
        yield "counted groups", "(ab){0,N}", n, pattern(f"^(ab){{0,{n}}}$"), '"' + ab
    yield "counted groups", r"IPv4 (\d{1,3}\.){3}\d{1,3}", 1, pattern(r"^([0-9]{1,3}[.]){3}[0-9]{1,3}$"), '"192.168.1.1'
    for n in (5, 10, 20, 40) if big else (5, 20):
        yield "overlapping alternation", "(a|ab|abc){0,N}", n, pattern(f"^(a|ab|abc){{0,{n}}}$"), '"' + ab
        yield "overlapping alternation", "(a|aa){0,N}", n, pattern(f"^(a|aa){{0,{n}}}$"), '"' + a40
    for n in (2, 4, 8, 16, 32, 64) if big else (2, 16):
        yield "[a-z]* in sequence", "[a-z]* x N", n, pattern("^" + "[a-z]*" * n + "$"), '"' + a40
    for n in (10, 50, 100, 200, 400, 900) if big else (10, 200):
        yield "optional properties", "N optional integer properties", n, optional_props(n), props_walk(n)
    for n in (8, 32) if big else (8,):
        yield "deep nesting", "N nested objects", n, nested_objects(n), '{"a": ' * n + '"hi'
    for n in (10, 100, 250, 1000) if big else (10, 1000):
        ws = words(n)
        yield "big enum", "enum of N words", n, {"enum": ws}, '"' + ws[0]
    for n in (100, 1000) if big else (1000,):
        yield "long string", "maxLength N", n, {"type": "string", "maxLength": n}, '"' + "hello world " * 4
        yield "long string", "minLength N (all required)", n, {"type": "string", "minLength": n, "maxLength": n}, '"' + a40
    for n in (4, 16, 64, 256) if big else (4, 64):
        yield "anyOf branches", "anyOf of N alike objects", n, lockstep_branches(n), '{"name": "' + a40
        yield "anyOf branches", "oneOf of N enums", n, {"oneOf": [{"enum": words(4, seed=i)} for i in range(n)]}, '"a'
    # right at the limits: what the checks still accept
    ws = words(16, seed=3)
    yield "worst accepted", "30 optional properties", 30, optional_props(30), props_walk(30)
    yield "worst accepted", "16 alternatives in a pattern", 16, pattern("^(" + "|".join(ws) + ")$"), '"' + ws[0]
    yield "worst accepted", "[a-z]{0,8}[a-z]{0,8} (overlap)", 1, pattern("^[a-z]{0,8}[a-z]{0,8}$"), '"' + a40
    yield "worst accepted", "email, classic", 1, pattern(r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$"), \
        '"ab.cd.ef@gh.ij.kl.mn.op.qr'
    yield "worst accepted", "anyOf of 8 alike objects", 8, lockstep_branches(8), '{"name": "' + a40
    yield "worst accepted", "anyOf of 2 x 16-alternative patterns", 2, {"anyOf": [
        pattern("^(" + "|".join(ws) + ")$"), pattern("^(" + "|".join(words(16, seed=4)) + ")$")]}, '"' + ws[0]
    yield "worst accepted", "32 tools, forced (discriminated)", 32, {"oneOf": [
        {"type": "object", "properties": {"name": {"const": f"tool_{i}"}, "arguments": optional_props(4)},
         "required": ["name", "arguments"], "additionalProperties": False} for i in range(32)]}, \
        '{"name": "tool_1", "arguments": {"p0": 1'
    yield "typical", "json_object-like (any object)", 1, {"type": "object"}, '{"a": "hello", "b": [1, 2'
    yield "typical", "pydantic User model", 1, PYDANTIC_LIKE, '{"id": 1, "name": "Ann Lee", "email": "ann@x.org"'
    yield "typical", r"date ^\d{4}-\d{2}-\d{2}$", 1, pattern(r"^\d{4}-\d{2}-\d{2}$"), '"2024-01-31'
    yield "typical", r"email ^[^@]+@[^@]+$", 1, pattern(r"^[^@]+@[^@]+$"), '"ann.lee@example.org'


def ms(x: float | None) -> str:
    return "" if x is None else f"{x * 1000:9.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="synth32k,letters32k", help="comma-separated: synth32k, letters32k, synth152k")
    ap.add_argument("--unchecked", action="store_true", help="convert without llmdesk's checks (measure refused shapes)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes per shape")
    ap.add_argument("--only", default="", help="only shapes whose family or label contains this")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="stop a measurement (and its series) after this many seconds")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    rows = []
    for vname in args.vocab.split(","):
        worker = Worker(vocab_file(vname))
        print(f"\n## vocabulary {vname}: {worker.n} tokens; {'unchecked' if args.unchecked else 'checked'} conversion; "
              f"an apply that takes over {args.timeout:g} s is stopped")
        print(f"{'family':24} {'shape':36} {'N':>5} {'live':>5} {'gbnf':>7} {'conv ms':>9} {'init ms':>9} "
              f"{'apply@0':>9} {'apply@8':>9} {'apply@32':>9} {'accept':>9}  note")
        blown: set[tuple[str, str]] = set()
        for family, label, n, schema, walk in shapes(args.quick):
            if args.only and args.only not in family and args.only not in label:
                continue
            if (family, label) in blown:
                continue
            gbnf, conv_s, refusal = convert(schema, not args.unchecked)
            try:
                live = str(live_parses(copy.deepcopy(schema)))
            except APIError:
                live = "over"
            row = {"vocab": vname, "n_vocab": worker.n, "family": family, "shape": label, "N": n,
                   "convert_s": conv_s, "live_parses": live}
            if gbnf is None:
                row["refused"] = refusal
                print(f"{family:24} {label:36} {n:5} {live:>5} {'':>7} {ms(conv_s)} {'':>9} {'':>9} {'':>9} {'':>9} "
                      f"{'':>9}  refused: {refusal[:100]}")
            else:
                m = worker.measure(gbnf, walk, args.timeout)
                if m.get("timed_out"):
                    blown.add((family, label))
                    worker = Worker(vocab_file(vname))
                row.update(gbnf_chars=len(gbnf), init_s=m["init"], apply_s=m["apply"], accept_s=m["accept"],
                           allowed0=m["allowed0"], stopped=m["stopped"])
                a = m["apply"]
                print(f"{family:24} {label:36} {n:5} {live:>5} {len(gbnf):7} {ms(conv_s)} {ms(m['init'])} {ms(a.get(0))} "
                      f"{ms(a.get(8))} {ms(a.get(32))} {ms(m['accept'])}  {m['stopped']}")
            sys.stdout.flush()
            rows.append(row)
        worker.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
