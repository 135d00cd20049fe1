"""Training configuration: one flat dataclass, presets as plain data. No torch here.

Presets name a model size by its approximate parameter count (embeddings included). The shapes
follow the Llama recipe at small scale: SwiGLU FFN of about 8/3 * n_embd rounded to a multiple of
16, grouped-query attention with half as many KV heads, tied embeddings (at these sizes the
embedding table is a large share of all weights; tying is what SmolLM and MobileLLM do).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmdesk.errors import LlmdeskError
from llmdesk.formats.shape import ModelShape, n_params


@dataclass
class TrainConfig:
    # -- the model (LlamaForCausalLM): its sizes, as `model_shape()` describes them --
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 352
    vocab_size: int = 2048  # for a new tokenizer; a reused one brings its own
    tied_embeddings: bool = True
    rope_theta: float = 10000.0
    # -- the data --
    seq_len: int = 256
    val_fraction: float = 0.05  # of the documents (or of the tokens, for a single document)
    pre_tokenizer: str = "llama-bpe"
    # -- the optimisation (AdamW, linear warm-up then cosine decay to min_lr) --
    batch: int = 16
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 0  # 0: 5% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # -- bookkeeping --
    eval_interval: int = 0  # 0: 10 evaluations over the run
    eval_batches: int = 8
    checkpoint_interval: int = 0  # 0: at every evaluation
    seed: int = 0
    preset: str = "1m"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "seq_len", "batch", "steps"):
            if getattr(self, name) < 1:
                raise LlmdeskError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise LlmdeskError(f"n_embd {self.n_embd} must divide by n_head {self.n_head}, "
                               f"and n_head by n_head_kv {self.n_head_kv}")
        if not 0 < self.lr < 1:
            raise LlmdeskError(f"--lr must be between 0 and 1, got {self.lr}")
        if self.warmup <= 0:
            self.warmup = max(1, self.steps // 20)
        if self.eval_interval <= 0:
            self.eval_interval = max(1, self.steps // 10)
        if self.checkpoint_interval <= 0:
            self.checkpoint_interval = self.eval_interval

    def model_shape(self, vocab: int | None = None) -> ModelShape:
        """The Llama model this config trains, with `vocab` tokens (default: vocab_size); its
        context is the training sequence length."""
        return ModelShape(name=f"llmdesk-train-{self.preset}", arch="llama", n_layer=self.n_layer,
                          n_embd=self.n_embd, n_head=self.n_head, n_head_kv=self.n_head_kv, n_ff=self.n_ff,
                          n_vocab=vocab or self.vocab_size, n_ctx_train=self.seq_len,
                          tied_embeddings=self.tied_embeddings, source="llmdesk train")

    def n_params(self, vocab: int | None = None) -> int:
        """Parameters of the model this config describes (embeddings counted once when tied)."""
        return n_params(self.model_shape(vocab))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# name -> model shape and the training settings that suit it. Parameter counts are for the
# preset's own vocabulary size, tied embeddings.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests and smoke runs: trains a few steps in seconds (~40K parameters)
    "tiny": dict(n_embd=32, n_layer=2, n_head=4, n_head_kv=2, n_ff=64, vocab_size=320, seq_len=64,
                 batch=4, steps=20, lr=3e-3),
    # ~1M: 4 x 128, a TinyStories-scale model (Eldan & Li 2023 train 1M-33M models)
    "1m": dict(n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=352, vocab_size=2048, seq_len=256,
               batch=16, steps=2000, lr=3e-3),
    # ~5M: 6 x 256
    "5m": dict(n_embd=256, n_layer=6, n_head=8, n_head_kv=4, n_ff=688, vocab_size=4096, seq_len=256,
               batch=16, steps=4000, lr=2e-3),
    # ~25M: 8 x 512
    "25m": dict(n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1376, vocab_size=8192, seq_len=512,
                batch=16, steps=10000, lr=1e-3),
    # ~90M: 12 x 768, GPT-2-small-like depth and width (a GPU job)
    "100m": dict(n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=2048, vocab_size=16384, seq_len=1024,
                 batch=32, steps=20000, lr=6e-4),
}


def make_config(preset: str = "1m", **overrides: Any) -> TrainConfig:
    """The preset's settings with the given (non-None) overrides."""
    if preset not in PRESETS:
        raise LlmdeskError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    d = dict(PRESETS[preset], preset=preset)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(d)
