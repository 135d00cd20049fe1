"""Which way imports run between llmdesk's rooms (docs/architecture.md draws the same picture).

Every module under src/llmdesk is parsed with `ast`, and every import counts: at module level and
inside functions (a lazy import is still a dependency). A failure names file:line.

    faces          cli/, serve/, the package's Python API (llmdesk/__init__.py)
    capabilities   bench/, quantize/, eval/, train/, rag/, tools/, demo/
    engine & facts runtime/ | fit/      (neither imports the other)
    the store      store/
    file formats   formats/
    shared base    errors.py, atomic.py

A room imports only rooms below it, never another room's private names (`_name`, `_module`), and
only runtime/ touches llama_cpp. The exceptions are listed below, each with its reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "llmdesk"

# room -> rank; an import must go to a lower rank (or stay in its room)
RANKS = {
    "errors": 0, "atomic": 0,  # the shared base: one-line errors, atomic writes
    "formats": 1,  # GGUF and HF files, the model shape: knows no catalog and no engine
    "store": 2,  # the catalog, pulls, user paths, logs, results (reads GGUF headers through formats)
    "runtime": 3, "fit": 3,  # the Engine over llama.cpp | estimates from shapes and devices
    "bench": 4, "quantize": 4, "eval": 4, "train": 4, "rag": 4, "tools": 4, "demo": 4,
    "cli": 5, "serve": 5, "api": 5,  # "api": llmdesk/__init__.py, the Python API (`llmdesk.load`)
}

# imports between rooms of one rank that are allowed, room to room
SIDEWAYS = {
    ("cli", "serve"): "`llmdesk serve` builds and starts the server",
    # one way only (eval never imports quantize): a quantization's quality is measured, and its
    # result recorded, with eval's perplexity and KL divergence
    ("quantize", "eval"): "quantize's quality report and sweep measure with eval",
    # one way only: training data is filtered and ranked with eval's judge and graders (GRPO's
    # rewards are eval's graders), and synth docs reads passages as `docs` chunks them
    ("train", "eval"): "synth and GRPO grade with eval's graders and judge",
    ("train", "rag"): "synth docs reads and chunks documents with rag's extract and chunk",
}

# single imports that break a rule, by (importing file, imported module): each must still exist
# (test_every_exception_is_still_needed), so the list only shrinks
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("bench/make_model.py", "llmdesk.quantize.core"):
        "make-model writes f16 and quantizes it with llama.cpp's quantizer, as a real model's file is made",
    ("demo/build.py", "llmdesk.train.config"): "the demo model is built by llmdesk's own train and quantize",
    ("demo/build.py", "llmdesk.train.loop"): "the demo model is built by llmdesk's own train and quantize",
    ("demo/build.py", "llmdesk.quantize.core"): "the demo model is built by llmdesk's own train and quantize",
    ("quantize/_worker.py", "llama_cpp"):
        "the quantizer's child process: llama_model_quantize runs in a process of its own, so that a "
        "crash or an interrupt cannot take the caller down; it loads only llama.cpp",
}

# heavy ML libraries: imported only in train/ and the converter (the `llmdesk[train]` extra)
ML_LIBS = ("torch", "transformers", "safetensors", "tokenizers", "sentencepiece", "peft", "trl", "datasets",
           "accelerate")
ML_PLACES = ("train/", "formats/convert.py", "formats/hf.py")


@dataclass
class Import:
    file: str  # relative to src/llmdesk
    line: int
    module: str  # absolute: "llmdesk.store.paths", "llama_cpp", "os"
    name: str | None  # the name imported from it (`from module import name`), else None

    @property
    def where(self) -> str:
        return f"src/llmdesk/{self.file}:{self.line}"

    @property
    def target(self) -> str:
        """The module, or module.name when a name is imported from it."""
        return f"{self.module}.{self.name}" if self.name else self.module


def room_of_file(rel: str) -> str:
    parts = rel.split("/")
    if len(parts) > 1:
        return parts[0]
    stem = parts[0].removesuffix(".py")
    return "api" if stem == "__init__" else stem


def room_of_module(module: str) -> str | None:
    """The room an absolute module path lies in (None: not llmdesk; "api": the package itself)."""
    parts = module.split(".")
    if parts[0] != "llmdesk":
        return None
    return parts[1] if len(parts) > 1 else "api"


def imports_in(code: str, rel: str) -> list[Import]:
    """The imports of the module `code`, which lives at src/llmdesk/<rel>."""
    package = ["llmdesk", *rel.split("/")[:-1]]
    out: list[Import] = []
    for node in ast.walk(ast.parse(code, rel)):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                # `from llmdesk.store import paths` imports a module: count it as llmdesk.store.paths
                sub = SRC / f"{module}.{a.name}".replace(".", "/")
                if sub.with_suffix(".py").is_file() or sub.is_dir():
                    out.append(Import(rel, node.lineno, f"{module}.{a.name}", None))
                else:
                    out.append(Import(rel, node.lineno, module, a.name))
    return sorted(out, key=lambda i: i.line)


def all_imports() -> list[Import]:
    return [i for f in sorted(PKG.rglob("*.py"))
            for i in imports_in(f.read_text(encoding="utf-8"), f.relative_to(PKG).as_posix())]


def excepted(i: Import) -> bool:
    return (i.file, i.module) in EXCEPTIONS or (i.file, i.target) in EXCEPTIONS


def layering_problems(i: Import) -> list[str]:
    """What is wrong with one import (empty when nothing is)."""
    problems = []
    mine, theirs = room_of_file(i.file), room_of_module(i.module)
    if i.module.split(".")[0] == "llama_cpp" and mine != "runtime":
        problems.append(f"{i.where}: imports {i.module}; only runtime/ touches llama.cpp")
    if i.module.split(".")[0] in ML_LIBS and not i.file.startswith(ML_PLACES):
        problems.append(f"{i.where}: imports {i.module}; torch & co. live only in train/ and the converter")
    if theirs is None or theirs == mine:
        return problems
    private = [p for p in i.target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
    if private:
        problems.append(f"{i.where}: imports {i.target}, a private name of {theirs}/")
    if theirs == "api" and i.name == "__version__":  # a constant of the package itself
        return problems
    for room in (mine, theirs):
        assert room in RANKS, (f"{i.where}: room {room!r} has no place yet: give it one in RANKS "
                               "(tests/test_layering.py) and in docs/architecture.md")
    if RANKS[theirs] > RANKS[mine]:
        problems.append(f"{i.where}: {mine}/ imports {i.module} from {theirs}/, a higher room")
    elif RANKS[theirs] == RANKS[mine] and (mine, theirs) not in SIDEWAYS:
        problems.append(f"{i.where}: {mine}/ imports {i.module} from {theirs}/, a room beside it")
    return problems


def test_imports_run_one_way():
    problems = [p for i in all_imports() if not excepted(i) for p in layering_problems(i)]
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_every_exception_is_still_needed():
    found = {(i.file, i.module) for i in all_imports()} | {(i.file, i.target) for i in all_imports()}
    stale = [f"{file} -> {module}" for file, module in EXCEPTIONS if (file, module) not in found]
    assert not stale, "exceptions that no import needs any more (remove them from EXCEPTIONS): " + ", ".join(stale)
    excepted_ok = [f"{i.where} -> {i.target}" for i in all_imports() if excepted(i) and not layering_problems(i)]
    assert not excepted_ok, "excepted imports that break no rule (remove them from EXCEPTIONS): " + ", ".join(excepted_ok)


def test_the_rules_catch_what_they_should():
    """The checker itself, on imports it must refuse and accept."""
    bad = [Import("formats/convert.py", 1, "llmdesk.store.catalog", "add_file"),  # up
           Import("fit/accuracy.py", 2, "llmdesk.bench.make_model", None),  # up
           Import("fit/measure.py", 3, "llmdesk.runtime.model", "Model"),  # beside
           Import("serve/models.py", 4, "llmdesk.store.refs", "_looks_like_path"),  # private
           Import("eval/ppl.py", 5, "llama_cpp", None),  # llama.cpp outside runtime
           Import("fit/core.py", 6, "torch", None)]  # torch outside train and the converter
    assert all(layering_problems(i) for i in bad)
    good = [Import("bench/core.py", 1, "llmdesk.fit.memory", "estimate_memory"),
            Import("store/catalog.py", 2, "llmdesk.formats.gguf", "read_gguf"),
            Import("bench/core.py", 3, "llmdesk", "__version__"),
            Import("cli/serve.py", 4, "llmdesk.serve.app", "create_app"),
            Import("quantize/workflow.py", 5, "llmdesk.quantize.core", "_pid_alive"),  # private, same room
            Import("runtime/llama.py", 6, "llama_cpp", None)]
    assert not [p for i in good for p in layering_problems(i)]
    code = "import os\ndef f():\n    from ..store import paths\n    from .. import __version__\n"
    assert [(i.line, i.module, i.name) for i in imports_in(code, "fit/m.py")] == [
        (1, "os", None), (3, "llmdesk.store.paths", None), (4, "llmdesk", "__version__")]


def test_cheap_rooms_load_no_engine():
    """fit/, formats/ and the chat templates work on a machine that cannot run the model: importing
    every one of their modules loads neither torch nor llama.cpp."""
    modules = ["llmdesk.fit", "llmdesk.formats", "llmdesk.runtime.templates"] + sorted(
        f"llmdesk.{room}.{p.stem}" for room in ("fit", "formats") for p in (PKG / room).glob("*.py")
        if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing {', '.join(modules)} loaded {r.stdout.strip()}"
