"""`llmdesk convert`: a Hugging Face checkpoint folder -> a GGUF file (registered in the store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out


@app.command()
def convert(
    hf_dir: Annotated[Optional[Path], typer.Argument(help="A Hugging Face checkpoint folder (config.json, weights, tokenizer).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="The GGUF file to write.")] = ...,
    type_: Annotated[Optional[str], typer.Option("--type", help="Tensor type: f32, f16, bf16 or q8_0 (default: f16; f32 for --lora).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Store name NAME[:TAG] (default: from the file name).")] = None,
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not add the file to the store.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the tokenizer self-check.")] = False,
    lora: Annotated[Optional[Path], typer.Option("--lora", help="Convert this PEFT LoRA adapter folder instead, to a llama.cpp LoRA GGUF (for run/chat --lora); needs --base.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="With --lora: the base model the adapter was trained on: its Hugging Face folder, its GGUF, or NAME[:TAG] from 'llmdesk list'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a Hugging Face checkpoint (llama, mistral, qwen2, phi3, gemma, gemma2; bert for
    embeddings) to GGUF, or with --lora a PEFT LoRA adapter to a llama.cpp LoRA GGUF.

    After writing, the tokenizer is checked: test strings tokenized by the original tokenizer and
    by llama.cpp reading the new file must give the same ids, else the file is removed. An
    adapter's shapes are checked against its base before anything is written; adapters are not
    added to the store.
    """
    if lora is not None or base is not None:
        return _convert_lora(hf_dir, lora, base, output, type_ or "f32", name, as_json)
    if hf_dir is None:
        raise LlmdeskError("give the Hugging Face checkpoint folder to convert (or --lora ADAPTER_DIR --base BASE)")
    type_ = type_ or "f16"
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


def _convert_lora(hf_dir: Path | None, lora: Path | None, base: str | None, output: Path, type_: str,
                  name: str | None, as_json: bool) -> None:
    """`convert --lora ADAPTER_DIR --base BASE -o OUT.gguf`: formats.lora_gguf, not registered."""
    from ..formats.lora_gguf import convert_lora

    if hf_dir is not None:
        raise LlmdeskError(f"give either a checkpoint folder ({hf_dir}) or --lora ADAPTER_DIR, not both")
    if lora is None:
        raise LlmdeskError("--base goes with --lora ADAPTER_DIR (a checkpoint folder needs no --base)")
    if base is None:
        raise LlmdeskError("--lora needs --base: the base model's Hugging Face folder, its GGUF or its name in the store")
    given = base
    if not Path(base).expanduser().exists():  # a name in the store: its GGUF
        from ..store.refs import resolve

        base = str(resolve(base).path)
    with err.status("converting the adapter ...", spinner="dots") as status:
        res = convert_lora(lora, base, output, out_type=type_.lower(), name=name,
                           progress=lambda msg: status.update(f"{msg} ..."))
    if as_json:
        out.print(json.dumps(res.to_dict()), markup=False)
        return
    out.print(f"wrote {res.path} (LoRA for {res.architecture}, rank {res.rank}, alpha {res.alpha:g}, "
              f"{', '.join(res.targets)}; {res.n_tensors} tensors, {res.out_type}, {res.size_bytes / 1e3:,.0f} kB; "
              f"checked against {given})", markup=False)
