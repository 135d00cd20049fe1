"""Fine-tuning data: read it, check it, and find the tokens the loss is computed on.

    rows = read_rows(["chats.jsonl"])                   # every problem reported at once, file:line
    report = build_dataset(rows, tokenizer, seq_len=1024)   # token ids + labels (-100: not trained)
    print(inspect(rows, tokenizer))                      # lengths, and rows with trained tokens lit
    end_of_turn_token(tokenizer)                         # "<|im_end|>": trained after each answer, GRPO stops on it

The shapes read (JSONL, JSON, CSV, Parquet; docs/tune-data.md has one example of each):
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}      (ShareGPT)
    {"prompt": ..., "completion": ...}   strings, or lists of messages (TRL's conversational shape)
    {"instruction": ..., "input": ..., "output": ...}                             (Alpaca)
    {"text": ...}                        trained on whole, with EOS appended

Which tokens are trained, for any chat template (no `{% generation %}` markers needed): the
conversation is rendered once with the model's own template and tokenized once (offsets on). For
each assistant turn the conversation is rendered again with the turn's content replaced by a
sentinel: the text before the sentinel and the text after it are the same in both renders, so the
content is what lies between. Trained: the content, and what the template writes after it up to
and including its first special token (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`,
`<|end|>`), and whitespace the turn writes before its content beyond the generation prompt (Llama
2's `' ' + content`); what follows the terminator (a newline, the next turn's header) is formatting
the next turn writes. Character spans become tokens through the fast tokenizer's offsets: a token
is trained when it covers any trained character.

torch and transformers are not imported here: the tokenizer is handed in.
"""

from __future__ import annotations

import csv
import html as htmllib
import json
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmdesk.errors import LlmdeskError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LISTED = 20  # problems listed in one error; the rest are counted
IGNORE = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignore_index)
TRAIN_ON = ("assistant", "all")

ROLES = ("system", "user", "assistant")
# ShareGPT's "from" values, and the OpenAI names some ShareGPT files use instead
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# what stands in for an assistant turn's content while its surroundings are rendered: letters only,
# so that templates that trim or strip content leave it as it is
SENTINEL = "LLMDESKxSENTINELxCONTENTx7f3a9c"


@dataclass
class Row:
    """One training row as read and validated."""

    source: str  # "file.jsonl:12": the line the row starts on (Parquet: the row number)
    messages: list[dict] | None  # chat messages, [{"role", "content"}]: None for a plain-text row
    text: str | None = None  # the plain-text shape ({"text": ...}): trained on whole

    @property
    def shape(self) -> str:
        return "text" if self.messages is None else "chat"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE (-100) where not trained, else the token id
    source: str

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class DatasetReport:
    examples: list[Example]
    too_long: list[tuple[str, int]]  # (source, tokens) of rows longer than seq_len
    lengths: list[int]  # tokens per row, before any truncation
    trained_tokens: int  # over the examples as they will be trained (after truncation)
    total_tokens: int
    notices: list[str] = field(default_factory=list)  # things done that the user should know

    def summary(self) -> str:
        """One line: rows, tokens, the trained share and the length distribution."""
        share = self.trained_tokens / self.total_tokens if self.total_tokens else 0.0
        return (f"{len(self.examples):,} rows, {self.total_tokens:,} tokens, {self.trained_tokens:,} trained "
                f"({share:.0%}); tokens a row as read: {length_stats(self.lengths)}")


# ---------------------------------------------------------------------------------------------
# Reading: every file, every row, every problem in one pass
# ---------------------------------------------------------------------------------------------


class _Problems:
    """Problems found while reading, each one line: `file:line: what was wrong: what to do`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(f"{where}: {what}")

    def raise_if_any(self, what: str) -> None:
        if not self.lines:
            return
        n = len(self.lines)
        if n == 1:  # one problem: one line
            raise LlmdeskError(self.lines[0])
        shown = self.lines[:MAX_LISTED]
        more = [f"... and {n - len(shown)} more"] if n > len(shown) else []
        head = f"{n} problem{'s' if n != 1 else ''} in {what}; fix {'them' if n != 1 else 'it'} and run again:"
        raise LlmdeskError("\n  ".join([head, *shown, *more]))


def read_rows(paths: Iterable[str | Path]) -> list[Row]:
    """Read and check every row of every file (a folder: its data files). Raises one LlmdeskError
    listing the first MAX_LISTED problems, with their file:line, and counting the rest."""
    problems = _Problems()
    rows: list[Row] = []
    files = _data_files([Path(p) for p in paths], problems)
    for path in files:
        seen, known = 0, len(problems.lines)
        for where, doc in _records(path, problems):
            seen += 1
            row = _row(where, doc, problems)
            if row is not None:
                rows.append(row)
        if seen == 0 and len(problems.lines) == known:
            problems.add(str(path), "empty file: no rows in it (give one example a line)")
    if not files and not problems.lines:
        problems.add("data", "no data files given")
    problems.raise_if_any("the training data")
    return rows


def _data_files(paths: list[Path], problems: _Problems) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not inside:
                problems.add(str(path), f"a folder with no data files in it ({', '.join(SUFFIXES)})")
            files.extend(inside)
        elif not path.exists():
            problems.add(str(path), "no such file")
        elif path.suffix.lower() not in SUFFIXES:
            problems.add(str(path), f"not a data file: give {', '.join(SUFFIXES)}")
        else:
            files.append(path)
    return files


def _records(path: Path, problems: _Problems) -> Iterator[tuple[str, Any]]:
    """(where, the row's object) for each row of a file; unreadable rows become problems."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from _parquet(path, problems)
            return
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel's CSVs, Windows editors) is not data
    except UnicodeDecodeError:
        problems.add(str(path), "not UTF-8 text: save it as UTF-8")
        return
    except OSError as e:
        problems.add(str(path), f"cannot read it: {e.strerror or e}")
        return
    if suffix == ".csv":
        yield from _csv(path, text, problems)
    elif suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_array(path, text, problems)
    elif suffix == ".json" and _one_json_object(text):
        yield from _json_object(path, text, problems)
    else:  # .jsonl, and JSON Lines under a .json name (what `datasets`' to_json writes)
        yield from _jsonl(path, text, problems)


def _jsonl(path: Path, text: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(f"{path}:{n}", f"not JSON ({e.msg} at column {e.colno}): each line is one JSON object")


def _one_json_object(text: str) -> bool:
    """A .json file holding one object ({"data": [...]}), not JSON Lines."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_array(path: Path, text: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    """A JSON list of rows, each with the line its object starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            problems.add(f"{path}:{e.lineno}", f"not JSON ({e.msg} at column {e.colno}): fix the file")
            return
        yield f"{path}:{line}", doc
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            problems.add(f"{path}:{line}", "not JSON (expected ',' or ']' after a row): fix the file")
            return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_object(path: Path, text: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    """{"data": [rows]}, or any object holding exactly one list of rows: rows numbered from 1."""
    data = json.loads(text)
    lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    if len(lists) != 1:
        yield f"{path}:1", data  # one row, as an object
        return
    for n, doc in enumerate(lists[0], 1):
        yield f"{path}:{n}", doc


def _csv(path: Path, text: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    """A header line names the columns; a row's place is the line it starts on. Columns holding
    JSON lists (messages, conversations, prompt/completion as chats) are decoded."""
    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    start = 1
    for record in reader:
        line, start = start, reader.line_num + 1
        if not record:
            continue
        if header is None:
            header = [h.strip() for h in record]
            continue
        if len(record) != len(header):
            problems.add(f"{path}:{line}", f"{len(record)} fields, the header names {len(header)} "
                                           f"({', '.join(header)}): quote fields that hold commas")
            continue
        doc: dict[str, Any] = dict(zip(header, record))
        for key, value in doc.items():
            if key in ("messages", "conversations", "prompt", "completion") and value.lstrip().startswith("["):
                try:
                    doc[key] = json.loads(value)
                except json.JSONDecodeError as e:
                    problems.add(f"{path}:{line}", f"column {key!r} starts like a JSON list but is not JSON "
                                                   f"({e.msg}): write it as a JSON list of messages")
                    doc = {}
                    break
        if doc:
            yield f"{path}:{line}", doc


def _parquet(path: Path, problems: _Problems) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        problems.add(str(path), "reading Parquet needs pyarrow: pip install pyarrow")
        return
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError: a file that is not Parquet
        problems.add(str(path), f"cannot read it as Parquet: {' '.join(str(e).split())[:200]}")
        return
    for n, doc in enumerate(table.to_pylist(), 1):
        yield f"{path}:{n}", doc


def _row(where: str, doc: Any, problems: _Problems) -> Row | None:
    """A row of any accepted shape as a Row, or None (with its problems added)."""
    if not isinstance(doc, dict):
        problems.add(where, f"a row is a JSON object, not {_kind(doc)}")
        return None
    doc = {k: v for k, v in doc.items() if v is not None}  # Parquet and CSV give every column
    if "messages" in doc or "conversations" in doc:
        key = "messages" if "messages" in doc else "conversations"
        messages = _messages(where, doc[key], key, problems)
        if messages is None or not _check_turns(where, messages, problems):
            return None
        return Row(where, messages)
    if "prompt" in doc or "completion" in doc:
        missing = [k for k in ("prompt", "completion") if k not in doc]
        if missing:
            have = "prompt" if "prompt" in doc else "completion"
            problems.add(where, f"has {have!r} but no {missing[0]!r}: give both")
            return None
        prompt = _side(where, doc["prompt"], "prompt", "user", problems)
        completion = _side(where, doc["completion"], "completion", "assistant", problems)
        if prompt is None or completion is None:
            return None
        messages = prompt + completion
        if not _check_turns(where, messages, problems):
            return None
        return Row(where, messages)
    if "instruction" in doc and "output" in doc:  # Alpaca: instruction (+ input) -> output
        parts = [doc["instruction"], doc.get("input", "")]
        if not all(isinstance(x, str) for x in (*parts, doc["output"])):
            problems.add(where, "'instruction', 'input' and 'output' must be strings")
            return None
        prompt = "\n\n".join(x for x in parts if x.strip())
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": doc["output"]}]
        for key, value in (("instruction", prompt), ("output", doc["output"])):
            if not value.strip():
                problems.add(where, f"{key!r} is empty: remove the row or fill it")
                return None
        return Row(where, messages)
    if "text" in doc:
        text = doc["text"]
        if not isinstance(text, str):
            problems.add(where, f"'text' is {_kind(text)}, not a string")
            return None
        if not text.strip():
            problems.add(where, "'text' is empty: remove the row or fill it")
            return None
        return Row(where, None, text)
    keys = ", ".join(repr(k) for k in doc) or "none"
    problems.add(where, f"no 'messages', 'conversations', 'prompt'/'completion', 'instruction'/'output' or 'text' "
                        f"(columns: {keys}): give one of those shapes")
    return None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _messages(where: str, value: Any, key: str, problems: _Problems) -> list[dict] | None:
    """A list of chat messages, normalised to {"role", "content"} with content a string."""
    if not isinstance(value, list):
        problems.add(where, f"{key!r} is {_kind(value)}, not a list of messages")
        return None
    if not value:
        problems.add(where, f"{key!r} is an empty list: give at least a user and an assistant turn")
        return None
    out, ok = [], True
    for i, message in enumerate(value, 1):
        at = f"{key}[{i}]"
        if not isinstance(message, dict):
            problems.add(where, f"{at} is {_kind(message)}, not an object with a role and a content")
            ok = False
            continue
        if "from" in message and "role" not in message:  # ShareGPT: {"from": "human", "value": ...}
            role_key, content_key, names = "from", "value", SHAREGPT_ROLES
        else:
            role_key, content_key, names = "role", "content", {r: r for r in ROLES}
        if role_key not in message or content_key not in message:
            miss = role_key if role_key not in message else content_key
            problems.add(where, f"{at} has no {miss!r}: each message needs {role_key!r} and {content_key!r}")
            ok = False
            continue
        role = message[role_key]
        if role not in names:
            problems.add(where, f"{at} has the unknown role {role!r}: use {', '.join(map(repr, names))}")
            ok = False
            continue
        content = _content(message[content_key])
        if content is None:
            problems.add(where, f"{at} ({role}) has {_kind(message[content_key])} as its content, not text")
            ok = False
            continue
        if not content.strip():
            problems.add(where, f"{at} ({role}) is empty: remove the turn or fill it")
            ok = False
            continue
        out.append({"role": names[role], "content": content})
    return out if ok else None


def _content(value: Any) -> str | None:
    """Text content: a string, or OpenAI's list of parts ([{"type": "text", "text": ...}])."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def _side(where: str, value: Any, key: str, role: str, problems: _Problems) -> list[dict] | None:
    """One side of a prompt/completion row: a string becomes one `role` message."""
    if isinstance(value, str):
        if not value.strip():
            problems.add(where, f"{key!r} is empty: remove the row or fill it")
            return None
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(where, value, key, problems)
    problems.add(where, f"{key!r} is {_kind(value)}: give a string or a list of messages")
    return None


def _check_turns(where: str, messages: list[dict], problems: _Problems) -> bool:
    """A system message only first; then user and assistant alternating from a user turn; the
    last turn an assistant's (a turn to learn from). One problem per row: the first out of order."""
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            problems.add(where, f"turn {i + 1} is a system message: a system message may only come first")
            return False
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns:
        problems.add(where, "only a system message: add a user and an assistant turn")
        return False
    offset = len(roles) - len(turns)
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            what = "the first turn after the system message" if i == 0 and offset else f"turn {i + offset + 1}"
            problems.add(where, f"{what} is {role!r} where {expected!r} was expected: user and assistant turns "
                                f"alternate, starting with the user")
            return False
    if turns[-1] != "assistant":
        problems.add(where, "the conversation ends with a user turn: end it with the assistant's answer "
                            "(that is what is trained)")
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Tokens and labels
# ---------------------------------------------------------------------------------------------


class _Prepared:
    """What a tokenizer and template need once, not per row."""

    def __init__(self, tokenizer: Any, chat_template: str | None, *, offsets: bool = True) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = None
        if offsets and not getattr(tokenizer, "is_fast", False):
            raise LlmdeskError("the tokenizer is not a fast tokenizer: llmdesk needs one (a tokenizer.json) "
                               "to map rendered text to tokens")
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # does the tokenizer put BOS in front of text by itself (llama.cpp's add_bos)?
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_id is not None and len(special) > len(plain) and special[0] == self.bos_id
        # every added token (special or not) is one token in the text: turn markers among them
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        markers = {str(getattr(t, "content", t)) for t in decoder.values()}
        markers |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        self.markers = sorted((m for m in markers if m), key=len, reverse=True)

    @property
    def own_template(self) -> str | None:
        """The tokenizer's own chat template (of several named ones, the default), if it has one."""
        own = getattr(self.tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        return own if own and own.strip() else None

    @property
    def template(self):
        if self._template is None:
            from llmdesk.runtime.templates import resolve_template

            own = self.own_template
            if not self.chat_template and not own:
                raise LlmdeskError("the tokenizer has no chat template, so chat rows cannot be rendered: give one "
                                   "(--chat-template chatml, llama-3, ... or a .jinja file)")
            self._template = resolve_template(own, self.chat_template,
                                              bos_token=self.tokenizer.bos_token or "",
                                              eos_token=self.tokenizer.eos_token or "")
        return self._template

    def render(self, messages: list[dict], source: str, *, add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)
        except LlmdeskError as e:
            raise LlmdeskError(f"{source}: {e}") from None

    def end_of_turn(self, upto: list[dict], source: str, marked: str | None = None) -> str:
        """What the template writes after the content of the assistant turn `upto` ends with, to
        end it (the terminator of that tail): found in a render of the conversation ending with this
        turn, its content SENTINEL (`marked`, when already rendered), so that no next turn is taken
        for it."""
        if marked is None:
            marked = self.render([*upto[:-1], {**upto[-1], "content": SENTINEL}], source)
        tail = marked[marked.find(SENTINEL) + len(SENTINEL):] if SENTINEL in marked else ""
        return self.terminator(tail)

    def terminator(self, after: str, *, specials_only: bool = False) -> str:
        """The end-of-turn text the model must learn to write: what the template writes after the
        content, up to and including its first special token (else up to trailing whitespace)."""
        marker = self.first_marker(after)
        if not marker:
            return "" if specials_only else after.rstrip()
        return after[: after.find(marker) + len(marker)]

    def first_marker(self, text: str) -> str:
        """The added token that comes first in `text` ("" if none does)."""
        first = (len(text), "")
        for marker in self.markers:
            at = text.find(marker, 0, first[0] + len(marker))
            if 0 <= at < first[0] or (at == first[0] and len(marker) > len(first[1])):
                first = (at, marker)
        return first[1]


@dataclass
class _Encoded:
    text: str  # the rendered row
    ids: list[int]
    offsets: list[tuple[int, int]]  # (start, end) characters of each token in text; (0, 0): added
    trained: list[bool]
    source: str


def _encode(row: Row, prep: _Prepared, train_on: str) -> _Encoded:
    if train_on not in TRAIN_ON:
        raise LlmdeskError(f"train_on is {train_on!r}: use 'assistant' or 'all'")
    if row.messages is None:
        text = row.text or ""
        spans = [(0, len(text))]
    else:
        text = prep.render(row.messages, row.source)
        spans = [(0, len(text))] if train_on == "all" else _assistant_spans(row, prep, text)
    enc = prep.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    trained = _covered(offsets, spans)
    if prep.adds_bos and (not ids or ids[0] != prep.bos_id):  # the template did not write it
        ids, offsets, trained = [prep.bos_id, *ids], [(0, 0), *offsets], [False, *trained]
    if row.messages is None:  # plain text: the model learns to stop
        if prep.eos_id is None:
            raise LlmdeskError("the tokenizer has no EOS token, so text rows cannot end: give a tokenizer with one")
        ids, offsets, trained = [*ids, prep.eos_id], [*offsets, (len(text), len(text))], [*trained, True]
    elif train_on == "all" and ids and ids[0] == prep.bos_id:
        trained[0] = True
    return _Encoded(text, ids, offsets, trained, row.source)


def _assistant_spans(row: Row, prep: _Prepared, full: str) -> list[tuple[int, int]]:
    """The character spans of `full` (the whole conversation, rendered) to train: each assistant
    turn's content and its terminator.

    Each turn is found by rendering the whole conversation again with that turn's content replaced
    by SENTINEL: the text before the sentinel is the same in both renders, and so is the text after
    it, whatever the template does with other turns (Mistral v0.3 moves the system message, Qwen 3
    drops earlier turns' reasoning). A template that rewrites the content itself (Qwen 3 reformats
    `<think>` reasoning in the last turn) is matched by finding the content, as given, where the
    two renders differ."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    messages = row.messages or []
    n_turn = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        n_turn += 1
        marked = prep.render([*messages[:i], {**message, "content": SENTINEL}, *messages[i + 1:]], row.source)
        at = marked.find(SENTINEL)
        before, after = marked[:max(at, 0)], marked[at + len(SENTINEL):]
        if (at >= 0 and SENTINEL not in after and len(before) + len(after) <= len(full)
                and full.startswith(before) and full.endswith(after)):
            start, end = len(before), len(full) - len(after)
        else:
            start = _verbatim(full, marked, message["content"].strip(), cursor)
            if start < 0:
                raise LlmdeskError(f"{row.source}: the chat template does not write assistant turn {n_turn}'s "
                                   f"content as it is given, so its tokens cannot be found: train_on='all', or "
                                   f"another template")
            end = start + len(message["content"].strip())
            before = full[:start]
        start -= len(_lead(before, prep, messages[:i], row.source))
        end += len(_terminator(full, end, prep, messages[: i + 1], marked if i == len(messages) - 1 else None,
                               row.source))
        spans.append((start, end))
        cursor = end
    return spans


def _terminator(full: str, end: int, prep: _Prepared, upto: list[dict], marked: str | None, source: str) -> str:
    """What the template writes after an answer's content to end the turn, as it stands in `full`
    after `end`, up to its first special token."""
    term = prep.end_of_turn(upto, source, marked)
    if full.startswith(term, end):
        return term
    special = prep.terminator(full[end:], specials_only=True)  # the turn ends differently mid-conversation
    return special if special and not special[: -len(prep.first_marker(special))].strip() else ""


def _verbatim(full: str, marked: str, content: str, cursor: int) -> int:
    """Where `content` stands in `full`, overlapping the part that differs from `marked`; else -1."""
    lcp = 0
    while lcp < min(len(full), len(marked)) and full[lcp] == marked[lcp]:
        lcp += 1
    lcs = 0
    while lcs < min(len(full), len(marked)) - lcp and full[-1 - lcs] == marked[-1 - lcs]:
        lcs += 1
    at = full.find(content, max(cursor, lcp - len(content)))
    return at if 0 <= at <= len(full) - lcs else -1


def _lead(before: str, prep: _Prepared, prompt: list[dict], source: str) -> str:
    """Whitespace the assistant turn itself writes before its content, beyond the generation
    prompt (Llama 2's and Mistral's `' ' + content`): the model writes it, so it is trained."""
    space = before[len(before.rstrip()):]
    if not space:
        return ""
    try:
        generation = prep.render(prompt, source, add_generation_prompt=True)
    except LlmdeskError:
        return ""
    # only where the generation prompt ends the same way as the text before the content (not when
    # the turn writes more of its own, like Qwen 3's empty <think></think> block)
    if not before.rstrip().endswith(generation.rstrip()[-16:]):
        return ""
    given = generation[len(generation.rstrip()):]
    return space[len(given):] if len(space) > len(given) else ""


def _covered(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens cover any character of the (sorted, disjoint) spans."""
    out, k = [], 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        out.append(end > start and k < len(spans) and spans[k][0] < end)
    return out


def end_of_turn_token(tokenizer: Any, chat_template: str | None = None) -> str:
    """The token the chat template ends an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
    `</s>`, `<end_of_turn>`, `<|end|>`): what SFT trains after each answer, and where sampling a
    reply stops. "" when the template ends turns with no added token, or there is no template."""
    prep = _Prepared(tokenizer, chat_template, offsets=False)
    if not (chat_template or prep.own_template):
        return ""
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    return prep.first_marker(prep.end_of_turn(turn, "the chat template"))


def build_example(row: Row, tokenizer: Any, *, chat_template: str | None = None,
                  train_on: str = "assistant") -> Example:
    """Token ids and labels for one row. `tokenizer`: a transformers fast tokenizer, with a chat
    template of its own or `chat_template` (a built-in name, a .jinja file). train_on="all"
    trains every token."""
    return _example(_encode(row, _Prepared(tokenizer, chat_template), train_on))


def _example(enc: _Encoded) -> Example:
    labels = [tid if t else IGNORE for tid, t in zip(enc.ids, enc.trained)]
    return Example(enc.ids, labels, enc.source)


def build_dataset(rows: list[Row], tokenizer: Any, *, seq_len: int, train_on: str = "assistant",
                  truncate: bool = False, chat_template: str | None = None) -> DatasetReport:
    """Examples for every row. Rows longer than `seq_len` tokens are an error listing them (one line)
    unless `truncate` (then they are cut, and a notice says how many)."""
    if seq_len < 2:
        raise LlmdeskError(f"--seq-len is {seq_len}: give at least 2 tokens")
    every, _ = _encode_all(rows, _Prepared(tokenizer, chat_template), train_on)
    lengths = [len(e.input_ids) for e in every]
    too_long = [(e.source, len(e.input_ids)) for e in every if len(e.input_ids) > seq_len]
    notices = []
    if too_long and not truncate:
        raise LlmdeskError(_too_long_line(too_long, seq_len, "raise --seq-len, or cut them with --truncate"))
    examples, empty = [], []
    for ex in every:
        if len(ex.input_ids) > seq_len:
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len], ex.source)
        if ex.trained == 0:
            empty.append(ex.source)
            continue
        examples.append(ex)
    if too_long:
        notices.append(_too_long_line(too_long, seq_len, "they are cut to that length (--truncate)"))
    if empty:
        notices.append(f"{len(empty)} row{'s' if len(empty) != 1 else ''} left no token to train after "
                       f"truncation and {'are' if len(empty) != 1 else 'is'} left out ({', '.join(empty[:3])}"
                       f"{', ...' if len(empty) > 3 else ''})")
    return DatasetReport(examples, too_long, lengths, sum(e.trained for e in examples),
                         sum(len(e.input_ids) for e in examples), notices)


def _encode_all(rows: list[Row], prep: _Prepared, train_on: str, *,
                keep: int = 0) -> tuple[list[Example], list[_Encoded]]:
    """Every row as an Example (and the first `keep` with their text and offsets, for showing), or
    one error listing every row that could not be encoded (with its file:line)."""
    if train_on not in TRAIN_ON:
        raise LlmdeskError(f"train_on is {train_on!r}: use 'assistant' or 'all'")
    problems = _Problems()
    examples, kept = [], []
    for row in rows:
        try:
            enc = _encode(row, prep, train_on)
        except LlmdeskError as e:  # a template that refuses the row, a turn that cannot be found
            text = str(e)
            problems.lines.append(text if text.startswith(f"{row.source}: ") else f"{row.source}: {text}")
            continue
        examples.append(_example(enc))
        if len(kept) < keep:
            kept.append(enc)
    problems.raise_if_any("the training data")
    return examples, kept


def _too_long_line(too_long: list[tuple[str, int]], seq_len: int, todo: str) -> str:
    n = len(too_long)
    first = ", ".join(f"{source} ({tokens} tokens)" for source, tokens in too_long[:3])
    longest = max(tokens for _, tokens in too_long)
    return (f"{n} row{'s' if n != 1 else ''} {'are' if n != 1 else 'is'} longer than --seq-len {seq_len} "
            f"(the longest {longest} tokens): {first}{', ...' if n > 3 else ''}; {todo}")


# ---------------------------------------------------------------------------------------------
# Inspect: lengths, and rows with their trained tokens lit
# ---------------------------------------------------------------------------------------------


def length_stats(lengths: list[int]) -> str:
    """min / median / p95 / max of token lengths, as one short line."""
    if not lengths:
        return "no rows"
    s = sorted(lengths)
    p95 = s[min(len(s) - 1, max(0, -(-95 * len(s) // 100) - 1))]  # nearest rank
    return f"min {s[0]:,} / median {statistics.median(s):,.0f} / p95 {p95:,} / max {s[-1]:,}"


def histogram(lengths: list[int], *, bins: int = 10, width: int = 40) -> list[str]:
    """Text bars of the token-length distribution: `  lo-hi  ████  count`."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts: dict[int, int] = {}
    for n in lengths:
        counts[(n - lo) // step] = counts.get((n - lo) // step, 0) + 1
    top = max(counts.values())
    label_w = len(f"{lo + (max(counts)) * step:,}-{lo + (max(counts) + 1) * step - 1:,}")
    lines = []
    for b in range(max(counts) + 1):
        c = counts.get(b, 0)
        label = f"{lo + b * step:,}-{lo + (b + 1) * step - 1:,}"
        bar = "█" * (round(c / top * width) if c else 0)
        lines.append(f"  {label:>{label_w}}  {bar} {c}")
    return lines


def inspect(rows: list[Row], tokenizer: Any, *, n: int = 3, html: Path | None = None,
            chat_template: str | None = None, seq_len: int | None = None, train_on: str = "assistant") -> str:
    """What training will see: the token-length distribution and, for the first `n` rows, the
    rendered text with trained tokens highlighted. Returns rich markup for the terminal; writes an
    HTML page of the same to `html` when given."""
    from rich.markup import escape

    prep = _Prepared(tokenizer, chat_template)
    examples, shown = _encode_all(rows, prep, train_on, keep=n)
    lengths = [len(e.input_ids) for e in examples]
    trained = sum(e.trained for e in examples)
    total = sum(lengths)
    shapes = {"chat": sum(r.messages is not None for r in rows), "text": sum(r.messages is None for r in rows)}
    head = [f"[bold]{len(rows):,} rows[/bold] ({shapes['chat']:,} chat, {shapes['text']:,} text), "
            f"{total:,} tokens, {trained:,} trained ({trained / total if total else 0:.0%})",
            f"tokens a row: {length_stats(lengths)}"]
    if seq_len:
        over = sum(n_ > seq_len for n_ in lengths)
        head.append(f"longer than --seq-len {seq_len}: {over:,} row{'s' if over != 1 else ''}")
    plain_head = [h.replace("[bold]", "").replace("[/bold]", "") for h in head]
    bars = histogram(lengths)
    out = [*head, "", "[bold]token lengths[/bold]", *(escape(b) for b in bars)]
    legend = "[reverse green]trained tokens[/reverse green] in green, [dim]the rest dim[/dim]"
    if shown:
        out += ["", f"[bold]first {len(shown)} row{'s' if len(shown) != 1 else ''}[/bold] ({legend})"]
    for enc in shown:
        out += ["", f"[bold]── {escape(enc.source)}[/bold]: {len(enc.ids):,} tokens, {sum(enc.trained):,} trained"]
        out.append("".join(f"[reverse green]{escape(piece)}[/reverse green]" if t else f"[dim]{escape(piece)}[/dim]"
                           for piece, t in _pieces(enc, prep)))
    if html is not None:
        _write_html(Path(html), plain_head, bars, shown, prep)
        out += ["", f"written: {escape(str(html))}"]
    return "\n".join(out)


def _pieces(enc: _Encoded, prep: _Prepared) -> list[tuple[str, bool]]:
    """The rendered text cut where training starts and stops (tokens without text shown by name)."""
    pieces: list[tuple[str, bool]] = []
    at = 0
    for tid, (start, end), t in zip(enc.ids, enc.offsets, enc.trained):
        if end <= at and not (start == end):
            continue  # a second token over the same characters (a byte split inside one)
        if start == end:  # added: BOS in front, EOS behind a text row
            text = prep.tokenizer.convert_ids_to_tokens(tid)
        else:
            text, at = enc.text[max(start, at):end], end
            if start > at:
                pieces.append((enc.text[at:start], False))
        if pieces and pieces[-1][1] == t:
            pieces[-1] = (pieces[-1][0] + text, t)
        else:
            pieces.append((text, t))
    if at < len(enc.text):
        pieces.append((enc.text[at:], False))
    return pieces


def _write_html(path: Path, head: list[str], bars: list[str], shown: list[_Encoded], prep: _Prepared) -> None:
    from llmdesk.atomic import write_text

    e = htmllib.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>llmdesk tune --inspect</title>",
             "<style>body{font-family:sans-serif;margin:2em}pre{white-space:pre-wrap;background:#f6f6f6;"
             "padding:1em}.t{background:#b7f0b1}.n{color:#888}</style>",
             "<h1>Training data</h1>", "<p>" + "<br>".join(e(h) for h in head) + "</p>",
             "<h2>Token lengths</h2>", "<pre>" + e("\n".join(bars)) + "</pre>",
             "<p><span class='t'>trained</span> <span class='n'>not trained</span></p>"]
    for enc in shown:
        parts.append(f"<h2>{e(enc.source)}: {len(enc.ids):,} tokens, {sum(enc.trained):,} trained</h2>")
        parts.append("<pre>" + "".join(f"<span class='{'t' if t else 'n'}'>{e(piece)}</span>"
                                       for piece, t in _pieces(enc, prep)) + "</pre>")
    write_text(path, "\n".join(parts) + "\n")
