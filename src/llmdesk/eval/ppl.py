"""Perplexity with a sliding window, as llama.cpp computes its logits.

The text is tokenized once (with BOS when the model adds one) and read through windows of `ctx`
tokens that start `stride` tokens apart (Hugging Face's "perplexity of fixed-length models"
recipe). Each token is scored once, by the first window that holds it with context before it:
the first window scores its tokens 2..ctx, every later window only the tokens past the previous
window's end, so every scored token sees at least ctx - stride tokens of context (the default
stride ctx/2 matches llama-perplexity, which scores the second half of each chunk). When the
whole text fits in one window every token after the first is scored, and the figure is exactly
exp(mean negative log-likelihood) of the text.

The windows are scored by the Engine (runtime/engine.py, `Engine.score`): a window is one score
request, context = its unscored head, continuation = its scored tokens.

Standard error as llama-perplexity reports it (tools/perplexity/perplexity.cpp): the tokens'
NLLs are taken as independent samples; stderr(mean NLL) = sqrt(var / (n - 1)) and the
perplexity's error is ppl * stderr(mean NLL) (first-order error propagation through exp).

    r = perplexity("model.gguf", text, ctx=512)
    r.ppl, r.stderr, r.tokens
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..errors import LlmdeskError

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime.engine import ScoreResult

DEFAULT_CTX = 512  # llama-perplexity's default context
MAX_BATCH = 512  # tokens per llama_decode, and scored tokens per piece of a window


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


def window_scores(
    model, tokens: list[int], ctx: int, stride: int, *, threads: int | None = None, logits: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[np.ndarray, ScoreResult]]:
    """Score the windows with the Engine (`model` is a runtime.llama.LlamaModel); yield
    (targets, result) per piece of a window: targets (k,) are indices into `tokens`, and the
    ScoreResult holds their log-probabilities (and, with `logits`, the (k, n_vocab) float32
    logits at the position before each target).

    A window is the score request (context tokens[begin:first], continuation tokens[first:end]),
    cut into pieces of at most MAX_BATCH scored tokens so that no more than MAX_BATCH rows of
    logits are held at once; a piece's context is the window up to it, which the Engine's one
    slot still holds from the piece before (prefix reuse), so each token is computed once."""
    from ..runtime.engine import Engine, ScoreRequest

    windows = plan_windows(len(tokens), ctx, stride)
    piece = min(ctx, MAX_BATCH)
    with Engine(model, n_ctx=max(ctx, 16), n_slots=1, n_batch=piece, n_threads=threads) as engine:
        for w, (begin, end, first) in enumerate(windows):
            for lo in range(first, end, piece):
                hi = min(lo + piece, end)
                res = engine.score([ScoreRequest(tokens[begin:lo], tokens[lo:hi], logits=logits)]).wait()[0]
                yield np.arange(lo, hi, dtype=np.int64), res
            if progress:
                progress(w + 1, len(windows))


def window_logits(
    model, tokens: list[int], ctx: int, stride: int, *, threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(targets, logits) per piece of `window_scores`: logits (k, n_vocab) float32 are the
    model's outputs at the position before each target."""
    for targets, res in window_scores(model, tokens, ctx, stride, threads=threads, logits=True, progress=progress):
        yield targets, res.logits


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
        # the Engine computes each log-probability as log_softmax(logits)[target] does, in float64
        nll = np.concatenate([
            -np.asarray(res.logprobs)
            for _targets, res in window_scores(model, tokens, use_ctx, use_stride, threads=threads, progress=progress)
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
