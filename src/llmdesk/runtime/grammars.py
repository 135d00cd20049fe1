"""JSON output enforced by llama.cpp grammars: `response_format` (OpenAI), `format` (Ollama) and
forced tool calls.

A JSON schema becomes GBNF with llama.cpp's own converter (json-schema-to-grammar, as shipped in
llama-cpp-python), except two parts written here:
- `pattern`: parsed here, checked, and written as GBNF directly. The shipped converter passes
  `\\d` or `\\.` through as escapes llama.cpp rejects, lets a top-level `a|b` escape the string's
  quotes, and lets `.` or `[^@]` write a raw `"` that ends the JSON string early; here `\\d`,
  `\\w`, `\\s`, `(?:...)` and `{m,n}` work, and classes leave out what a JSON string must escape.
- `enum`: written as a trie of the values' JSON texts, so 250 country codes keep ~20 parses
  alive at the first character instead of 250.

Schemas come from clients, so they are bounded before conversion: size, depth and counts (the
converter expands `maxLength: 1000000000` or `a{1000000000}` into a rule that long), and cost.

What a grammar costs per token. llama.cpp's grammar sampler keeps one stack per way the text so
far can be parsed (a live parse). For every token of the vocabulary it walks the token's
characters through every live parse (llama-grammar.cpp, llama_grammar_reject_candidates), and
parses that split are walked separately, without sharing work. So one token costs (live parses)
x (vocabulary) character matches, and a token whose first k characters fit costs one walk per
parse of those k characters: `[a-z]*[a-z]*` reads 12 letters 13 ways, `([a-z]*){0,5}` 1820 ways,
and a vocabulary has thousands of tokens like "abcdefghijkl," that fit until their last
character. The checks bound this one number, `live_parses`: an upper bound, over the whole
grammar, of the parses alive at once, counting a pattern's parses of any 16 characters (the
length of a long token). anyOf/oneOf branches that start alike add up, optional properties add
one each (every one is still possible after each comma), an enum counts its trie's widest fork.
A pattern is refused outright when a repeated group can match nothing (`([a-z]*){0,40}`,
`(a?)+`) or when its parses alone pass MAX_PATTERN_PARSES (`(a+)+`, `(a|aa)*`, `[a-z]*[a-z]*`).

Measured with benchmarks/grammar_cost.py (CPU time of one thread on this project's 2-core x86-64
machine, shared; 32000-token vocabularies, one of them all lowercase words): plain JSON costs 3-8
ms a token; every schema the checks accept costs at most ~30 ms (the worst: 32 tools forced with
tool_choice "required", while the name is written; 30 optional properties or 8 alike anyOf
objects ~12 ms), and typical ones (a Pydantic model, dates, emails, 1000-value enums) cost what
plain JSON costs. Unchecked, ([a-z]*){0,5} took over 15 s a token, ([a-z]{1,3}){0,40} 1.2 s,
[a-z]*[a-z]* 33 ms, a 1000-value enum 370 ms. The cost grows with the vocabulary (x5 at 152k
tokens), so llmdesk.runtime.grammar_probe measures a grammar on the model itself as well.

Conversion is the conversation layer's, which the server runs off the event loop with a time limit
(serve/chat.py `off_loop`) as a backstop.
"""

from __future__ import annotations

import bisect
import functools
import json
import re

from .limits import InvalidRequest

MAX_SCHEMA_CHARS = 64 * 1024
MAX_DEPTH = 32
MAX_REPEAT = 1000  # minLength, maxItems, {n,m} in patterns, ...
MAX_GRAMMAR_CHARS = 512 * 1024
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")

# the cost bounds (see the module docstring; benchmarks/grammar_cost.py measures them)
MAX_LIVE_PARSES = 32  # parses alive at once, over the whole grammar
MAX_PATTERN_PARSES = 16  # parses of any TOKEN_CHARS characters by one pattern
TOKEN_CHARS = 16  # how far a token's characters are followed (long words of 32k vocabularies)
MAX_PATTERN_CHARS = 1000
MAX_PATTERN_POSITIONS = 2048  # patterns' characters once counted repetitions are written out, per schema
MAX_PATTERN_NESTING = 16  # groups in groups
MAX_PATTERN_WORK = 50_000  # states the ambiguity count may visit before the pattern is refused

# any JSON object (llama.cpp's grammars/json.gbnf, with whitespace bounded as in the schema converter)
JSON_OBJECT_GRAMMAR = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""


# ---------------------------------------------------------------------------------------------
# character sets: sorted, disjoint, inclusive (lo, hi) ranges of code points

_MAX_CP = 0x10FFFF
_ANY = ((0, _MAX_CP),)
_DIGIT = ((48, 57),)
_WORD = ((48, 57), (65, 90), (95, 95), (97, 122))
_SPACE = ((9, 13), (32, 32))
_JSON_UNSAFE = ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))  # written raw, these would break the JSON string


def _norm(ranges) -> tuple:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(ranges) -> tuple:
    out, nxt = [], 0
    for lo, hi in _norm(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_CP:
        out.append((nxt, _MAX_CP))
    return tuple(out)


def _minus(ranges, removed) -> tuple:
    return _norm(_complement(tuple(_complement(ranges)) + tuple(removed)))


def _has(ranges, cp: int) -> bool:
    i = bisect.bisect_right(ranges, (cp, _MAX_CP + 1)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


# ---------------------------------------------------------------------------------------------
# patterns: ECMA-262 regular expressions (the subset a grammar can hold) as a tree
#   ("set", ranges) | ("seq", children) | ("alt", children) | ("rep", child, lo, hi|None, source)


class PatternError(ValueError):
    pass


_ESCAPE_SETS = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_ESCAPE_CHARS = {"t": 9, "n": 10, "r": 13, "f": 12, "v": 11, "0": 0}
_QUANTIFIER = re.compile(r"\{(\d*)(,?)(\d*)\}")


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def fail(self, what: str):
        raise PatternError(f"{what} (at character {self.i + 1})")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def alt(self, depth: int):
        branches = [self.seq(depth)]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.seq(depth))
        return branches[0] if len(branches) == 1 else ("alt", tuple(branches))

    def seq(self, depth: int):
        items = []
        while self.peek() not in ("", "|", ")"):
            start = self.i
            items.append(self.quantified(self.atom(depth), start))
        return items[0] if len(items) == 1 else ("seq", tuple(items))

    def atom(self, depth: int):
        c = self.peek()
        if c == "(":
            if depth >= MAX_PATTERN_NESTING:
                self.fail(f"groups are nested more than {MAX_PATTERN_NESTING} deep")
            self.i += 1
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("lookarounds and named groups are not supported, only (...) and (?:...)")
            node = self.alt(depth + 1)
            if self.peek() != ")":
                self.fail("'(' is not closed")
            self.i += 1
            return node
        if c == ")":
            self.fail("')' without '('")
        if c == "[":
            return ("set", self.json_safe(self.char_class()))
        if c == ".":
            self.i += 1
            return ("set", self.json_safe(_complement(((10, 10), (13, 13)))))
        if c == "\\":
            return ("set", self.json_safe(self.escape(in_class=False)))
        if c in "*+?{":
            self.fail(f"'{c}' has nothing to repeat")
        if c in "^$":
            self.fail("'^' and '$' may only start and end the pattern")
        self.i += 1
        return ("set", self.json_safe(((ord(c), ord(c)),)))

    def quantified(self, node, start: int):
        c = self.peek()
        if c == "{":
            m = _QUANTIFIER.match(self.s, self.i)
            if not m or not (m.group(1) or m.group(3)):
                self.fail("'{' must start a repetition {m}, {m,} or {m,n} (write \\{ for a brace)")
            lo = int(m.group(1) or 0)
            hi = lo if not m.group(2) else int(m.group(3)) if m.group(3) else None
            if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
                self.fail(f"repetition {m.group(0)} is over {MAX_REPEAT}")
            if hi is not None and hi < lo:
                self.fail(f"repetition {m.group(0)} has its numbers out of order")
            self.i = m.end()
        elif c in ("*", "+", "?"):
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            self.i += 1
        else:
            return node
        node = ("rep", node, lo, hi, self.s[start:self.i])
        if self.peek() == "?":  # lazy: the same strings, so the same grammar
            self.i += 1
        if self.peek() and self.peek() in "*+?{":
            self.fail(f"'{self.peek()}' follows a repetition (possessive and doubled quantifiers are not "
                      f"supported); put the repeated part in a group")
        return node

    def escape(self, *, in_class: bool) -> tuple:
        if self.i + 1 >= len(self.s):
            self.fail("the pattern ends with a lone backslash")
        c = self.s[self.i + 1]
        self.i += 2
        if c.lower() in _ESCAPE_SETS:
            r = _ESCAPE_SETS[c.lower()]
            return r if c.islower() else _complement(r)
        if c in _ESCAPE_CHARS:
            return ((_ESCAPE_CHARS[c],) * 2,)
        if c == "b" and in_class:
            return ((8, 8),)
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.s[self.i:self.i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{c} needs {n} hex digits")
            self.i += n
            return ((int(digits, 16),) * 2,)
        if c in "bB":
            self.fail("word boundaries (\\b, \\B) are not supported")
        if c.isdigit():
            self.fail("backreferences are not supported")
        if c in "pP":
            self.fail("unicode property escapes (\\p{...}) are not supported")
        if c.isalnum():
            self.fail(f"unknown escape \\{c}")
        return ((ord(c), ord(c)),)

    def char_class(self) -> tuple:
        self.i += 1
        negate = self.peek() == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if not self.peek():
                self.fail("'[' is not closed")
            lo = self.class_atom()
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    self.fail("a range in [...] must join two single characters")
                if hi[0][0] < lo[0][0]:
                    self.fail("a range in [...] has its ends out of order")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        self.i += 1
        return _complement(ranges) if negate else _norm(ranges)

    def class_atom(self) -> tuple:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        c = self.s[self.i]
        self.i += 1
        return ((ord(c), ord(c)),)

    def json_safe(self, ranges) -> tuple:
        safe = _minus(ranges, _JSON_UNSAFE)
        if not safe:
            self.fail("this matches only characters a JSON string must escape (quote, backslash, control "
                      "characters), which structured output cannot write")
        return safe


def parse_pattern(text: str):
    """The tree of an anchored pattern ("^...$"); PatternError says what is wrong and where."""
    if not (text.startswith("^") and text.endswith("$")) or re.search(r"(?<!\\)(\\\\)*\\\$$", text):
        raise PatternError("must start with '^' and end with '$' (structured output matches the whole string)")
    p = _Parser(text[1:-1])
    node = p.alt(0)
    if p.i != len(p.s):
        p.fail("')' without '('")
    return node


def _nullable(node) -> bool:
    kind = node[0]
    if kind == "set":
        return False
    if kind == "seq":
        return all(_nullable(c) for c in node[1])
    if kind == "alt":
        return any(_nullable(c) for c in node[1])
    return node[2] == 0 or _nullable(node[1])


def _positions(node) -> int:
    """Characters of the pattern once its counted repetitions are written out, as llama.cpp does
    (x{2,4} -> x x (x (x)?)?, x+ -> x x*)."""
    kind = node[0]
    if kind == "set":
        return 1
    if kind in ("seq", "alt"):
        return sum(_positions(c) for c in node[1])
    _, child, lo, hi, _src = node
    return _positions(child) * (lo + (1 if hi is None else hi - lo))


def _repeated_empty(node):
    """The source of a repetition (more than once) of something that can match nothing, if any."""
    kind = node[0]
    if kind in ("seq", "alt"):
        for c in node[1]:
            found = _repeated_empty(c)
            if found:
                return found
        return None
    if kind == "rep":
        _, child, _lo, hi, src = node
        if (hi is None or hi > 1) and _nullable(child):
            return src
        return _repeated_empty(child)
    return None


def _nested_repetition(node, inside: str | None = None):
    """The source of a variable repetition inside another repetition (a hint for the message)."""
    kind = node[0]
    if kind in ("seq", "alt"):
        for c in node[1]:
            found = _nested_repetition(c, inside)
            if found:
                return found
    elif kind == "rep":
        _, child, lo, hi, src = node
        if inside and hi != lo:
            return inside
        return _nested_repetition(child, src if (hi is None or hi > 1) else inside)
    return None


class _Glushkov:
    """The pattern's position automaton over its expansion: one position per character of the
    written-out pattern (a llama.cpp grammar stack, up to its return addresses), `follow[p]` the
    positions that may come next. The closing quote is one more position."""

    def __init__(self, node):
        self.classes: list[tuple] = []
        self.follow: list[set[int]] = []
        self.steps: dict = {}
        self.splits: dict = {}
        first, last, nullable = self.build(node)
        end = self.new(((0x22, 0x22),))
        for p in last:
            self.follow[p].add(end)
        self.first = first | ({end} if nullable else set())

    def new(self, ranges) -> int:
        self.classes.append(ranges)
        self.follow.append(set())
        return len(self.classes) - 1

    def seq(self, parts):
        first, last, nullable = set(), set(), True
        for f, l, n in parts:
            for p in last:
                self.follow[p] |= f
            if nullable:
                first |= f
            last = (last | l) if n else l
            nullable = nullable and n
        return first, last, nullable

    def build(self, node):
        kind = node[0]
        if kind == "set":
            p = self.new(node[1])
            return {p}, {p}, False
        if kind == "seq":
            return self.seq(self.build(c) for c in node[1])
        if kind == "alt":
            parts = [self.build(c) for c in node[1]]
            return (set().union(*(f for f, _, _ in parts)), set().union(*(l for _, l, _ in parts)),
                    any(n for _, _, n in parts))
        _, child, lo, hi, _src = node
        parts = [self.build(child) for _ in range(lo)]
        if hi is None:  # x*
            f, l, _ = self.build(child)
            for p in l:
                self.follow[p] |= f
            parts.append((f, l, True))
        elif hi > lo:  # (x (x (x)?)?)?, built from the inside out
            copies = [self.build(child) for _ in range(hi - lo)]
            rest: set[int] = set()
            lasts: set[int] = set()
            for f, l, n in reversed(copies):
                for p in l:
                    self.follow[p] |= rest
                rest = f | (rest if n else set())
                lasts |= l
            parts.append((rest, lasts, True))
        return self.seq(parts)

    def step(self, state) -> list:
        """The states one more character can lead to. A state is ((position, parses ending
        there), ...): the live stacks, each counted once per walk llama.cpp makes to reach it."""
        if state in self.steps:
            return self.steps[state]
        out = []
        for group in self.split([p for p, _ in state]):
            counts: dict[int, int] = {}
            for p, n in state:
                if p in group:
                    for q in self.follow[p]:
                        counts[q] = counts.get(q, 0) + n
            if counts:
                out.append(tuple(sorted(counts.items())))
        self.steps[state] = out
        return out

    def parses(self, chars: int, limit: int) -> int:
        """The most parses alive at once, over every point of the pattern and every text of up
        to `chars` characters. Stops once past `limit`."""
        work = 0

        def tick():
            nonlocal work
            work += 1
            if work > MAX_PATTERN_WORK:
                raise PatternError("is too complex to check (simplify its repetitions and alternatives)")

        # the live sets at every point of the pattern, one parse each (llama.cpp merges equal
        # stacks once a token is accepted)
        start = tuple((p, 1) for p in sorted(self.first))
        points, todo = {start}, [start]
        while todo:
            state = todo.pop()
            tick()
            if len(state) > limit:
                return len(state)
            for nxt in self.step(state):
                fresh = tuple((p, 1) for p, _ in nxt)
                if fresh not in points:
                    points.add(fresh)
                    todo.append(fresh)
        # the walks through up to `chars` characters of one token, from each of them
        worst = max(len(s) for s in points)
        seen, layer = set(points), list(points)
        for _ in range(chars):
            following = []
            for state in layer:
                tick()
                for nxt in self.step(state):
                    total = sum(n for _, n in nxt)
                    if total > limit:
                        return total
                    worst = max(worst, total)
                    if nxt not in seen:
                        seen.add(nxt)
                        following.append(nxt)
            layer = following
        return worst

    def split(self, positions: list[int]) -> list[frozenset]:
        """The sets of `positions` that one character can match together."""
        classes = tuple(sorted({self.classes[p] for p in positions}))
        if classes not in self.splits:  # which classes one character matches together
            cuts = sorted({b for c in classes for lo, hi in c for b in (lo, hi + 1)})
            self.splits[classes] = {frozenset(c for c in classes if _has(c, cp)) for cp in cuts} - {frozenset()}
        return [frozenset(p for p in positions if self.classes[p] in together) for together in self.splits[classes]]


@functools.lru_cache(maxsize=256)
def parsed_pattern(text: str):
    """(tree, characters once written out) of a pattern, or PatternError: its syntax and size."""
    node = parse_pattern(text)
    n = _positions(node)
    if n > MAX_PATTERN_POSITIONS:
        raise PatternError(f"has {n} characters once its counted repetitions are written out (the limit is "
                           f"{MAX_PATTERN_POSITIONS}); use smaller counts or fewer nested repetitions")
    return node, n


@functools.lru_cache(maxsize=256)
def pattern_info(text: str):
    """(tree, parses) of a pattern, or PatternError: its syntax, its size, and its ambiguity."""
    node, _ = parsed_pattern(text)
    empty = _repeated_empty(node)
    if empty:
        raise PatternError(f"repeats {empty!r}, which can match nothing, so a text splits into repetitions in "
                           f"countless ways and the grammar sampler tries every one for every token; repeat "
                           f"something that cannot be empty (([a-z]*){{0,5}} is [a-z]*)")
    parses = _Glushkov(node).parses(TOKEN_CHARS, MAX_PATTERN_PARSES)
    if parses > MAX_PATTERN_PARSES:
        nested = _nested_repetition(node)
        why = f"the repetition {nested!r} is inside another one" if nested else "its parts overlap or branch widely"
        raise PatternError(f"can go on in more than {MAX_PATTERN_PARSES} ways at once after some {TOKEN_CHARS}-"
                           f"character text ({why}), and the grammar sampler tries every way for every token; "
                           f"make consecutive parts not overlap ((a+)+ is a+, [a-z]*[a-z0-9]* is "
                           f"[a-z]*([0-9][a-z0-9]*)?), or use an enum for a long list of words")
    return node, max(parses, 1)


# ---------------------------------------------------------------------------------------------
# GBNF for patterns and enums


def _gbnf_char(cp: int) -> str:
    c = chr(cp)
    if c.isascii() and c.isalnum():
        return c
    return f"\\x{cp:02X}" if cp < 0x100 else f"\\u{cp:04X}" if cp < 0x10000 else f"\\U{cp:08X}"


def _gbnf_set(ranges) -> str:
    if ranges[-1][1] == _MAX_CP and ranges != _ANY:  # the shorter form: what is left out
        return "[^" + "".join(_gbnf_char(lo) if lo == hi else f"{_gbnf_char(lo)}-{_gbnf_char(hi)}"
                              for lo, hi in _complement(ranges)) + "]"
    return "[" + "".join(_gbnf_char(lo) if lo == hi else f"{_gbnf_char(lo)}-{_gbnf_char(hi)}"
                         for lo, hi in ranges) + "]"


def _gbnf_literal(text: str) -> str:
    return '"' + "".join(c if c.isascii() and (c.isalnum() or c in " _-:,.;/@#%&=~'<>!()[]{}*+?|^$")
                         else "\\" + c if c in '"\\' else _gbnf_char(ord(c)) for c in text) + '"'


def _single(node) -> str | None:
    if node[0] == "set" and len(node[1]) == 1 and node[1][0][0] == node[1][0][1]:
        return chr(node[1][0][0])
    return None


def pattern_gbnf(node, sub_rule) -> str:
    """GBNF for a pattern tree. `sub_rule(text)` names a rule for a repeated group, so llama.cpp
    copies a reference, not the group (its limit is 2000 rules per repetition)."""
    kind = node[0]
    if kind == "set":
        c = _single(node)
        return _gbnf_literal(c) if c is not None else _gbnf_set(node[1])
    if kind == "seq":
        parts: list[str] = []
        run = ""
        for child in node[1]:
            c = _single(child)
            if c is not None:
                run += c
                continue
            if run:
                parts.append(_gbnf_literal(run))
                run = ""
            text = pattern_gbnf(child, sub_rule)
            parts.append(f"({text})" if child[0] == "alt" else text)
        if run or not parts:
            parts.append(_gbnf_literal(run))
        return " ".join(parts)
    if kind == "alt":
        return " | ".join(pattern_gbnf(c, sub_rule) for c in node[1])
    _, child, lo, hi, _src = node
    item = pattern_gbnf(child, sub_rule)
    if child[0] != "set":
        item = sub_rule(item)
    if (lo, hi) == (0, None):
        return item + "*"
    if (lo, hi) == (1, None):
        return item + "+"
    if (lo, hi) == (0, 1):
        return item + "?"
    if hi == lo:
        return f"{item}{{{lo}}}"
    return f"{item}{{{lo},{'' if hi is None else hi}}}"


def _trie(texts) -> dict:
    root: dict = {}
    for t in texts:
        node = root
        for c in t:
            node = node.setdefault(c, {})
        node[""] = {}
    return root


def _trie_shape(node) -> tuple[int, int]:
    """(widest fork, most forks along one value) of a trie."""
    width, depth = 1, 0
    todo = [(node, 0)]
    while todo:
        node, forks = todo.pop()
        if len(node) > 1:
            width, forks = max(width, len(node)), forks + 1
        depth = max(depth, forks)
        todo.extend((sub, forks) for c, sub in node.items() if c)
    return width, depth


def _trie_gbnf(node) -> str:
    alts = []
    for c, sub in sorted(node.items()):
        if c == "":
            alts.append('""')
            continue
        run = c
        while len(sub) == 1 and "" not in sub:
            (c2, sub), = sub.items()
            run += c2
        alts.append(_gbnf_literal(run) if sub == {"": {}} else f"{_gbnf_literal(run)} ({_trie_gbnf(sub)})")
    return " | ".join(alts)


MAX_TRIE_DEPTH = 48  # forks along one value; deeper tries (values that are prefixes of each other) stay flat


def enum_texts(values) -> list[str]:
    return list(dict.fromkeys(json.dumps(v) for v in values))  # the converter's literals, deduplicated


# ---------------------------------------------------------------------------------------------
# the checks


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
            "additionalItems", "unevaluatedProperties", "unevaluatedItems")


def check_schema(schema, where: str) -> None:
    """Refuse schemas that are too big, would expand into huge grammars, or would make the grammar
    sampler slow (InvalidRequest naming the place in the schema, what is wrong, and what to do)."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{where} must be a JSON schema object", where)
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        raise InvalidRequest(f"{where} is not valid JSON", where) from None
    if size > MAX_SCHEMA_CHARS:
        raise InvalidRequest(f"{where} is {size} characters long; the limit is {MAX_SCHEMA_CHARS}", where)

    def deep(node, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"{where} is nested more than {MAX_DEPTH} levels deep", where)
        for v in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            deep(v, depth + 1)

    def walk(node, loc: str) -> None:
        """One schema: its keywords, then the schemas in it (a property named "pattern" is a name)."""
        if not isinstance(node, dict):
            return
        for key in _COUNTS:
            v = node.get(key)
            if v is not None and (type(v) is not int or not 0 <= v <= MAX_REPEAT):
                raise InvalidRequest(f"{loc}: '{key}' must be an integer from 0 to {MAX_REPEAT}, got {v!r}",
                               where)
        pattern = node.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
                raise InvalidRequest(f"{loc}: 'pattern' must be a string of at most {MAX_PATTERN_CHARS} characters",
                               where)
            try:
                positions[0] += parsed_pattern(pattern)[1]
                if positions[0] > MAX_PATTERN_POSITIONS:  # bounds the analysis below, per schema
                    raise PatternError(f"brings the schema's patterns to {positions[0]} characters once their "
                                       f"counted repetitions are written out (the limit is {MAX_PATTERN_POSITIONS}"
                                       f" in all); use smaller counts")
                pattern_info(pattern)
            except PatternError as e:
                raise InvalidRequest(f"{loc}.pattern {pattern[:60]!r} {e}", where) from None
        enum = node.get("enum")
        if enum is not None and (not isinstance(enum, list) or not enum):
            raise InvalidRequest(f"{loc}: 'enum' must be a non-empty list", where)
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise InvalidRequest(f"{loc}: only local $ref (\"#/...\") are allowed", where)
        for key, v in node.items():
            if key in _SCHEMA_MAPS and isinstance(v, dict):
                for name, sub in v.items():
                    walk(sub, f"{loc}.{key}.{name}")
            elif key in _SCHEMA_LISTS and isinstance(v, list) or key == "items" and isinstance(v, list):
                for i, sub in enumerate(v):
                    walk(sub, f"{loc}.{key}[{i}]")
            elif key in _SCHEMAS:
                walk(v, f"{loc}.{key}")

    positions = [0]
    deep(schema, 0)
    walk(schema, where)  # the specific messages first, then any other fault
    _check_meta(schema, where)
    try:
        _LiveParses(_integer_ranges(schema), where).check()
    except (TypeError, AttributeError) as e:  # keywords of the wrong type where a $ref leads
        raise InvalidRequest(f"{where} is not a schema llmdesk can read: {type(e).__name__}: {e}"[:300],
                       where) from None


def _check_meta(schema, where: str) -> None:
    """The schema is a JSON Schema (checked against its draft's meta-schema, 2020-12 unless it
    says otherwise in $schema)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise InvalidRequest(f"{_short(where + at)} is not valid JSON Schema: {e.message[:200]}", where) from None
    except RecursionError:
        raise InvalidRequest(f"{where} is nested too deeply to check", where) from None


def _short(loc: str) -> str:
    """A place in the schema, shortened for a one-line message."""
    return loc if len(loc) <= 120 else loc[:40] + "..." + loc[-77:]


# the kinds of JSON value a schema's text starts with: branches of a union that start with the
# same kind are read in step, and their parses add up
_KINDS = frozenset("{[\"n0tN")  # object, array, string, number, true/false, null
_STRING_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")


class _LiveParses:
    """An upper bound on the parses a grammar for a schema keeps alive at once (see the module
    docstring), following the converter's choices (llama_cpp.llama_grammar.SchemaConverter.visit)."""

    ANY_VALUE = 8  # value ::= object | array | string | number | boolean | null, and their starts

    def __init__(self, root, where: str):
        self.root, self.where = root, where
        self.assumed: dict[str, int] = {}  # a $ref met inside its own definition counts this much
        self.memo: dict[str, int] = {}
        self.refs = 0  # $refs being followed, one inside another

    def check(self) -> int:
        for _ in range(MAX_LIVE_PARSES + 2):
            self.memo, self.refs = {}, 0
            value = self.live(self.root, self.where)
            if all(self.assumed.get(r, 1) >= v for r, v in self.memo.items()):
                return value
            self.assumed = {r: max(v, self.assumed.get(r, 1)) for r, v in self.memo.items()}
        raise InvalidRequest(f"{self.where}: a recursive $ref keeps more parses alive at every level; make the "
                       f"alternatives of the recursive part start differently", self.where)

    def over(self, loc: str, n: int, what: str, fix: str):
        raise InvalidRequest(f"{_short(loc)}: {what}, so the grammar keeps {n} parses alive at once (the limit is "
                       f"{MAX_LIVE_PARSES}) and every token costs that many passes over the vocabulary; {fix}",
                       self.where)

    def resolve(self, ref: str, loc: str):
        target = self.root
        for sel in ref.split("#")[-1].split("/")[1:]:
            if not isinstance(target, dict) or sel not in target:
                raise InvalidRequest(f"{loc}: $ref {ref!r} does not resolve in the schema", self.where)
            target = target[sel]
        return target

    def kinds(self, schema, seen=()) -> frozenset:
        if not isinstance(schema, dict) or not schema:
            return _KINDS
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in seen or len(seen) > MAX_DEPTH:
                return _KINDS
            return self.kinds(self.resolve(ref, self.where), seen + (ref,))
        if "oneOf" in schema or "anyOf" in schema:
            branches = schema.get("oneOf") or schema.get("anyOf") or []
            return frozenset().union(*(self.kinds(b, seen) for b in branches)) if branches else _KINDS
        t = schema.get("type")
        if isinstance(t, list):
            return frozenset().union(*(self.kinds({"type": x}, seen) for x in t)) if t else _KINDS
        if "const" in schema:
            return self.value_kinds([schema["const"]])
        if "enum" in schema:
            return self.value_kinds(schema["enum"])
        by_type = {"object": "{", "array": "[", "string": '"', "number": "0", "integer": "0", "boolean": "t",
                   "null": "n"}
        if t in by_type:
            return frozenset(by_type[t])
        if "properties" in schema or "allOf" in schema or "additionalProperties" in schema:
            return frozenset("{")
        if "items" in schema or "prefixItems" in schema:
            return frozenset("[")
        if "pattern" in schema:
            return frozenset('"')
        return _KINDS

    @staticmethod
    def value_kinds(values) -> frozenset:
        out = set()
        for v in values:
            out.add("{" if isinstance(v, dict) else "[" if isinstance(v, list) else '"' if isinstance(v, str)
                    else "t" if isinstance(v, bool) else "n" if v is None else "0")
        return frozenset(out)

    def live(self, schema, loc: str) -> int:
        if not isinstance(schema, dict):
            return self.ANY_VALUE if schema is not False else 1
        t = schema.get("type")
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref not in self.memo:
                self.memo[ref] = self.assumed.get(ref, 1)  # met again inside itself: assumed
                self.refs += 1
                if self.refs > MAX_DEPTH:
                    raise InvalidRequest(f"{_short(loc)}: $refs lead through more than {MAX_DEPTH} definitions in a "
                                   f"row; flatten the schema", self.where)
                self.memo[ref] = self.live(self.resolve(ref, loc), loc)
                self.refs -= 1
            return self.memo[ref]
        if "oneOf" in schema or "anyOf" in schema:
            key = "oneOf" if schema.get("oneOf") else "anyOf"
            return self.union(schema.get(key) or [], f"{loc}.{key}")
        if isinstance(t, list):
            return self.union([{"type": x} for x in t], f"{loc}.type")
        if "const" in schema:
            return 1
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise InvalidRequest(f"{_short(loc)}: 'enum' must be a non-empty list", self.where)
            width, depth = _trie_shape(_trie(enum_texts(schema["enum"])))
            n = width if depth <= MAX_TRIE_DEPTH else len(schema["enum"])
            if n > MAX_LIVE_PARSES:
                self.over(f"{loc}.enum", n, f"{n} enum values are possible at once", "use fewer values")
            return n
        if t in (None, "object") and ("properties" in schema or schema.get("additionalProperties", True) is not True):
            props, required = schema.get("properties"), schema.get("required")
            return self.obj(props if isinstance(props, dict) else {},
                            set(required) if isinstance(required, list) else set(),
                            schema.get("additionalProperties"), loc)
        if t in (None, "object") and "allOf" in schema:
            props, required = {}, set()
            for part in schema["allOf"] if isinstance(schema["allOf"], list) else []:
                for comp, req in ([(p, False) for p in part["anyOf"]] if isinstance(part, dict) and "anyOf" in part
                                  else [(part, True)]):
                    if isinstance(comp, dict) and "$ref" in comp:
                        comp = self.resolve(comp["$ref"], loc)
                    if isinstance(comp, dict) and isinstance(comp.get("properties"), dict):
                        props.update(comp["properties"])
                        if req:
                            required |= set(comp["properties"])
            return self.obj(props, required, None, f"{loc}.allOf")
        if t in (None, "array") and ("items" in schema or "prefixItems" in schema):
            items = schema.get("items") or schema.get("prefixItems")
            if isinstance(items, list):
                inner = max([self.live(x, f"{loc}.prefixItems[{i}]") for i, x in enumerate(items)], default=1)
            else:
                inner = self.live(items, f"{loc}.items")
            return max(2, inner)  # between items: "," or "]"
        if t in (None, "string") and "pattern" in schema:
            if not isinstance(schema["pattern"], str):
                raise InvalidRequest(f"{_short(loc)}: 'pattern' must be a string", self.where)
            try:
                return pattern_info(schema["pattern"])[1]
            except PatternError as e:
                raise InvalidRequest(f"{loc}.pattern {str(schema['pattern'])[:60]!r} {e}", self.where) from None
        if t in (None, "string") and schema.get("format") in _STRING_FORMATS:
            return 2
        if t == "string":
            return 3  # a plain character, an escape, or the closing quote
        if t in ("number", "integer"):
            return 4
        if t == "boolean":
            return 2
        if t == "null":
            return 1
        return self.ANY_VALUE

    def obj(self, props: dict, required: set, additional, loc: str) -> int:
        n_opt = sum(1 for k in props if k not in required)
        extra = additional is True or isinstance(additional, dict)
        fan = n_opt + extra + 1  # after a comma: any optional property still to come, another one, or "}"
        if fan > MAX_LIVE_PARSES:
            self.over(loc, fan, f"an object with {n_opt} optional properties" + (" and additionalProperties"
                      if extra else "") + " keeps them all possible after each comma",
                      f"make properties required or nest them in sub-objects (at most {MAX_LIVE_PARSES - 2} "
                      f"optional ones per object)")
        more = self.live(additional if isinstance(additional, dict) else {}, f"{loc}.additionalProperties") \
            if extra else 0
        inner = 1
        for k, p in props.items():
            # with additionalProperties, a declared key is also read as an additional one
            n = self.live(p, f"{loc}.properties.{k}") + more
            if n > MAX_LIVE_PARSES:
                self.over(f"{loc}.properties.{k}", n, "this value and additionalProperties are read at once",
                          "set additionalProperties to false")
            inner = max(inner, n)
        return max(fan, inner, more)

    def union(self, branches: list, loc: str) -> int:
        lives = [self.live(b, f"{loc}[{i}]") for i, b in enumerate(branches)]
        kinds = [self.kinds(b) for b in branches]
        total = len(branches)  # at its first character every branch is alive
        for kind in _KINDS:
            group = [i for i, k in enumerate(kinds) if kind in k]
            if not group:
                continue
            n = sum(lives[i] for i in group)
            if kind == "{" and len(group) > 1 and self.discriminated([branches[i] for i in group]):
                n = max(len(group), max(lives[i] for i in group))  # in step only up to the distinct const
            total = max(total, n)
        if total > MAX_LIVE_PARSES:
            self.over(loc, total, f"{len(branches)} branches start alike and are read in step",
                      "use fewer branches, or start each with a required property holding a distinct \"const\"")
        return total

    def discriminated(self, branches: list) -> bool:
        """Objects whose first property written (the first required one, as the converter orders
        them) is the same key with a distinct const: they part after that value."""
        key, values = None, set()
        for b in branches:
            if isinstance(b, dict) and "$ref" in b:
                b = self.resolve(b["$ref"], self.where)
            props = b.get("properties") if isinstance(b, dict) else None
            if not isinstance(props, dict):
                return False
            required = b.get("required") if isinstance(b.get("required"), list) else []
            first = next((k for k in props if k in required), None)
            p = props.get(first)
            if first is None or (key is not None and first != key) or not isinstance(p, dict):
                return False
            key = first
            if "const" in p:
                value = json.dumps(p["const"])
            elif isinstance(p.get("enum"), list) and len(p["enum"]) == 1:
                value = json.dumps(p["enum"][0])
            else:
                return False
            if value in values:
                return False
            values.add(value)
        return True


def live_parses(schema, where: str = "schema") -> int:
    """The number the checks bound (see the module docstring): parses a grammar for `schema`
    keeps alive at once, at most. InvalidRequest once past MAX_LIVE_PARSES."""
    return _LiveParses(_integer_ranges(schema), where).check()


MAX_ENUM_RANGE = 256


def _integer_ranges(node):
    """The converter shipped with llama-cpp-python ignores `minimum`/`maximum`; a small integer
    range becomes an enum, which it does enforce."""
    if isinstance(node, list):
        return [_integer_ranges(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _integer_ranges(v) for k, v in node.items()}
    if node.get("type") == "integer" and "enum" not in node:
        lo, hi = node.get("minimum"), node.get("maximum")
        if type(node.get("exclusiveMinimum")) is int:
            lo = node["exclusiveMinimum"] + 1
        if type(node.get("exclusiveMaximum")) is int:
            hi = node["exclusiveMaximum"] - 1
        if type(lo) is int and type(hi) is int and 0 <= hi - lo < MAX_ENUM_RANGE:
            return {"enum": list(range(lo, hi + 1))}
    return node


# ---------------------------------------------------------------------------------------------
# conversion


@functools.lru_cache(maxsize=1)
def _converter_class():
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):
        """llama-cpp-python's converter with patterns and enums written by this module."""

        def _visit_pattern(self, pattern, name):
            node, _ = pattern_info(pattern)
            subs: dict[str, str] = {}

            def sub_rule(text: str) -> str:
                if text not in subs:
                    subs[text] = self._add_rule(f"{name}-{len(subs) + 1}", text)
                return subs[text]

            text = pattern_gbnf(node, sub_rule)
            if node[0] == "alt":  # a|b inside the quotes, not "a | b"
                text = f"({text})"
            return self._add_rule(name, '"\\"" ' + text + ' "\\"" space')

        def _add_primitive(self, name, rule):
            # JSON strings hold no raw control characters (RFC 8259): the shipped `char` rule
            # lets a newline through, and the reply is then not JSON
            if name == "char":
                return self._add_rule(name, r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')
            return super()._add_primitive(name, rule)

        def resolve_refs(self, schema, url):
            """Local $refs only (the checks refuse others). The shipped one does not look inside a
            node that has a $ref, so {"$ref": "#/$defs/T", "$defs": {...}} left T's own refs out."""

            def visit(n):
                for v in n if isinstance(n, list) else n.values() if isinstance(n, dict) else ():
                    visit(v)
                ref = n.get("$ref") if isinstance(n, dict) else None
                if isinstance(ref, str) and ref.startswith("#/"):
                    n["$ref"] = full = url + ref
                    target = schema
                    for sel in ref.split("#")[-1].split("/")[1:]:
                        if not isinstance(target, dict) or sel not in target:
                            raise ValueError(f"$ref {ref!r} does not resolve in the schema")
                        target = target[sel]
                    self._refs[full] = target

            visit(schema)
            return schema

        def visit(self, schema, name):
            flat = ("$ref" in schema or "oneOf" in schema or "anyOf" in schema or "const" in schema
                    or isinstance(schema.get("type"), list))
            if "enum" in schema and not flat:
                trie = _trie(enum_texts(schema["enum"]))
                if _trie_shape(trie)[1] <= MAX_TRIE_DEPTH:
                    rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                    return self._add_rule(rule_name, _trie_gbnf(trie))
            return super().visit(schema, name)

    return Converter


def schema_grammar(schema, *, root: str = "root", where: str = "schema") -> str:
    """GBNF for values matching `schema`, its top rule named `root`."""
    check_schema(schema, where)
    schema = _integer_ranges(schema)
    try:
        conv = _converter_class()(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        resolved = conv.resolve_refs(schema, "request")
        conv.visit(resolved, "")
        text = conv.format_grammar()
    except InvalidRequest:
        raise
    except Exception as e:  # the converter's own complaints: unsupported keywords, bad refs, ...
        raise InvalidRequest(f"{where} could not be turned into a grammar: {type(e).__name__}: {e}"[:400],
                       where) from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{where} makes a grammar of {len(text)} characters; the limit is {MAX_GRAMMAR_CHARS}",
                       where)
    if root != "root":
        text = re.sub(r"^root ::=", f"{root} ::=", text, count=1, flags=re.M)
    return text


def response_format_grammar(fmt) -> str | None:
    """OpenAI's `response_format`: {"type": "text" | "json_object" | "json_schema", ...}."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("'response_format' must be an object with a 'type'", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise InvalidRequest("'response_format.json_schema' must be {\"name\": ..., \"schema\": {...}}",
                           "response_format.json_schema")
        return schema_grammar(js["schema"], where="response_format.json_schema.schema")
    raise InvalidRequest(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                   "response_format.type")


def ollama_format_grammar(fmt) -> str | None:
    """Ollama's `format`: "json", a JSON schema, or empty."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return JSON_OBJECT_GRAMMAR
    if isinstance(fmt, dict):
        return schema_grammar(fmt, where="format")
    raise InvalidRequest("'format' must be \"json\" or a JSON schema object", "format")
