"""KL divergence of a model (e.g. a quantization) from its base, on the same tokens.

What llama.cpp's `llama-perplexity --kl-divergence` reports (tools/perplexity/perplexity.cpp),
for each scored position i with base distribution P_i and model distribution Q_i:

    KL(P_i || Q_i) = sum_v P_i(v) (log P_i(v) - log Q_i(v))     nats; its mean, median, p99, max
    same top token = share of positions where argmax P_i == argmax Q_i
    delta p        = Q_i(correct) - P_i(correct): mean and RMS
    ppl ratio      = ppl(model) / ppl(base) = exp(mean NLL_model - mean NLL_base)

The text is read through the same sliding windows as eval/ppl.py. The base is run first and its
log-probabilities kept (all of them, or the top k per position when that is too big); they can be
saved to a compressed .npz (`save_base`) and reused for many models. With top-k, KL is computed
over the k base tokens plus one bucket for the rest of the vocabulary (a lower bound on the full
KL, tight when the top k hold nearly all of the base's mass).

    r = kl_divergence("model-f16.gguf", "model-Q4_K_M.gguf", text)
    r.mean_kld, r.same_top_token, r.ppl_ratio
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from ..errors import LlmdeskError
from .ppl import log_softmax, resolve_ctx, tokenize_text, window_logits

FORMAT = "llmdesk-kld-base/1"
FULL_BUDGET_BYTES = 1 << 30  # keep full log-probs up to 1 GiB (float32), else the top k
DEFAULT_TOP_K = 128


@dataclass
class BaseLogits:
    """The base model's log-probabilities at every scored position of a text."""

    model: str
    n_vocab: int
    tokens: np.ndarray  # (n_tokens,) int32, the tokenized text
    targets: np.ndarray  # (n,) int64 indices into tokens of the scored tokens
    ctx: int
    stride: int
    text_sha256: str
    target_logprob: np.ndarray  # (n,) float64: log P(correct token)
    argmax: np.ndarray  # (n,) int32
    logprobs: np.ndarray | None = None  # (n, n_vocab) float32 when full
    top_ids: np.ndarray | None = None  # (n, k) int32 when top-k
    top_logprobs: np.ndarray | None = None  # (n, k) float32
    model_sha256: str | None = None

    @property
    def top_k(self) -> int | None:
        return None if self.logprobs is not None else int(self.top_ids.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write a compressed .npz, atomically (temporary name, then rename)."""
        path = Path(path).expanduser()
        if path.suffix != ".npz":  # numpy would add it; say so up front instead
            path = path.with_name(path.name + ".npz")
        arrays = dict(
            format=np.array(FORMAT), model=np.array(self.model), model_sha256=np.array(self.model_sha256 or ""),
            n_vocab=np.array(self.n_vocab), tokens=self.tokens.astype(np.int32), targets=self.targets.astype(np.int64),
            ctx=np.array(self.ctx), stride=np.array(self.stride), text_sha256=np.array(self.text_sha256),
            target_logprob=self.target_logprob, argmax=self.argmax.astype(np.int32),
        )
        if self.logprobs is not None:
            arrays["logprobs"] = self.logprobs
        else:
            arrays["top_ids"], arrays["top_logprobs"] = self.top_ids, self.top_logprobs
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BaseLogits":
        path = Path(path).expanduser()
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z or str(z["format"]) != FORMAT:
                    raise LlmdeskError(f"{path}: not a saved base (made by 'llmdesk eval kld --save-base')")
                d = {k: z[k] for k in z.files}
        except LlmdeskError:
            raise
        except FileNotFoundError:
            raise LlmdeskError(f"{path}: no such file") from None
        except (OSError, ValueError, KeyError) as e:
            raise LlmdeskError(f"{path}: cannot read the saved base ({e}); delete it and save it again") from None
        return cls(
            model=str(d["model"]), model_sha256=str(d["model_sha256"]) or None, n_vocab=int(d["n_vocab"]),
            tokens=d["tokens"], targets=d["targets"], ctx=int(d["ctx"]), stride=int(d["stride"]),
            text_sha256=str(d["text_sha256"]), target_logprob=d["target_logprob"], argmax=d["argmax"],
            logprobs=d.get("logprobs"), top_ids=d.get("top_ids"), top_logprobs=d.get("top_logprobs"),
        )


@dataclass
class KLDResult:
    base: str
    model: str
    tokens: int
    mean_kld: float
    kld_stderr: float
    median_kld: float
    p90_kld: float
    p95_kld: float
    p99_kld: float
    max_kld: float
    same_top_token: float  # a share, 0..1
    mean_delta_p: float  # mean of P_model(correct) - P_base(correct)
    rms_delta_p: float
    ppl_base: float
    ppl_model: float
    ppl_ratio: float
    ctx: int
    stride: int
    top_k: int | None  # None: KL over the full vocabulary
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return {**d, **self.extra}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load(path: str | os.PathLike):
    from ..formats.gguf import read_gguf
    from ..runtime.llama import LlamaModel

    read_gguf(path)
    return LlamaModel(path)


def compute_base(
    base_path: str | os.PathLike, text: str, *, ctx: int | None = None, stride: int | None = None,
    top_k: int | None = None, threads: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> BaseLogits:
    """Run the base model over the text and keep its log-probabilities (full, or top `top_k`;
    None: full when they fit in 1 GiB, else the top 128)."""
    model = _load(base_path)
    try:
        tokens = tokenize_text(model, text)
        use_ctx, use_stride = resolve_ctx(model, tokens, ctx, stride)
        n_scored = len(tokens) - 1
        if top_k is None and n_scored * model.n_vocab * 4 > FULL_BUDGET_BYTES:
            top_k = DEFAULT_TOP_K
        if top_k is not None:
            top_k = max(1, min(int(top_k), model.n_vocab))
        toks = np.asarray(tokens)
        targets, tlp, amax, full, tids, tlps = [], [], [], [], [], []
        for tg, logits in window_logits(model, tokens, use_ctx, use_stride, threads=threads, progress=progress):
            lp = log_softmax(logits)
            targets.append(tg)
            tlp.append(lp[np.arange(len(tg)), toks[tg]])
            amax.append(lp.argmax(axis=1).astype(np.int32))
            if top_k is None:
                full.append(lp.astype(np.float32))
            else:
                ids = np.argpartition(-lp, top_k - 1, axis=1)[:, :top_k]
                tids.append(ids.astype(np.int32))
                tlps.append(np.take_along_axis(lp, ids, axis=1).astype(np.float32))
        return BaseLogits(
            model=Path(base_path).name, n_vocab=model.n_vocab, tokens=toks.astype(np.int32),
            targets=np.concatenate(targets), ctx=use_ctx, stride=use_stride, text_sha256=text_sha256(text),
            target_logprob=np.concatenate(tlp), argmax=np.concatenate(amax),
            logprobs=np.concatenate(full) if top_k is None else None,
            top_ids=np.concatenate(tids) if top_k is not None else None,
            top_logprobs=np.concatenate(tlps) if top_k is not None else None,
        )
    finally:
        model.close()


def kl_divergence(
    base: str | os.PathLike | BaseLogits,
    model_path: str | os.PathLike,
    text: str,
    *,
    ctx: int | None = None,
    stride: int | None = None,
    top_k: int | None = None,
    save_base: str | os.PathLike | None = None,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> KLDResult:
    """KL divergence and friends of `model_path` against `base` on `text`.

    `base`: a GGUF model, a saved base (.npz) or a BaseLogits. `save_base`: a file to reuse the
    base's log-probabilities from when it exists (it must be for the same text and windows), and
    to save them to when it does not. `progress(stage, done, total)`, stage "base" or "model".
    """
    def stage(name: str):
        return (lambda d, n: progress(name, d, n)) if progress else None

    bl: BaseLogits | None = base if isinstance(base, BaseLogits) else None
    if bl is None and Path(base).suffix == ".npz":
        bl = BaseLogits.load(base)
    if bl is None and save_base is not None and _npz(save_base).exists():
        bl = BaseLogits.load(_npz(save_base))
        _check_same_text(bl, text, ctx, stride, _npz(save_base))
    if bl is None:
        bl = compute_base(base, text, ctx=ctx, stride=stride, top_k=top_k, threads=threads, progress=stage("base"))
        if save_base is not None:
            bl.save(save_base)
    else:
        _check_same_text(bl, text, ctx, stride, "the saved base")

    model = _load(model_path)
    try:
        if model.n_vocab != bl.n_vocab:
            raise LlmdeskError(
                f"{bl.model} and {Path(model_path).name} have different vocabularies "
                f"({bl.n_vocab} and {model.n_vocab} tokens); KL divergence needs the same tokenizer"
            )
        tokens = tokenize_text(model, text)
        if len(tokens) != len(bl.tokens) or np.any(np.asarray(tokens) != bl.tokens):
            raise LlmdeskError(
                f"{bl.model} and {Path(model_path).name} tokenize the text differently (different vocabularies); "
                "KL divergence needs the same tokenizer"
            )
        toks = np.asarray(tokens)
        kld, dp, nll_m, same = [], [], [], []
        row = 0
        for tg, logits in window_logits(model, tokens, bl.ctx, bl.stride, threads=threads, progress=stage("model")):
            if not np.array_equal(tg, bl.targets[row : row + len(tg)]):  # same windows, same order
                raise LlmdeskError("internal: the model's scored positions differ from the base's")
            sl = slice(row, row + len(tg))
            lq = log_softmax(logits)
            lq_t = lq[np.arange(len(tg)), toks[tg]]
            nll_m.append(-lq_t)
            dp.append(np.exp(lq_t) - np.exp(bl.target_logprob[sl]))
            same.append(lq.argmax(axis=1) == bl.argmax[sl])
            kld.append(_kl_rows(bl, sl, lq))
            row += len(tg)
    finally:
        model.close()
    return _summarize(bl, Path(model_path).name, np.concatenate(kld), np.concatenate(dp),
                      np.concatenate(nll_m), np.concatenate(same))


def _npz(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def _check_same_text(bl: BaseLogits, text: str, ctx: int | None, stride: int | None, where) -> None:
    if bl.text_sha256 != text_sha256(text):
        raise LlmdeskError(f"{where} was saved for another text; delete it, or give the text it was made from")
    if (ctx is not None and min(ctx, len(bl.tokens)) != bl.ctx) or (stride is not None and stride != bl.stride):
        raise LlmdeskError(
            f"{where} was saved with --ctx {bl.ctx} --stride {bl.stride}; use those, or save the base again"
        )


def _kl_rows(bl: BaseLogits, sl: slice, lq: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row; lq (k, n_vocab) float64 model log-probs."""
    if bl.logprobs is not None:
        lp = bl.logprobs[sl].astype(np.float64)
        return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)
    ids = bl.top_ids[sl]
    lp = bl.top_logprobs[sl].astype(np.float64)
    lqk = np.take_along_axis(lq, ids, axis=1)
    p = np.exp(lp)
    kl = (p * (lp - lqk)).sum(axis=1)
    # the rest of the vocabulary as one outcome
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(lqk).sum(axis=1), 1e-30, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0)


def _summarize(bl: BaseLogits, model_name: str, kld: np.ndarray, dp: np.ndarray, nll_m: np.ndarray,
               same: np.ndarray) -> KLDResult:
    n = kld.size
    nll_b = -bl.target_logprob
    q = np.quantile(kld, [0.5, 0.9, 0.95, 0.99, 0.999])
    mean_nll_m, mean_nll_b = float(nll_m.mean()), float(nll_b.mean())
    # stderr of ln(ppl ratio): the NLL differences per token are the samples (llama-perplexity)
    d = nll_m - nll_b
    ln_ratio_se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    ratio = math.exp(mean_nll_m - mean_nll_b)
    return KLDResult(
        base=bl.model, model=model_name, tokens=int(n),
        mean_kld=float(kld.mean()), kld_stderr=float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        median_kld=float(q[0]), p90_kld=float(q[1]), p95_kld=float(q[2]), p99_kld=float(q[3]),
        max_kld=float(kld.max()),
        same_top_token=float(same.mean()),
        mean_delta_p=float(dp.mean()), rms_delta_p=float(math.sqrt((dp**2).mean())),
        ppl_base=math.exp(mean_nll_b), ppl_model=math.exp(mean_nll_m), ppl_ratio=ratio,
        ctx=bl.ctx, stride=bl.stride, top_k=bl.top_k,
        extra={"p99_9_kld": float(q[4]), "min_kld": float(kld.min()), "ppl_ratio_stderr": ratio * ln_ratio_se,
               "ppl_base_stderr": math.exp(mean_nll_b) * _se(nll_b), "ppl_model_stderr": math.exp(mean_nll_m) * _se(nll_m),
               "ln_ppl_ratio": mean_nll_m - mean_nll_b},
    )


def _se(x: np.ndarray) -> float:
    """Standard error of the mean, as llama-perplexity: sqrt((<x^2> - <x>^2) / (n - 1))."""
    n = x.size
    return math.sqrt(max(float((x**2).mean() - x.mean() ** 2), 0.0) / (n - 1)) if n > 1 else float("nan")
