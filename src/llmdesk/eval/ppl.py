"""Perplexity with a sliding window, as llama.cpp computes its logits.

The text is tokenized once (with BOS when the model adds one) and read through windows of `ctx`
tokens that start `stride` tokens apart (Hugging Face's "perplexity of fixed-length models"
recipe). Each token is scored once, by the first window that holds it with context before it:
the first window scores its tokens 2..ctx, every later window only the tokens past the previous
window's end, so every scored token sees at least ctx - stride tokens of context (the default
stride ctx/2 matches llama-perplexity, which scores the second half of each chunk). When the
whole text fits in one window every token after the first is scored, and the figure is exactly
exp(mean negative log-likelihood) of the text.

Standard error as llama-perplexity reports it (tools/perplexity/perplexity.cpp): the tokens'
NLLs are taken as independent samples; stderr(mean NLL) = sqrt(var / (n - 1)) and the
perplexity's error is ppl * stderr(mean NLL) (first-order error propagation through exp).

    r = perplexity("model.gguf", text, ctx=512)
    r.ppl, r.stderr, r.tokens
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import LlmdeskError

DEFAULT_CTX = 512  # llama-perplexity's default context
MAX_BATCH = 512  # tokens per llama_decode; logits are read after each


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float  # of the perplexity, ppl * stderr of the mean NLL
    nll: float  # mean negative log-likelihood, nats per token
    nll_stderr: float
    tokens: int  # tokens scored
    text_tokens: int  # tokens in the text
    ctx: int
    stride: int
    windows: int
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# windows


def plan_windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) for each window over `n_tokens` tokens.

    Window w holds tokens[begin:end]; it scores targets first..end-1, each predicted from the
    logits at the position before it, inside the window. With stride < ctx every target 1..n-1
    is scored exactly once; with stride == ctx (windows that do not overlap) a window's first
    token has no context inside it and is not scored, as in Hugging Face's recipe.
    """
    if n_tokens < 2:
        return []
    out: list[tuple[int, int, int]] = []
    prev_end, begin = 1, 0
    while True:
        end = min(begin + ctx, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev_end = max(prev_end, end)
        if end == n_tokens:
            return out
        begin += stride


def check_windows(n_tokens: int, ctx: int, *, explicit_ctx: bool, what: str = "the text") -> None:
    """A text must hold at least two windows (as llama-perplexity requires 2 * ctx tokens), unless
    the context was chosen to cover the whole text."""
    if explicit_ctx and ctx >= n_tokens:
        return
    if n_tokens < 2 * ctx:
        raise LlmdeskError(
            f"{what} has {n_tokens} tokens, shorter than two windows of {ctx} ({2 * ctx} tokens); "
            f"give a longer text, a smaller --ctx, or --ctx {max(n_tokens, 2)} to score it in one window"
        )


def default_ctx(n_ctx_train: int) -> int:
    return min(DEFAULT_CTX, n_ctx_train) if n_ctx_train > 0 else DEFAULT_CTX


def window_logits(
    model, tokens: list[int], ctx: int, stride: int, *, threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run the model over the windows; yield (targets, logits) per batch of scored positions:
    targets (k,) are indices into `tokens`, logits (k, n_vocab) float32 are the model's outputs
    at the position before each target. `model` is a runtime.llama.LlamaModel."""
    import llama_cpp as C

    from ..runtime.llama import last_error, new_context

    windows = plan_windows(len(tokens), ctx, stride)
    n_batch = min(ctx, MAX_BATCH)
    lctx = new_context(model, n_ctx=ctx, n_batch=n_batch, n_threads=threads)
    batch = C.llama_batch_init(n_batch, 0, 1)
    n_vocab = model.n_vocab
    try:
        mem = C.llama_get_memory(lctx)
        for w, (begin, end, first) in enumerate(windows):
            C.llama_memory_clear(mem, True)
            for b0 in range(begin, end, n_batch):
                b1 = min(b0 + n_batch, end)
                batch.n_tokens = b1 - b0
                wanted = []
                for i, pos in enumerate(range(b0, b1)):
                    batch.token[i] = tokens[pos]
                    batch.pos[i] = pos - begin
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    # the logits at pos predict target pos + 1
                    out = first - 1 <= pos < end - 1
                    batch.logits[i] = out
                    if out:
                        wanted.append(pos + 1)
                if not wanted:  # llama.cpp wants at least one output; an unused one is cheap
                    batch.logits[b1 - b0 - 1] = True
                rc = C.llama_decode(lctx, batch)
                if rc != 0:
                    raise LlmdeskError(f"{model.path.name}: llama_decode failed ({rc}) {last_error()}".strip())
                if wanted:
                    ptr = C.llama_get_logits(lctx)
                    logits = np.ctypeslib.as_array(
                        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(wanted), n_vocab)
                    ).copy()
                    yield np.asarray(wanted, dtype=np.int64), logits
            if progress:
                progress(w + 1, len(windows))
    finally:
        C.llama_batch_free(batch)
        C.llama_free(lctx)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(k, n_vocab) -> log-probabilities, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def nll_stats(nll: np.ndarray) -> tuple[float, float, float, float]:
    """(ppl, ppl stderr, mean NLL, stderr of the mean NLL) as llama-perplexity computes them."""
    n = nll.size
    mean = float(nll.mean())
    var = float((nll**2).mean() - mean**2)
    se = math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return ppl, ppl * se, mean, se


def tokenize_text(model, text: str) -> list[int]:
    return model.tokenize(text, add_special=True, parse_special=False)


def read_text(path: str | os.PathLike) -> str:
    """A text file for evaluation, as UTF-8 (one-line errors)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise LlmdeskError(f"{p}: no such text file") from None
    except IsADirectoryError:
        raise LlmdeskError(f"{p}: is a directory; give a text file") from None
    except OSError as e:
        raise LlmdeskError(f"{p}: cannot read it ({e.strerror or e})") from None
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise LlmdeskError(f"{p}: the text file is empty")
    return text


# ---------------------------------------------------------------------------------------------
# the measurement


def perplexity(
    model_path: str | os.PathLike,
    text: str,
    *,
    ctx: int | None = None,
    stride: int | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of the GGUF model at `model_path` on `text` (see the module docstring).

    `ctx` defaults to 512 (or the model's training context, if smaller); `stride` to ctx // 2.
    """
    from ..formats.gguf import read_gguf
    from ..runtime.llama import LlamaModel

    read_gguf(model_path)
    model = LlamaModel(model_path)
    try:
        tokens = tokenize_text(model, text)
        use_ctx, use_stride = resolve_ctx(model, tokens, ctx, stride)
        nll = np.concatenate([
            -log_softmax(logits)[np.arange(len(targets)), np.asarray(tokens)[targets]]
            for targets, logits in window_logits(model, tokens, use_ctx, use_stride, threads=threads, progress=progress)
        ])
    finally:
        model.close()
    ppl, ppl_se, mean, se = nll_stats(nll)
    return PerplexityResult(
        ppl=ppl, stderr=ppl_se, nll=mean, nll_stderr=se, tokens=int(nll.size), text_tokens=len(tokens),
        ctx=use_ctx, stride=use_stride, windows=len(plan_windows(len(tokens), use_ctx, use_stride)),
        model=Path(model_path).name,
    )


def resolve_ctx(model, tokens: list[int], ctx: int | None, stride: int | None) -> tuple[int, int]:
    """The context and stride to use, checked: (ctx, stride)."""
    if ctx is not None and ctx < 2:
        raise LlmdeskError(f"--ctx must be at least 2, got {ctx}")
    use_ctx = ctx if ctx is not None else default_ctx(model.n_ctx_train)
    check_windows(len(tokens), use_ctx, explicit_ctx=ctx is not None)
    use_ctx = min(use_ctx, len(tokens))  # one window over the whole text needs no more
    if model.n_ctx_train > 0 and use_ctx > model.n_ctx_train:
        raise LlmdeskError(
            f"{model.path.name}: --ctx {use_ctx} is longer than the model's training context "
            f"({model.n_ctx_train}); choose --ctx {model.n_ctx_train} or less"
        )
    use_stride = stride if stride is not None else max(1, use_ctx // 2)
    if not 1 <= use_stride <= use_ctx:
        raise LlmdeskError(f"--stride must be between 1 and the context ({use_ctx}), got {use_stride}")
    return use_ctx, use_stride
