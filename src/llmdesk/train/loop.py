"""Pretraining a small Llama model from scratch: corpus -> tokenizer -> LlamaForCausalLM -> HF + GGUF.

The whole story in one file:
  1. read the corpus (txt, md: a file is a document; jsonl: a line is a document, its "text"
     field, or its "messages" rendered with ChatML);
  2. a byte-level BPE tokenizer, trained here or reused; documents end with <|endoftext|>;
  3. a validation split (whole documents, chosen by the seed; a token tail for one document);
  4. AdamW with linear warm-up and cosine decay; batch b at step s is drawn from a generator
     seeded by (seed, s), so a resumed run sees exactly the batches an uninterrupted one would;
  5. validation loss and perplexity at intervals, checkpoints (atomic) at intervals;
  6. the loss curve as PNG, the metrics as JSON, the model in HF format and as GGUF (convert).

torch and transformers are imported when `train` is called, never at import time.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmdesk.atomic import atomic_path
from llmdesk.errors import LlmdeskError
from llmdesk.formats.hf import require_train_extra
from llmdesk.train.config import TrainConfig
from llmdesk.train.tokenizer import CHATML_TEMPLATE, EOS, load_tokenizer, save_hf_tokenizer, train_bpe

CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens_seen: int
    n_params: int
    train_tokens: int
    val_tokens: int
    final_loss: float
    val_loss: float | None
    val_ppl: float | None
    seconds: float
    gguf: Path | None
    hf_dir: Path
    loss_png: Path
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "history"}
        return d


# =============================================================================================
# 1. the corpus


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in CORPUS_SUFFIXES and f.is_file())
        elif p.is_file():
            if p.suffix.lower() not in CORPUS_SUFFIXES:
                raise LlmdeskError(f"{p}: not a corpus file (use .txt, .md or .jsonl with a \"text\" field)")
            files.append(p)
        else:
            raise LlmdeskError(f"{p}: no such file or folder")
    return files


def render_chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def read_corpus(paths: list[str | os.PathLike]) -> list[str]:
    """The documents of the corpus files (and folders), in order; one-line errors."""
    files = _expand([Path(p) for p in paths])
    if not files:
        raise LlmdeskError("empty corpus: no .txt, .md or .jsonl files given")
    docs: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmdeskError(f"{f}: cannot read it as UTF-8 text ({e})") from None
        if f.suffix.lower() != ".jsonl":
            if text.strip():
                docs.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmdeskError(f"{f}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                doc = obj["text"]
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                doc = render_chatml(obj["messages"])
            else:
                raise LlmdeskError(f"{f}:{n}: needs a \"text\" string (or a \"messages\" list)")
            if doc.strip():
                docs.append(doc)
    if not docs:
        raise LlmdeskError(f"empty corpus: {', '.join(str(f) for f in files[:3])} hold no text")
    return docs


# =============================================================================================
# 3. the split, and 4. the batches


def split_tokens(docs_ids: list[list[int]], cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams; whole documents go to validation, chosen by the seed."""
    n = len(docs_ids)
    n_val = int(round(n * cfg.val_fraction)) if n >= 2 else 0
    if n >= 2:
        n_val = max(1, n_val)
    if n_val:
        order = np.random.default_rng(cfg.seed).permutation(n)
        val_set = set(order[:n_val].tolist())
        train = [t for i, d in enumerate(docs_ids) for t in d if i not in val_set]
        val = [t for i, d in enumerate(docs_ids) for t in d if i in val_set]
    else:
        flat = [t for d in docs_ids for t in d]
        cut = int(len(flat) * (1 - cfg.val_fraction))
        train, val = flat[:cut], flat[cut:]
    if len(train) < cfg.seq_len + 1:
        raise LlmdeskError(f"the corpus is too small: {len(train)} training tokens, need more than "
                           f"--seq-len {cfg.seq_len} (add text or lower --seq-len)")
    if len(val) < 2:
        raise LlmdeskError("the corpus is too small to hold out a validation split (add text)")
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)


def batch_at(train: np.ndarray, step: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The batch of step `step`: a pure function of (seed, step), so resuming is exact."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(train) - cfg.seq_len, size=cfg.batch)
    x = np.stack([train[s: s + cfg.seq_len] for s in starts])
    y = np.stack([train[s + 1: s + cfg.seq_len + 1] for s in starts])
    return x, y


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# =============================================================================================
# the loop


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train(corpus: list[str | os.PathLike], out_dir: str | os.PathLike, cfg: TrainConfig, *,
          tokenizer: str | os.PathLike | None = None, resume: bool = False,
          chat_template: str | None = CHATML_TEMPLATE, export_type: str = "f16",
          on_event: Callable[[str, dict[str, Any]], None] | None = None) -> TrainResult:
    """Pretrain a Llama model on `corpus`; everything lands in `out_dir` (model.gguf, hf/, loss.png)."""
    require_train_extra("torch", "transformers", "tokenizers", "safetensors")
    import torch
    import torch.nn.functional as F
    import transformers

    emit = on_event or (lambda _kind, _data: None)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LlmdeskError(f"{out}: is a file; -o names the output folder")
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.exists():
        raise LlmdeskError(f"{out}: nothing to resume (no {CHECKPOINT}); run without --resume")
    state = None
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "tied_embeddings", "seq_len", "seed", "batch"):
            if getattr(saved, k) != getattr(cfg, k):
                raise LlmdeskError(f"{ckpt_path}: was trained with {k} {getattr(saved, k)}, not "
                                   f"{getattr(cfg, k)}; resume with the same settings")

    docs = read_corpus(list(corpus))
    hf_dir = out / "hf"
    out.mkdir(parents=True, exist_ok=True)

    # -- 2. the tokenizer ----------------------------------------------------------------------
    emit("status", {"text": "tokenizer"})
    if resume and (hf_dir / "tokenizer.json").exists():
        tok = load_tokenizer(hf_dir)
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_bpe(docs, cfg.vocab_size, pre=cfg.pre_tokenizer)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise LlmdeskError(f"the tokenizer has no {EOS} token; train a new one (--vocab-size) instead")
    save_hf_tokenizer(tok, hf_dir, chat_template=chat_template if tok.token_to_id("<|im_end|>") is not None else None)
    n_vocab = tok.get_vocab_size()
    docs_ids = [e.ids + [eos] for e in tok.encode_batch(docs)]
    train_ids, val_ids = split_tokens(docs_ids, cfg)
    emit("data", {"documents": len(docs), "train_tokens": len(train_ids), "val_tokens": len(val_ids),
                  "vocab": n_vocab})

    # -- the model -----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    im_end = tok.token_to_id("<|im_end|>")
    shape = cfg.model_shape(n_vocab)
    mcfg = transformers.LlamaConfig(
        vocab_size=shape.n_vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head, num_key_value_heads=shape.n_head_kv,
        max_position_embeddings=shape.n_ctx_train, rms_norm_eps=1e-5, rope_theta=cfg.rope_theta,
        tie_word_embeddings=shape.tied_embeddings, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        initializer_range=0.02, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(mcfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, history, seen, elapsed = 0, [], 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history, seen, elapsed = state["step"], state["history"], state["tokens_seen"], state["seconds"]
    emit("start", {"params": n_params, "start": start, "steps": cfg.steps, "device": device})

    # fixed validation windows: the first eval_batches * batch non-overlapping ones
    T_val = min(cfg.seq_len, len(val_ids) - 1)
    n_win = min(cfg.eval_batches * cfg.batch, (len(val_ids) - 1) // T_val)
    val_x = np.stack([val_ids[i * T_val: (i + 1) * T_val] for i in range(n_win)])
    val_y = np.stack([val_ids[i * T_val + 1: (i + 1) * T_val + 1] for i in range(n_win)])

    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, n_win, cfg.batch):
                x = torch.from_numpy(val_x[i: i + cfg.batch]).to(device)
                y = torch.from_numpy(val_y[i: i + cfg.batch]).to(device)
                logits = model(input_ids=x).logits
                total += F.cross_entropy(logits.reshape(-1, n_vocab).float(), y.reshape(-1), reduction="sum").item()
                count += y.numel()
        model.train()
        return total / count

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "history": history, "tokens_seen": seen, "seconds": elapsed,
                            "config": cfg.to_dict()}, ckpt_path)

    # -- 4. the loop ---------------------------------------------------------------------------
    model.train()
    t_last = time.perf_counter()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = (torch.from_numpy(a).to(device) for a in batch_at(train_ids, step, cfg))
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, n_vocab).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        elapsed += dt
        seen += x.numel()
        rec: dict[str, Any] = {"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                               "tokens_per_second": x.numel() / dt if dt > 0 else 0.0}
        done = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_interval == 0 or done:
            vl = evaluate()
            rec["val_loss"], rec["val_ppl"] = vl, math.exp(min(vl, 50.0))
            emit("eval", rec)
            t_last = time.perf_counter()  # evaluation time is not training speed
        history.append(rec)
        emit("step", rec)
        if (step + 1) % cfg.checkpoint_interval == 0 or done:
            save_checkpoint(step + 1)

    if not history or "val_loss" not in history[-1]:  # resumed a finished run: nothing ran
        if not any("val_loss" in h for h in history):
            vl = evaluate()
            history.append({"step": cfg.steps, "loss": float("nan"), "val_loss": vl, "val_ppl": math.exp(min(vl, 50))})

    # -- 6. outputs ----------------------------------------------------------------------------
    emit("status", {"text": "export"})
    model.generation_config.eos_token_id = [eos] + ([im_end] if im_end is not None else [])
    model.generation_config.bos_token_id = eos
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would cut into llmdesk's output
    model.save_pretrained(hf_dir)
    png = plot_loss(history, out / "loss.png", title=f"llmdesk train ({cfg.preset}, {n_params / 1e6:.2f}M params)")
    gguf_path = None
    if export_type:
        from llmdesk.formats.convert import convert
        from llmdesk.runtime.llama import LlamaModel

        gguf_path = convert(hf_dir, out / "model.gguf", out_type=export_type, check_with=LlamaModel).path
    last_eval = next((h for h in reversed(history) if "val_loss" in h), {})
    result = TrainResult(out_dir=out, steps=cfg.steps, tokens_seen=seen, n_params=n_params,
                         train_tokens=len(train_ids), val_tokens=len(val_ids),
                         final_loss=next((h["loss"] for h in reversed(history) if not math.isnan(h["loss"])), float("nan")),
                         val_loss=last_eval.get("val_loss"), val_ppl=last_eval.get("val_ppl"), seconds=elapsed,
                         gguf=gguf_path, hf_dir=hf_dir, loss_png=png, history=history)
    (out / "metrics.json").write_text(json.dumps({"result": result.to_dict(), "config": cfg.to_dict(),
                                                  "history": history}, indent=1) + "\n")
    return result


def plot_loss(history: list[dict[str, Any]], path: Path, title: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history if not math.isnan(h["loss"])]
    ax.plot(steps, [h["loss"] for h in history if not math.isnan(h["loss"])], lw=1, label="train loss")
    ev = [h for h in history if "val_loss" in h]
    if ev:
        ax.plot([h["step"] for h in ev], [h["val_loss"] for h in ev], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
