"""Fine-tuning a model on your own data: LoRA, QLoRA or all weights, then adapter, merged model, GGUF.

The whole story in one file:
  1. the base: an HF folder, a `llmdesk train` output folder (its hf/), a .gguf file or a store
     name (loaded by transformers from the GGUF, dequantized); its architecture is checked against
     what the converter and llama.cpp run before anything is loaded;
  2. the data (train/sft_data.py): rows validated, rendered with the base's own chat template,
     tokenized, with labels masking everything but the assistant turns and their terminators;
     a validation set (--val FILE, or whole rows held out by the seed);
  3. the model: transformers' AutoModelForCausalLM in 32 bits (CPU) or bf16 (CUDA); peft's LoRA on
     the target modules; QLoRA: the base in 4-bit NF4 with bitsandbytes (CUDA only);
  4. a plain loop (not TRL's SFTTrainer, see docs/tune.md): micro-batches grouped by length
     (little padding), the loss summed over trained tokens and divided by their count in the
     whole optimizer step (gradient accumulation weighs every token alike), AdamW, warm-up then
     cosine decay (train/loop.py's `lr_at`). The batches and the dropout of step s are a pure
     function of (seed, s), so `resume` replays exactly the losses of an uninterrupted run; the
     output head runs on the trained positions only. Under `accelerate launch` (WORLD_SIZE > 1)
     the same loop runs data parallel: each process trains its share of every micro-batch and
     the gradients are summed; with `fsdp` each process also holds only 1/P of the weights
     (train/dist.py); rank 0 alone writes;
  5. validation loss every `eval_every` steps, an atomic checkpoint (trainable weights, optimizer,
     history) at the same times, and on Ctrl-C after the step in flight finishes;
  6. outputs, each written under a temporary name and renamed: the adapter in PEFT format
     (DIR/adapter/), the merged HF model (DIR/merged/: the adapter merged into the base reloaded at
     full precision, never into 4-bit weights; with the base's tokenizer, chat template and
     generation config), a GGUF (`convert`, then the caller's quantizer for k-quants), registered
     in the store; loss.png, metrics.json, and a "tune" row in the results store.

torch, transformers and peft are imported when `tune` is called, never at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from llmdesk.atomic import atomic_path, write_text
from llmdesk.errors import LlmdeskError
from llmdesk.formats.hf import require_train_extra
from llmdesk.store.refs import looks_like_path
from llmdesk.train.dist import DataParallel, launch, process_rank  # noqa: F401  (the CLI's)
from llmdesk.train.loop import lr_at, plot_loss

CHECKPOINT = "checkpoint.pt"
METHODS = ("lora", "qlora", "full")
# the GGUF types the converter writes itself; others are quantized from f16 by the caller's quantizer
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# tokenizer files copied from an HF base into merged/ as they are (the converter reads them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
# the settings a checkpoint must share with the run that resumes it
SHAPING = ("method", "rank", "alpha", "dropout", "targets", "seq_len", "batch", "grad_accum", "seed",
           "train_on", "truncate", "steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "val_split")


@dataclass
class TuneConfig:
    # -- the method --
    method: str = "lora"  # lora | qlora | full
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all-linear"  # "all-linear" or "q_proj,v_proj,..."
    # -- the data --
    seq_len: int = 1024
    train_on: str = "assistant"  # assistant | all
    truncate: bool = False
    val_split: float = 0.1  # of the rows, when no validation file is given (0: none)
    # -- the optimisation --
    epochs: float | None = None  # None with steps None: 1 epoch
    steps: int = 0  # optimizer steps; 0: from epochs
    lr: float = 0.0  # 0: 2e-4 for (q)lora, 2e-5 for full
    batch: int = 4
    grad_accum: int = 1
    warmup: int = 0  # 0: 5% of the steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # -- bookkeeping --
    eval_every: int = 0  # 0: 10 evaluations over the run
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LlmdeskError(f"unknown --method {self.method!r} (choose lora, qlora or full)")
        if self.train_on not in ("assistant", "all"):
            raise LlmdeskError(f"unknown --train-on {self.train_on!r} (choose assistant or all)")
        for name in ("rank", "seq_len", "batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise LlmdeskError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise LlmdeskError(f"--steps must be at least 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise LlmdeskError(f"--epochs must be more than 0, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise LlmdeskError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.val_split < 1:
            raise LlmdeskError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.alpha <= 0:
            raise LlmdeskError(f"--alpha must be more than 0, got {self.alpha}")
        if self.lr == 0:
            self.lr = 2e-5 if self.method == "full" else 2e-4
        if not 0 < self.lr < 1:
            raise LlmdeskError(f"--lr must be between 0 and 1, got {self.lr}")
        if self.eval_every < 0:
            raise LlmdeskError(f"--eval-every must be at least 1, got {self.eval_every}")

    def target_modules(self) -> str | list[str]:
        if self.targets.strip() == "all-linear":
            return "all-linear"
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:
            raise LlmdeskError("--targets names no modules (give q_proj,v_proj,... or all-linear)")
        return names

    def recipe(self) -> dict[str, Any]:
        """What a user needs to redo this run (the metadata of the result)."""
        keys = ["method", "seq_len", "train_on", "truncate", "epochs", "steps", "lr", "batch", "grad_accum",
                "warmup", "seed"]
        if self.method != "full":
            keys[1:1] = ["rank", "alpha", "dropout", "targets"]
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TuneResult:
    out_dir: Path
    base: str
    method: str
    steps: int
    trainable_params: int
    total_params: int
    train_examples: int
    val_examples: int
    trained_tokens: int  # tokens whose loss was trained, over the whole run
    tokens_seen: int  # non-padding tokens through the model, over the whole run
    tokens_per_second: float  # non-padding tokens per second of training
    first_val_loss: float | None
    val_loss: float | None
    final_loss: float
    seconds: float
    peak_rss_bytes: int  # the process's peak resident memory so far (the training's, for fit --train)
    adapter: Path | None
    merged: Path | None
    gguf: Path | None
    registered: str | None
    loss_png: Path
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    lora_gguf: Path | None = None  # the adapter as a llama.cpp LoRA GGUF (lora_gguf=True)
    processes: int = 1  # how many trained it (WORLD_SIZE)
    fsdp: bool = False  # whether the model was sharded over them
    param_bytes: int = 0  # the parameters rank 0 held: all of them, or its 1/P shard with fsdp
    peak_rss_per_process: list[int] = field(default_factory=list)  # each process's peak through training

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "history"}


# =============================================================================================
# 1. the base


@dataclass
class Base:
    """A base model as transformers loads it: `folder` (+ `gguf_file` in it, for a GGUF)."""

    ref: str  # what the user typed
    name: str  # for display and store names
    folder: Path
    gguf_file: str | None
    architecture: str  # llama.cpp's name: llama, qwen2, ...

    @property
    def identity(self) -> str:
        """The base as a checkpoint and the results store name it: an absolute path (or NAME:TAG)."""
        if self.gguf_file is None:
            return str(self.folder.resolve())
        return self.ref if not looks_like_path(self.ref) else str((self.folder / self.gguf_file).resolve())

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def find_base(ref: str | os.PathLike) -> Base:
    """What BASE names, checked (exists, an architecture llama.cpp runs) without loading weights."""
    from llmdesk.formats.convert import ARCHITECTURES

    text = str(ref)
    p = Path(text).expanduser()
    if p.is_dir():
        folder = p / "hf" if not (p / "config.json").is_file() and (p / "hf" / "config.json").is_file() else p
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise LlmdeskError(f"{p}: not a model folder (no config.json, nor hf/config.json from 'llmdesk train')")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LlmdeskError(f"{cfg_path}: cannot read it ({e})") from None
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise LlmdeskError(f"{folder}: architecture {arch!r} cannot be converted for llama.cpp "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        name = p.resolve().name if folder != p else folder.resolve().name
        return Base(text, _store_safe(name), folder, None, ARCHITECTURES[arch])
    from llmdesk.formats.gguf import read_gguf
    from llmdesk.store import refs

    r = refs.resolve(text)  # ModelNotFound: one line
    info = read_gguf(r.path)
    arch = info.architecture or "?"
    supported = sorted(set(ARCHITECTURES.values()) & _transformers_gguf_archs())
    if arch not in supported:
        raise LlmdeskError(f"{r.name}: a {arch!r} GGUF cannot be fine-tuned here (transformers reads "
                           f"{', '.join(supported)} GGUFs); give its Hugging Face folder instead")
    name = r.entry.name if r.entry is not None else Path(r.path).name.rsplit(".", 1)[0]
    return Base(text, _store_safe(name), Path(r.path).parent, Path(r.path).name, arch)


def _transformers_gguf_archs() -> set[str]:
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # pragma: no cover (older transformers)
        return {"llama", "qwen2", "mistral", "phi3", "gemma", "gemma2"}
    return set(GGUF_CONFIG_MAPPING)


def _store_safe(name: str) -> str:
    from llmdesk.store import catalog

    return catalog.names_from_filename(name + ".gguf")[0]


def check_qlora() -> None:
    """QLoRA needs bitsandbytes and a CUDA device; say so in one line before loading anything."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LlmdeskError("--method qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                           "use --method lora here")
    import torch

    if not torch.cuda.is_available():
        raise LlmdeskError("--method qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU "
                           "(none here); use --method lora")


def load_tokenizer(base: Base):
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(base.folder), **base.load_kwargs())
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
        raise LlmdeskError(f"{base.ref}: cannot load its tokenizer ({_first_line(e)})") from None
    return tok


def _load_model(base: Base, *, four_bit: bool = False, dtype=None):
    import torch
    import transformers

    kwargs: dict[str, Any] = dict(base.load_kwargs())
    if four_bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base.folder), dtype=dtype or torch.float32,
                                                                  **kwargs)
    except Exception as e:  # noqa: BLE001
        raise LlmdeskError(f"{base.ref}: cannot load it with transformers ({_first_line(e)})") from None
    if base.gguf_file:
        # transformers dequantized the GGUF into plain tensors but still marks the model as "quantized
        # with gguf", which it refuses to save; the weights are ordinary ones now
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    return model


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") would cut into llmdesk's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # its GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"), which
    # the switch above does not reach: hand it a bar that draws nothing while llmdesk loads
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda *a, **kw: bar(*a, **{**kw, "disable": True})
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar is not None:
            gguf_utils.tqdm = bar


# =============================================================================================
# 2. the data


@dataclass
class Data:
    train: list  # sft_data.Example
    val: list
    report: Any  # sft_data.DatasetReport of the training rows
    fingerprint: str  # sha256 of the training and validation token ids and labels


def prepare_data(data: list[str | os.PathLike], tokenizer, cfg: TuneConfig, *,
                 val: str | os.PathLike | None = None, chat_template: str | None = None) -> Data:
    from llmdesk.train import sft_data

    rows = sft_data.read_rows([Path(p) for p in data])
    if val is not None:
        val_rows = sft_data.read_rows([Path(val)])
    elif cfg.val_split > 0 and len(rows) >= 2:
        n_val = max(1, int(round(len(rows) * cfg.val_split)))
        order = np.random.default_rng(cfg.seed).permutation(len(rows))
        held = set(order[:n_val].tolist())
        val_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    else:
        val_rows = []
    kw = dict(seq_len=cfg.seq_len, train_on=cfg.train_on, truncate=cfg.truncate, chat_template=chat_template)
    report = sft_data.build_dataset(rows, tokenizer, **kw)
    train = [e for e in report.examples if e.trained]
    if not train:
        raise LlmdeskError("no row has a token to train (no assistant turns?); see them with --inspect")
    val_ex = []
    if val_rows:
        val_ex = [e for e in sft_data.build_dataset(val_rows, tokenizer, **kw).examples
                  if e.trained]
    h = hashlib.sha256()
    for part in (train, val_ex):
        for e in part:
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
            h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return Data(train, val_ex, report, h.hexdigest())


# =============================================================================================
# 4. the batches: a pure function of (seed, step)


class Batches:
    """Micro-batches of example indices, grouped by length, epoch after epoch.

    Each epoch is a permutation of the examples seeded by (seed, epoch); consecutive windows of
    `GROUP` micro-batches' worth of examples are sorted by length and cut into micro-batches
    (little padding), and the epoch's micro-batches are shuffled. Step s takes the micro-batches
    s*grad_accum ... (s+1)*grad_accum - 1 of the endless stream. With P processes a micro-batch
    holds batch*P examples, and each process trains its share (`DataParallel.share`)."""

    GROUP = 16

    def __init__(self, lengths: list[int], cfg: TuneConfig, processes: int = 1):
        self.lengths = np.asarray(lengths)
        self.cfg = cfg
        self.batch = cfg.batch * processes
        self.per_epoch = math.ceil(len(lengths) / self.batch)
        self._cache: dict[int, list[np.ndarray]] = {}

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._cache:
            rng = np.random.default_rng([self.cfg.seed, e])
            order = rng.permutation(len(self.lengths))
            window = self.GROUP * self.batch
            mbs: list[np.ndarray] = []
            for i in range(0, len(order), window):
                w = order[i: i + window]
                w = w[np.argsort(-self.lengths[w], kind="stable")]
                mbs += [w[j: j + self.batch] for j in range(0, len(w), self.batch)]
            self._cache = {e: [mbs[k] for k in rng.permutation(len(mbs))]}
        return self._cache[e]

    def step(self, s: int) -> list[np.ndarray]:
        out = []
        for k in range(s * self.cfg.grad_accum, (s + 1) * self.cfg.grad_accum):
            e, i = divmod(k, self.per_epoch)
            out.append(self.epoch(e)[i])
        return out


def total_steps(n_examples: int, cfg: TuneConfig, processes: int = 1) -> int:
    if cfg.steps:
        return cfg.steps
    per_epoch = math.ceil(n_examples / (cfg.batch * processes))
    return max(1, math.ceil((cfg.epochs or 1.0) * per_epoch / cfg.grad_accum))


def collate(examples: list, pad_id: int):
    """(input_ids, attention_mask, labels) tensors, padded on the right; labels are the next tokens
    (shifted here, -100 where not trained and on padding)."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, : n - 1] = torch.tensor(e.labels[1:n])  # position t predicts token t+1
    return ids, mask, labels


# =============================================================================================
# the run


class _Interrupt:
    """Ctrl-C during training is taken when the step in flight ends (the weights are then whole and
    a checkpoint can be written); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.hard = False  # the second Ctrl-C: the weights may be half-way through a step
        self._old = None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            if self._old is signal.SIG_IGN:  # started in the background by a shell: leave it so
                self._old = None
                return self

            def handler(signum, frame):
                if self.requested:
                    self.hard = True
                    raise KeyboardInterrupt
                self.requested = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def tune(base_ref: str | os.PathLike, data: list[str | os.PathLike], out_dir: str | os.PathLike,
         cfg: TuneConfig | None = None, *, val: str | os.PathLike | None = None, resume: bool = False,
         merge: bool = False, gguf: str | None = None, lora_gguf: bool = False, name: str | None = None,
         chat_template: str | None = None, fsdp: bool = False,
         quantize_with: Callable[..., Any] | None = None, check_with: Callable[[Path], Any] | None = None,
         on_event: Callable[[str, dict[str, Any]], None] | None = None) -> TuneResult:
    """Fine-tune `base_ref` on `data`; everything lands in `out_dir` (see the module docstring).

    `lora_gguf` also writes the adapter as a llama.cpp LoRA GGUF (DIR/adapter.gguf: run it with
    `--lora` beside the base's GGUF). `gguf` (a type: f16, q8_0, q4_k_m, ...) converts the merged
    model and registers it in the store
    as NAME:TYPE (NAME: `name`, else the output folder's name); types the converter does not write
    are quantized from f16 with `quantize_with(f16_path, type, out=..., name=...)` (pass
    `llmdesk.quantize.workflow.quantize_model`). `check_with` opens a GGUF with llama.cpp's tokenizer
    for the converter's self-check (pass `llmdesk.runtime.llama.LlamaModel`). `chat_template` (a
    built-in name or a .jinja file) renders the data instead of the base's own template, and is
    written into the adapter's and the merged model's tokenizer config (so the GGUF carries it).
    `fsdp`, in a run of several processes, shards the model over them (train/dist.py)."""
    cfg = cfg or TuneConfig()
    if cfg.epochs is not None and cfg.steps:
        raise LlmdeskError("give --epochs or --steps, not both")
    dp = DataParallel(fsdp)  # alone: does nothing
    if dp.fsdp and cfg.method == "qlora":
        raise LlmdeskError("--fsdp does not shard QLoRA's 4-bit base here; use --method lora with --fsdp (or qlora "
                           "without it)")
    emit = on_event if on_event is not None and dp.rank == 0 else (lambda _kind, _data: None)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LlmdeskError(f"{out}: is a file; -o names the output folder")
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise LlmdeskError(f"{out}: nothing to resume (no {CHECKPOINT}); run without --resume")
    if not resume and ckpt_path.is_file():
        raise LlmdeskError(f"{out}: holds the checkpoint of a run already started there; pass --resume to "
                           "continue it (or finish it again), or choose another -o")
    if lora_gguf and cfg.method == "full":
        raise LlmdeskError("--lora-gguf writes a LoRA adapter; --method full trains every weight and has none "
                           "(use --gguf TYPE for the whole model)")
    want_merge = merge or gguf is not None
    reg_name = reg_tag = None
    if gguf is not None:
        from llmdesk.store import catalog

        gguf = gguf.lower()
        if gguf not in CONVERTER_TYPES and quantize_with is None:
            raise LlmdeskError(f"--gguf {gguf}: pass a quantizer (quantize_with) for types other than "
                               f"{', '.join(CONVERTER_TYPES)}")
        reg_name = name or _store_safe(out.resolve().name)
        reg_tag = gguf
        catalog.check_name(reg_name, reg_tag)
    template_source = None
    if chat_template:
        from llmdesk.runtime.templates import resolve_template

        template_source = resolve_template(None, chat_template).source  # unknown: one line now
    base = find_base(base_ref)  # missing, unsupported: one line before any work
    require_train_extra("torch", "transformers", "peft")
    if cfg.method == "qlora":
        check_qlora()
    import torch

    dp.start()
    try:
        return _tune(base, data, out, cfg, dp, emit, val=val, resume=resume, want_merge=want_merge, gguf=gguf,
                     lora_gguf=lora_gguf, reg_name=reg_name, reg_tag=reg_tag, chat_template=chat_template,
                     template_source=template_source, quantize_with=quantize_with, check_with=check_with)
    finally:
        dp.close()


def _tune(base: Base, data: list, out: Path, cfg: TuneConfig, dp: DataParallel, emit: Callable, *, val, resume: bool,
          want_merge: bool, gguf: str | None, lora_gguf: bool, reg_name: str | None, reg_tag: str | None,
          chat_template: str | None, template_source: str | None, quantize_with, check_with) -> TuneResult:
    import torch

    ckpt_path = out / CHECKPOINT
    with _quiet_hf():
        emit("status", {"text": "tokenizer"})
        tok = load_tokenizer(base)
        d = prepare_data(data, tok, cfg, val=val, chat_template=chat_template)
        steps = total_steps(len(d.train), cfg, dp.world)
        cfg = replace(cfg, steps=steps, epochs=cfg.epochs if cfg.epochs is not None or cfg.steps else 1.0)
        cfg.warmup = cfg.warmup or max(1, steps // 20)
        cfg.eval_every = cfg.eval_every or max(1, steps // 10)
        emit("data", {"train_examples": len(d.train), "val_examples": len(d.val),
                      "too_long": len(d.report.too_long), "notices": list(d.report.notices),
                      "trained_tokens": d.report.trained_tokens, "total_tokens": d.report.total_tokens, "steps": steps})

        state = None
        if resume:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            saved = state["config"]
            for k in SHAPING:
                if saved.get(k) != getattr(cfg, k):
                    raise LlmdeskError(f"{ckpt_path}: was trained with {k} {saved.get(k)!r}, not "
                                       f"{getattr(cfg, k)!r}; resume with the same settings")
            if state["data"] != d.fingerprint:
                raise LlmdeskError(f"{ckpt_path}: was trained on other data; resume with the same files")
            if state["base"] != base.identity:
                raise LlmdeskError(f"{ckpt_path}: was trained on base {state['base']}, not {base.identity}")
            if state.get("processes", 1) != dp.world:
                raise LlmdeskError(f"{ckpt_path}: was trained by {state.get('processes', 1)} processes, not "
                                   f"{dp.world}; resume with as many (each one's --batch is its share of a "
                                   f"micro-batch)")
            state = dp.own_shard(ckpt_path, state)  # sharded: this process's part

        emit("status", {"text": "loading the base"})
        model, device = _make_model(base, cfg, move=not dp.fsdp)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
        token_loss = _token_loss(core)
        dp.shard(core, token_loss)  # --fsdp: each process keeps 1/P of the weights from here
        dp.barrier()  # every process has checked the output folder before rank 0 writes into it
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in model.parameters())
        param_bytes = dp.param_bytes(model)
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        start, history, seen, trained, elapsed = 0, [], 0, 0, 0.0
        if state is not None:
            dp.load_trained_state(model, opt, trainable, state["weights"], state["optimizer"])
            start, history, seen = state["step"], state["history"], state["tokens_seen"]
            trained, elapsed = state["trained_tokens"], state["seconds"]
        ctx = getattr(model.config, "max_position_embeddings", None)
        longest = max(len(e.input_ids) for e in d.train + d.val)
        if ctx and longest > ctx:
            emit("notice", {"text": f"the longest example ({longest} tokens) is longer than {base.name}'s "
                                    f"context ({ctx}): positions past it were never trained in the base"})
        out.mkdir(parents=True, exist_ok=True)
        emit("start", {"trainable": n_trainable, "total": n_total, "start": start, "steps": steps,
                       "device": device, "method": cfg.method})

        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        batches = Batches([len(e.input_ids) for e in d.train], cfg, dp.world)

        def loss_sum(exs: list) -> tuple[Any, int, int]:
            """The summed cross-entropy of the trained tokens, their count, the tokens seen."""
            ids, mask, labels = (t.to(device) for t in collate(exs, pad_id))
            return token_loss(ids, mask, labels), int((labels != -100).sum()), int(mask.sum())

        def evaluate() -> float | None:
            if not d.val:
                return None
            model.eval()
            total, count = 0.0, 0
            order = sorted(range(len(d.val)), key=lambda i: len(d.val[i].input_ids))
            mbs = [order[i: i + cfg.batch] for i in range(0, len(order), cfg.batch)]
            with torch.no_grad():
                rounds = -(-len(mbs) // dp.world)
                for k in range(dp.rank, rounds * dp.world, dp.world):  # each takes every P-th micro-batch
                    if k < len(mbs):
                        s, n, _ = loss_sum([d.val[j] for j in mbs[k]])
                        total += s.item()
                        count += n
                    elif dp.fsdp:  # sharded, every process runs every forward pass (they gather together)
                        loss_sum([d.val[mbs[0][0]]])
            total, count = dp.sum([total, count])
            model.train()
            return total / max(1, count)

        last_saved = start if state is not None else None

        def save_checkpoint(step: int) -> None:
            nonlocal last_saved
            last_saved = step
            # the trainable weights and the optimizer state; sharded, each process writes its own
            # shard (gathering them on one would cost it the memory sharding saves), beside rank
            # 0's checkpoint, which it writes last, once every shard is in place
            weights, optimizer = dp.trained_state(model, opt)
            if dp.fsdp and dp.rank != 0:
                with atomic_path(dp.shard_path(ckpt_path, step)) as tmp:
                    torch.save({"weights": weights, "optimizer": optimizer, "step": step}, tmp)
            if dp.fsdp:
                dp.barrier()
            if dp.rank != 0:
                return
            with atomic_path(ckpt_path) as tmp:
                torch.save({"weights": weights, "optimizer": optimizer, "step": step,
                            "history": history, "tokens_seen": seen, "trained_tokens": trained,
                            "seconds": elapsed, "config": cfg.to_dict(), "data": d.fingerprint,
                            "base": base.identity, "processes": dp.world, "fsdp": dp.fsdp}, tmp)
            dp.drop_old_shards(ckpt_path, step)

        # -- 4. the loop -----------------------------------------------------------------------
        if start == 0 and d.val and not history:
            v0 = evaluate()
            history.append({"step": 0, "loss": float("nan"), "val_loss": v0})
            emit("eval", history[-1])
            save_checkpoint(0)
        model.train()
        done = start
        with _Interrupt() as interrupt:
            try:
                t_last = time.perf_counter()
                for step in range(start, steps):
                    lr = lr_at(step, cfg)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    torch.manual_seed(cfg.seed * 1_000_003 + step)  # this step's dropout, resumed or not
                    mbs = [[d.train[i] for i in mb] for mb in batches.step(step)]
                    n_step = sum(sum(1 for t in e.labels[1:] if t != -100) for mb in mbs for e in mb)
                    opt.zero_grad(set_to_none=True)
                    total, toks = 0.0, 0
                    for mb in mbs:
                        mine = dp.share(mb)
                        if not mine:  # the epoch's last micro-batch, smaller than the processes
                            if dp.fsdp:  # sharded, all run every pass: this one adds nothing
                                (loss_sum(mb[:1])[0] * 0.0).backward()
                            continue
                        s, _n, n_tok = loss_sum(mine)
                        (s / max(1, n_step)).backward()
                        total += s.item()
                        toks += n_tok
                    dp.sum_grads(trainable)
                    stop = None
                    if dp.world > 1:  # the step's loss and tokens, and whether any process was interrupted
                        total, toks, n_stop = dp.sum([total, toks, float(interrupt.requested)])
                        toks, stop = int(toks), n_stop > 0  # all stop after the same step
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    opt.step()
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    elapsed += dt
                    seen += toks
                    trained += n_step
                    rec: dict[str, Any] = {"step": step + 1, "loss": total / max(1, n_step), "lr": lr,
                                           "tokens": toks, "tokens_per_second": toks / dt if dt > 0 else 0.0}
                    last = step + 1 == steps
                    evaluating = (step + 1) % cfg.eval_every == 0 or last
                    vl = evaluate() if evaluating else None
                    if vl is not None:
                        rec["val_loss"] = vl
                    history.append(rec)
                    done = step + 1  # the weights are step `done`'s from here: an interrupt saves them as such
                    if evaluating:
                        save_checkpoint(done)
                    if vl is not None:
                        emit("eval", rec)
                    t_last = time.perf_counter()  # evaluation and checkpoints are not training speed
                    emit("step", {**rec, "run_tokens_per_second": seen / elapsed if elapsed > 0 else 0.0})
                    if interrupt.requested if stop is None else stop:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if done > start and not interrupt.hard:
                    save_checkpoint(done)
                emit("interrupted", {"step": last_saved,
                                     "checkpoint": str(ckpt_path) if last_saved is not None else None})
                raise

        # the trained weights in full (gathered when sharded, by every process), for rank 0 to save
        full = None
        if dp.fsdp:
            full = {}
            for k, v in model.state_dict().items():
                if cfg.method == "full" or "lora_" in k:
                    t = dp.gather(v)  # every process takes part; one tensor at a time in memory but rank 0's
                    if dp.rank == 0:
                        full[k] = t
        peaks = [int(x) for x in dp.sum([_peak_rss() if r == dp.rank else 0 for r in range(dp.world)])]
        if dp.rank != 0:  # rank 0 writes the outputs
            losses = [h["loss"] for h in history if not math.isnan(h["loss"])]
            return TuneResult(
                out_dir=out, base=base.identity, method=cfg.method, steps=steps, trainable_params=n_trainable,
                total_params=n_total, train_examples=len(d.train), val_examples=len(d.val), trained_tokens=trained,
                tokens_seen=seen, tokens_per_second=seen / elapsed if elapsed > 0 else 0.0,
                first_val_loss=None, val_loss=None, final_loss=losses[-1] if losses else float("nan"),
                seconds=elapsed, peak_rss_bytes=_peak_rss(), adapter=None, merged=None, gguf=None,
                registered=None, loss_png=out / "loss.png", history=history, processes=dp.world, fsdp=dp.fsdp,
                param_bytes=param_bytes, peak_rss_per_process=peaks)

        # -- 6. outputs ------------------------------------------------------------------------
        emit("status", {"text": "saving"})
        adapter_dir = merged_dir = gguf_path = lora_path = None
        if cfg.method == "full":
            merged_dir = out / "merged"
            with _atomic_dir(merged_dir) as tmp:
                model.save_pretrained(tmp, state_dict=full)
                _copy_tokenizer(base, tok, tmp, template_source)
        else:
            adapter_dir = out / "adapter"
            with _atomic_dir(adapter_dir) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # peft finds no config.json beside a GGUF base
                model.save_pretrained(tmp, state_dict=full)
                _copy_tokenizer(base, tok, tmp, template_source)
                cfg_file = tmp / "adapter_config.json"
                ac = json.loads(cfg_file.read_text())
                ac["base_model_name_or_path"] = str(base.folder / base.gguf_file if base.gguf_file else base.folder)
                cfg_file.write_text(json.dumps(ac, indent=2) + "\n")
            if lora_gguf:
                from ..formats.lora_gguf import write_lora_gguf

                emit("status", {"text": "writing the adapter as a llama.cpp LoRA GGUF"})
                lora_path = write_lora_gguf(adapter_dir, base.folder / base.gguf_file if base.gguf_file else base.folder,
                                            out / "adapter.gguf")
            if want_merge:
                emit("status", {"text": "merging"})
                del model, opt, full
                merged_dir = out / "merged"
                _merge(base, adapter_dir, merged_dir, tok, template_source)
        if gguf is not None:
            emit("status", {"text": f"converting to GGUF ({gguf})"})
            gguf_path = _export_gguf(merged_dir, out, gguf, reg_name, reg_tag, quantize_with, check_with,
                                     source=f"tune:{out.resolve()}")

    history_evals = [h for h in history if "val_loss" in h]
    with atomic_path(out / "loss.png", suffix=".png") as tmp:
        plot_loss(history, tmp, title=f"llmdesk tune {base.name} ({cfg.method}, {n_trainable / 1e6:.3g}M trained)")
    losses = [h["loss"] for h in history if not math.isnan(h["loss"])]
    result = TuneResult(
        out_dir=out, base=base.identity, method=cfg.method, steps=steps, trainable_params=n_trainable,
        total_params=n_total, train_examples=len(d.train), val_examples=len(d.val), trained_tokens=trained,
        tokens_seen=seen, tokens_per_second=seen / elapsed if elapsed > 0 else 0.0,
        first_val_loss=history_evals[0]["val_loss"] if history_evals else None,
        val_loss=history_evals[-1]["val_loss"] if history_evals else None,
        final_loss=losses[-1] if losses else float("nan"), seconds=elapsed, peak_rss_bytes=_peak_rss(),
        adapter=adapter_dir,
        merged=merged_dir, gguf=gguf_path, registered=f"{reg_name}:{reg_tag}" if gguf_path else None,
        loss_png=out / "loss.png", history=history, lora_gguf=lora_path, processes=dp.world, fsdp=dp.fsdp,
        param_bytes=param_bytes, peak_rss_per_process=peaks)
    write_text(out / "metrics.json", json.dumps({"result": result.to_dict(), "recipe": cfg.recipe(),
                                                "config": cfg.to_dict(), "history": history}, indent=1) + "\n")
    _record(result, cfg, d, chat_template)
    return result


def _token_loss(core):
    """The module the loop calls: (input ids, attention mask, labels) -> the summed cross-entropy
    of the trained tokens. The output head (hidden x vocabulary, the largest matrix of a small
    model) runs on the trained positions only, not on padding, nor on the prompts when only the
    answers train. One module over the decoder and the head, so that sharded (FSDP) it is the root
    that gathers the embeddings, the final norm and the head."""
    import torch

    class TokenLoss(torch.nn.Module):
        def __init__(self, decoder, head, softcap):
            super().__init__()
            self.decoder, self.head, self.softcap = decoder, head, softcap

        def forward(self, ids, mask, labels):
            hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, hidden)
            trained = labels != -100
            logits = self.head(hidden[trained]).float()  # (trained tokens, vocab)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return torch.nn.functional.cross_entropy(logits, labels[trained], reduction="sum")

    softcap = getattr(core.config, "final_logit_softcapping", None)  # Gemma 2
    return TokenLoss(core.get_decoder(), core.get_output_embeddings(), softcap)


def _make_model(base: Base, cfg: TuneConfig, move: bool = True):
    """The model to train, on the GPU when there is one (`move=False`: left on the CPU, for FSDP,
    which moves each unit to the GPU as it shards it, so a GPU never holds the whole model)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() and cfg.method != "full" else torch.float32
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start from the seed
    model = _load_model(base, four_bit=cfg.method == "qlora", dtype=dtype)
    if cfg.method == "full":
        if move:
            model.to(device)
        model.config.use_cache = False
        return model, device
    import peft

    if cfg.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model)
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=cfg.target_modules(), task_type="CAUSAL_LM", bias="none")
    try:
        with warnings.catch_warnings():  # transformers' deprecation notices about peft's calls
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, lora)
    except ValueError:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LlmdeskError(f"--targets {cfg.targets}: not all are modules of {base.name} (its linear modules: "
                           f"{', '.join(linear)}; or all-linear)") from None
    if cfg.method != "qlora" and move:
        model.to(device)
    model.config.use_cache = False
    return model, device


def _merge(base: Base, adapter_dir: Path, merged_dir: Path, tok, template_source: str | None) -> None:
    """The adapter merged into the base reloaded at full precision (32 bits; never 4-bit weights)."""
    import peft
    import torch

    with _quiet_hf():  # also where the merge runs in the launching process of --processes N
        model = _load_model(base, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        with _atomic_dir(merged_dir) as tmp:
            model.save_pretrained(tmp)
            _copy_tokenizer(base, tok, tmp, template_source)


def _copy_tokenizer(base: Base, tok, dest: Path, template_source: str | None = None) -> None:
    """The base's tokenizer, chat template and generation config, byte for byte from an HF folder
    (the converter reads them back: BOS/EOS settings, pre-tokenizer, template); from a GGUF, as
    transformers rebuilt them. A template the run was given (--chat-template) replaces the base's."""
    if base.gguf_file is None:
        for f in TOKENIZER_FILES:
            if (base.folder / f).is_file():
                shutil.copy2(base.folder / f, dest / f)
    else:
        tok.save_pretrained(str(dest))
    if template_source is not None:
        (dest / "chat_template.jinja").unlink(missing_ok=True)
        cfg_file = dest / "tokenizer_config.json"
        tc = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        tc["chat_template"] = template_source
        cfg_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """A folder written under `.NAME.PID.part` and renamed onto `dest` (replacing an older one)."""
    from llmdesk.atomic import part_path

    tmp = part_path(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_gguf(merged: Path, out: Path, type_: str, reg_name: str, reg_tag: str,
                 quantize_with: Callable[..., Any] | None, check_with: Callable[[Path], Any] | None,
                 source: str) -> Path:
    from llmdesk.formats.convert import convert
    from llmdesk.store import catalog

    if type_ in CONVERTER_TYPES:
        path = convert(merged, out / f"model-{type_}.gguf", out_type=type_, name=reg_name,
                       check_with=check_with).path
        catalog.add_file(path, reg_name, reg_tag, source=source, progress=False)
        return path
    f16 = convert(merged, out / "model-f16.gguf", out_type="f16", name=reg_name, check_with=check_with).path
    assert quantize_with is not None
    try:
        r = quantize_with(f16, type_, out=out / f"model-{type_}.gguf", name=f"{reg_name}:{reg_tag}")
    finally:
        f16.unlink(missing_ok=True)  # a step on the way (merged/ converts again if it is wanted)
    return Path(r.path)


def _record(result: TuneResult, cfg: TuneConfig, d: Data, chat_template: str | None) -> None:
    """A "tune" row in the results store: the recipe in settings (the catalog has no metadata
    column for it), losses and speed in metrics, the GGUF's sha256 when one was made."""
    from llmdesk.store import catalog, results

    sha = catalog.sha256_file(result.gguf, progress=False) if result.gguf else None
    results.record(
        "tune", model=result.registered or str(result.out_dir), model_sha256=sha, data_sha256=d.fingerprint,
        settings={"base": result.base, **cfg.recipe(), "chat_template": chat_template, "out_dir": str(result.out_dir)},
        metrics={k: v for k, v in result.to_dict().items()
                 if k in ("steps", "trainable_params", "total_params", "train_examples", "val_examples",
                          "trained_tokens", "tokens_seen", "tokens_per_second", "first_val_loss", "val_loss",
                          "final_loss", "seconds", "peak_rss_bytes", "processes", "param_bytes")})


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes: Linux's VmHWM (ru_maxrss would carry the
    parent's peak over a fork and exec: a tune started by a process holding torch reported that),
    else ru_maxrss (macOS reports bytes)."""
    import sys

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
