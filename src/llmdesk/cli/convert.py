"""`llmdesk convert`: a Hugging Face checkpoint folder -> a GGUF file (registered in the store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, err, out


@app.command()
def convert(
    hf_dir: Annotated[Path, typer.Argument(help="A Hugging Face checkpoint folder (config.json, weights, tokenizer).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The GGUF file to write.")],
    type_: Annotated[str, typer.Option("--type", help="Tensor type: f32, f16, bf16 or q8_0.")] = "f16",
    name: Annotated[Optional[str], typer.Option("--name", help="Store name NAME[:TAG] (default: from the file name).")] = None,
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not add the file to the store.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the tokenizer self-check.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a Hugging Face checkpoint (llama, mistral, qwen2, phi3, gemma, gemma2) to GGUF.

    After writing, the tokenizer is checked: test strings tokenized by the original tokenizer and
    by llama.cpp reading the new file must give the same ids, else the file is removed.
    """
    from ..formats.convert import convert as run_convert
    from ..runtime.llama import LlamaModel
    from ..store import catalog

    # the store name first: a bad --name fails before any work
    n, t = catalog.parse_name(name) if name else catalog.names_from_filename(output.name)
    with err.status("converting ...", spinner="dots") as status:
        res = run_convert(hf_dir, output, out_type=type_.lower(), name=name, check_with=None if no_check else LlamaModel,
                          progress=lambda msg: status.update(f"{msg} ..."))
    registered = None
    if not no_register:
        try:
            catalog.add_file(res.path, n, t, source=f"convert:{hf_dir.expanduser().resolve()}", progress=False)
        except BaseException:
            res.path.unlink(missing_ok=True)  # a conversion that was asked to land in the store, did not
            raise
        registered = f"{n}:{t}"
    if as_json:
        out.print(json.dumps({**res.to_dict(), "registered": registered}), markup=False)
        return
    reg = f", registered as {registered}" if registered else ""
    out.print(f"wrote {res.path} ({res.architecture}, {res.n_params / 1e6:.2f}M parameters, {res.out_type}, "
              f"{res.size_bytes / 1e6:.1f} MB, tokenizer {res.tokenizer}){reg}", markup=False)
