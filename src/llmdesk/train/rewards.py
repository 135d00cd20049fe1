"""Tuning on preferences (DPO) and on rewards (GRPO), with LoRA, on TRL's trainers.

    dpo(base, "pairs.jsonl", "out/")                 prompt/chosen/rejected rows (a file, `arena
                                                     export`, or `synth answers --rank`)
    grpo(base, "prompts.jsonl", "out/", graders)     prompts (and the columns graders read)

Both take the same bases as `tune` (an HF folder, a `llmdesk train` output, a GGUF or a store
name), train a LoRA adapter on the CPU in 32 bits (bf16 where CUDA has it), and write what `tune`
writes: DIR/adapter/ (PEFT), optionally DIR/merged/ and a GGUF registered in the store, a plot
(loss, and the reward for GRPO), metrics.json and a results row.

GRPO measures what it is for: before training and after, each held-out prompt (`val_split` of
the rows, at least one) is answered `num_generations` times by the model in transformers, and
the graders' weighted mean reward is reported for both (`reward_before`, `reward_after`), with
each grader's own mean; TRL logs the reward and each grader's mean at every step.

A run keeps the trainer's checkpoints (adapter weights, optimizer, scheduler, RNG states, the
data position) in DIR/trainer/ every `save_every` steps and when Ctrl-C stops it after the step
in flight; `resume` continues from the newest whole one, with the same settings, data and base
(DIR/run.json), and replays the steps an uninterrupted run would have taken. They are removed
once the adapter is written.

Several processes (`tune --processes N`, `accelerate launch` or torchrun: WORLD_SIZE > 1) train
data parallel as TRL's trainers do under accelerate: the model is wrapped in DDP (gloo on CPU, NCCL
on GPUs), `batch` is each process's share of a step, so a step takes `batch` x P pairs (DPO) or
completions (GRPO). DPO's step is the one-process step of `batch` x P pairs: process r takes
the r-th `batch` of the same shuffled order and the gradients are averaged. GRPO draws
`batch` x P / `num_generations` prompts a step, repeats each `num_generations` times and deals
them out in order, so one prompt's completions may be sampled in two processes (each samples with
its own seed); the rewards are gathered before they are compared within each prompt, so
`batch` x P (not `batch`) must be a multiple of `num_generations`. A Ctrl-C stops every process
after the same step. The held-out prompts are shared out to be sampled (each with its own seed,
so the completions, and the reward, are those of one process) and rank 0 grades them; rank 0 alone
writes run.json, the adapter, the exports, the plot, metrics.json and the results row. A
checkpoint resumes only with as many processes. Sharding them (--fsdp, accelerate's --use_fsdp) is
refused in one line: on CPU accelerate would leave the run data parallel (`no_fsdp`).
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_text
from ..errors import LlmdeskError

METHODS = ("dpo", "grpo")
CHECKPOINTS = "trainer"  # DIR/trainer/checkpoint-N: the trainer's own (weights, optimizer, RNG, data position)
RUN_FILE = "run.json"  # the settings, data and base a checkpoint belongs to


def no_fsdp(method: str, asked: str = "--fsdp") -> LlmdeskError:
    """Sharding is refused: TRL's trainers shard only through accelerate's FSDP, and accelerate
    applies its FSDP plugin to GPU processes alone (accelerate 1.15 state.py, AcceleratorState: the
    plugin is taken only when the processes are MULTI_GPU and the like; MULTI_CPU ones stay data
    parallel), so on CPU the Trainer's `fsdp` arguments are dropped without a word and each process
    holds the whole model (measured: the same parameter bytes in each as one process alone)."""
    return LlmdeskError(f"{asked} is not available with --method {method}: TRL's trainers shard only through "
                        "accelerate's FSDP, which accelerate applies to GPU processes alone (CPU ones would each hold "
                        "the whole model) and which is untested with llmdesk on GPUs; train it data parallel, without "
                        f"{asked.split()[-1]}")


@dataclass
class RewardConfig:
    method: str = "grpo"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "all-linear"
    steps: int = 50
    lr: float = 0.0  # 0: 5e-5 for DPO, 2e-5 for GRPO
    batch: int = 4  # each process's share of a step: DPO pairs, GRPO completions (batch x processes: whole groups)
    grad_accum: int = 1
    beta: float = 0.1  # DPO: the KL weight; GRPO: 0 (no reference model, TRL's default)
    sft_weight: float = 0.0  # DPO: weight of the chosen answers' own loss beside the preference loss (RPO)
    num_generations: int = 4  # GRPO: completions per prompt
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    val_split: float = 0.1
    save_every: int = 0  # a checkpoint every N steps (0: ten a run), and on Ctrl-C
    processes: int = 0  # how many train it data parallel (0: WORLD_SIZE, as --processes / accelerate launch set it)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LlmdeskError(f"method {self.method!r}: use {' or '.join(METHODS)}")
        self.processes = self.processes or int(os.environ.get("WORLD_SIZE", "1"))
        for k in ("rank", "steps", "batch", "grad_accum", "num_generations", "max_prompt_tokens", "max_completion_tokens",
                  "processes"):
            if getattr(self, k) < 1:
                raise LlmdeskError(f"--{k.replace('_', '-')} must be at least 1")
        if self.method == "grpo":
            if self.num_generations < 2:
                raise LlmdeskError("--generations must be at least 2 (GRPO compares completions of one prompt)")
            n, p = self.batch * self.processes, self.processes
            if n % self.num_generations:  # TRL's generation batch holds whole groups of a prompt's completions
                raise LlmdeskError(f"--batch {self.batch}" + (f" x {p} processes = {n} completions a step" if p > 1 else "")
                                   + f" must be a multiple of --generations {self.num_generations} (each prompt's "
                                   f"completions are scored together): give --batch a multiple of "
                                   f"{self.num_generations // math.gcd(self.num_generations, p)}")
        if not 0 <= self.val_split < 1:
            raise LlmdeskError(f"--val-split {self.val_split}: give a share in [0, 1)")
        if self.sft_weight < 0:
            raise LlmdeskError(f"--sft-weight {self.sft_weight}: give 0 or more")
        if not self.lr:
            self.lr = 5e-5 if self.method == "dpo" else 2e-5
        self.save_every = self.save_every or max(1, self.steps // 10)


@dataclass
class RewardResult:
    out_dir: Path
    method: str
    steps: int
    base: str
    adapter: Path | None  # None in the processes other than rank 0
    merged: Path | None = None
    gguf: Path | None = None
    registered: str | None = None
    plot: Path | None = None
    lora_gguf: Path | None = None
    train_rows: int = 0
    val_rows: int = 0
    reward_before: float | None = None
    reward_after: float | None = None
    grader_before: dict[str, float] = field(default_factory=dict)
    grader_after: dict[str, float] = field(default_factory=dict)
    graded_none: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "history"}


# -- data ------------------------------------------------------------------------------------------

def _jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
    from .synth import jsonl_rows

    rows = jsonl_rows(path)
    if not rows:
        raise LlmdeskError(f"{Path(path).expanduser()}: no rows")
    return rows


def _prompt(where: str, r: dict) -> str | list[dict]:
    """A row's prompt: text, or a conversation (`messages` without a final assistant turn)."""
    p = r.get("prompt")
    if isinstance(p, str) and p.strip():
        return p
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m for m in p):
        return p
    m = r.get("messages")
    if isinstance(m, list) and m and all(isinstance(x, dict) and "role" in x for x in m):
        while m and m[-1].get("role") == "assistant":
            m = m[:-1]
        if m:
            return m
    raise LlmdeskError(f"{where}: no 'prompt' (text or messages) in the row (columns: {', '.join(r) or 'none'})")


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """prompt/chosen/rejected rows (extra columns, as the arena's export has, are dropped)."""
    out = []
    for where, r in _jsonl(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in r]
        if missing:
            raise LlmdeskError(f"{where}: no {missing[0]!r}: a preference row has prompt, chosen and rejected")
        prompt = _prompt(where, r)
        ch, rj = r["chosen"], r["rejected"]
        for k, v in (("chosen", ch), ("rejected", rj)):
            if not (isinstance(v, str) and v.strip()):
                raise LlmdeskError(f"{where}: {k!r} must be non-empty text")
        if ch.strip() == rj.strip():
            raise LlmdeskError(f"{where}: chosen and rejected are the same text: the pair teaches nothing; remove it")
        out.append({"prompt": prompt, "chosen": ch, "rejected": rj})
    return out


def read_prompts(path: str | os.PathLike, graders=()) -> list[dict]:
    """Prompt rows with the columns the graders read (checked on every row)."""
    out = []
    for where, r in _jsonl(path):
        row = {k: v for k, v in r.items() if k not in ("messages",)}
        row["prompt"] = _prompt(where, r)
        for g in graders:
            g.check_columns(set(row), where)
        out.append(row)
    return out


def _split(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(rows) * share)) if share > 0 and len(rows) > 1 else 0
    val = {i for i in idx[:n_val]}
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def _as_chat(rows: list[dict], tok) -> list[dict]:
    """Text prompts become one user turn when the tokenizer has a chat template (TRL renders it)."""
    if not getattr(tok, "chat_template", None):
        return rows
    out = []
    for r in rows:
        r = dict(r)
        if isinstance(r["prompt"], str):
            r["prompt"] = [{"role": "user", "content": r["prompt"]}]
            for k in ("chosen", "rejected"):
                if k in r:
                    r[k] = [{"role": "assistant", "content": r[k]}]
        out.append(r)
    return out


# -- measuring -------------------------------------------------------------------------------------

def mean_reward(model, tok, rows: list[dict], graders, weights, cfg: RewardConfig,
                dp=None) -> tuple[float | None, dict[str, float]]:
    """The graders' weighted mean over `num_generations` sampled completions of each row. With
    several processes (`dp`), each samples every P-th row (with the row's own seed, so the
    completions are those one process samples) and rank 0 grades them all; the others get None."""
    import torch

    from ..eval.graders import combined

    rank, world = (dp.rank, dp.world) if dp is not None else (0, 1)
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for _ in rows]
    sampled: dict[int, list[str]] = {}
    for i in range(rank, len(rows), world):
        r = rows[i]
        if isinstance(r["prompt"], list):
            text = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        else:
            text = r["prompt"]
        ids = tok(text, return_tensors="pt", add_special_tokens=not isinstance(r["prompt"], list)).input_ids
        ids = ids[:, -cfg.max_prompt_tokens:].to(model.device)
        torch.manual_seed(seeds[i])
        with torch.no_grad():
            outs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=cfg.temperature, max_new_tokens=cfg.max_completion_tokens,
                                  num_return_sequences=cfg.num_generations, pad_token_id=tok.pad_token_id)
        sampled[i] = [tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in outs]
    model.train()
    if dp is not None:
        for part in dp.all_objects(sampled):
            sampled.update(part)
    if rank != 0:
        return None, {}
    prompts, completions, cols = [], [], {}
    for i, r in enumerate(rows):
        for c in sampled[i]:
            completions.append(c)
            prompts.append(r["prompt"])
            for k, v in r.items():
                if k != "prompt":
                    cols.setdefault(k, []).append(v)
    totals, means = combined(graders, weights, prompts, completions, **cols)
    return sum(totals) / max(1, len(totals)), means


# -- the runs --------------------------------------------------------------------------------------

def _prepare(base, cfg: RewardConfig):
    from .tune import TuneConfig, _make_model, _quiet_hf, load_tokenizer
    from ..formats.hf import require_train_extra

    require_train_extra("torch", "transformers", "peft", "trl")
    with _quiet_hf():
        tok = load_tokenizer(base)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tc = TuneConfig(method="lora", rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                        seed=cfg.seed)
        model, device = _make_model(base, tc)
        _stop_at_end_of_turn(model, tok)
    return tok, model, device


def _stop_at_end_of_turn(model, tok) -> None:
    """Sampling stops where the chat template ends an assistant turn (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>: the token SFT trains after each answer) as well as at the end of text: a model whose
    tokenizer's eos is <|endoftext|> ends its turns with <|im_end|>, and without this every
    completion ran on to the token limit (TRL's GRPO and `mean_reward` stop at
    `generation_config.eos_token_id`), so `exact` never matched."""
    from .sft_data import end_of_turn_token

    mark = end_of_turn_token(tok)
    if not mark:
        return
    cfg = model.generation_config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id, tok.eos_token_id]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    end = tok.convert_tokens_to_ids(mark)
    if end not in eos:
        cfg.eos_token_id = [*eos, end]


def _trainer_args(cls, cfg: RewardConfig, out: Path, device: str, **extra):
    return cls(output_dir=str(out / CHECKPOINTS), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch,
               gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, logging_steps=1,
               save_strategy="steps", save_steps=cfg.save_every, save_total_limit=1, report_to=[],
               bf16=device == "cuda", fp16=False, use_cpu=device == "cpu",
               seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True, lr_scheduler_type="constant_with_warmup",
               warmup_steps=max(1, cfg.steps // 20), dataloader_num_workers=0,
               ddp_find_unused_parameters=False, **extra)  # several processes: LoRA uses every trained weight


class _Progress:
    """A transformers callback that reports each logged step through `on_event`, and takes a
    Ctrl-C (`interrupt.requested`) when the step in flight ends: the trainer then saves a
    checkpoint of that step and stops (in every process, when any of them got it)."""

    def __init__(self, emit, interrupt, dp):
        from transformers import TrainerCallback

        def stop(control):
            if dp.sum([float(interrupt.requested)])[0] > 0:
                control.should_save = control.should_training_stop = True

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                stop(control)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    emit("step", {"step": state.global_step, "max_steps": state.max_steps, **logs})
                stop(control)  # a Ctrl-C while the step was reported: the save comes after the log
        self.callback = CB()


def last_checkpoint(out: Path) -> Path | None:
    """The newest whole checkpoint of a run in `out` (the trainer writes trainer_state.json last;
    a checkpoint without it was cut short)."""
    folder = out / CHECKPOINTS
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def _check_resume(out: Path, resume: bool, run: dict) -> Path | None:
    """The checkpoint to resume from (None: start afresh), refused in one line when the run in
    `out` is not the one asked for."""
    ckpt = last_checkpoint(out)
    if resume and ckpt is None:
        raise LlmdeskError(f"{out}: nothing to resume (no checkpoint in {CHECKPOINTS}/); run without --resume")
    if not resume and ckpt is not None:
        raise LlmdeskError(f"{out}: holds the checkpoint of a run already started there; pass --resume to continue it, "
                           "or choose another -o")
    if ckpt is None:
        return None
    try:
        saved = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LlmdeskError(f"{out / RUN_FILE}: missing or unreadable; the checkpoint cannot be matched to its "
                           "settings: start again in another -o") from None
    was, now = saved["config"].get("processes", 1), run["config"]["processes"]
    if was != now:
        raise LlmdeskError(f"{ckpt}: was trained by {was} processes, not {now}; resume with as many (each one's "
                           "--batch is its share of a step)")
    for k, v in run["config"].items():
        if k != "processes" and saved["config"].get(k) != v:  # (a run.json of before `processes`: one)
            raise LlmdeskError(f"{ckpt}: was trained with {k} {saved['config'].get(k)!r}, not {v!r}; resume with the "
                               "same settings")
    if saved["data"] != run["data"]:
        raise LlmdeskError(f"{ckpt}: was trained on other data; resume with the same file")
    if saved["base"] != run["base"]:
        raise LlmdeskError(f"{ckpt}: was trained on base {saved['base']}, not {run['base']}")
    return ckpt


def run(method: str, base_ref: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
        cfg: RewardConfig | None = None, *, graders=None, weights=None, merge: bool = False, gguf: str | None = None,
        name: str | None = None, resume: bool = False, lora_gguf: bool = False, quantize_with=None, check_with=None,
        on_event: Callable[[str, dict], None] | None = None) -> RewardResult:
    """Tune `base_ref` with DPO on preference pairs or GRPO on prompts and graders (see the module).
    `resume` continues the run whose checkpoint is in `out_dir`; `lora_gguf` also writes the
    adapter as a llama.cpp LoRA GGUF (DIR/adapter.gguf). In a run of several processes, each
    calls this; rank 0's result holds the outputs (the others': `adapter` None)."""
    import shutil
    import time

    from .dist import DataParallel
    from .synth import file_sha256
    from .tune import (CONVERTER_TYPES, _atomic_dir, _copy_tokenizer, _export_gguf, _Interrupt, _merge, _quiet_hf,
                       _store_safe, find_base)

    cfg = cfg or RewardConfig(method=method)
    if cfg.method != method:
        raise LlmdeskError(f"the settings are for {cfg.method}, not {method}")
    dp = DataParallel()  # alone: does nothing
    if dp.fsdp:  # accelerate launch --use_fsdp (the CLI refuses --fsdp itself)
        raise no_fsdp(method, "accelerate launch --use_fsdp")
    if cfg.processes != dp.world:
        raise LlmdeskError(f"the settings are for {cfg.processes} processes, and {dp.world} run: start it with "
                           f"'llmdesk tune --processes {cfg.processes}' (or accelerate launch --num_processes "
                           f"{cfg.processes})")
    emit = on_event if on_event is not None and dp.rank == 0 else (lambda _k, _d: None)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LlmdeskError(f"{out}: is a file; -o names the output folder")
    if (out / "adapter").exists():
        raise LlmdeskError(f"{out}: holds a finished run (adapter/); choose another -o")
    if method == "grpo":
        if not graders:
            raise LlmdeskError("GRPO needs graders: --reward exact, regex:PATTERN, numeric, json, python:FILE.py:FN, judge:MODEL")
        weights = list(weights or [1.0] * len(graders))
        rows = read_prompts(data, graders)
    else:
        rows = read_pairs(data)
    reg_name = reg_tag = None
    if gguf is not None:
        from ..store import catalog

        gguf = gguf.lower()
        if gguf not in CONVERTER_TYPES and quantize_with is None:
            raise LlmdeskError(f"--gguf {gguf}: pass a quantizer for types other than {', '.join(CONVERTER_TYPES)}")
        reg_name, reg_tag = name or _store_safe(out.resolve().name), gguf
        catalog.check_name(reg_name, reg_tag)
    base = find_base(base_ref)  # missing, unsupported: one line before any work
    this_run = {"config": asdict(cfg), "data": file_sha256(data), "base": base.identity}
    ckpt = _check_resume(out, resume, this_run)
    train_rows, val_rows = _split(rows, cfg.val_split if method == "grpo" else 0.0, cfg.seed)
    emit("data", {"train": len(train_rows), "val": len(val_rows)})
    dp.start()  # several processes: they meet here (and each takes its GPU)
    try:
        emit("status", {"text": "loading the base"})
        tok, model, device = _prepare(base, cfg)
        if ckpt is None and dp.rank == 0:  # a fresh start: what a later --resume must match
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # checkpoints cut short before they were whole
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / RUN_FILE, json.dumps(this_run, indent=1) + "\n")
        dp.barrier()  # every process has checked the output folder before the trainer writes into it
        result = RewardResult(out_dir=out, method=method, steps=cfg.steps, base=base.identity, adapter=out / "adapter",
                              train_rows=len(train_rows), val_rows=len(val_rows), processes=dp.world)
        import datasets
        import trl

        t0 = time.perf_counter()
        with _quiet_hf(), _quiet_datasets(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = datasets.Dataset.from_list(_as_chat(train_rows, tok))
            if method == "grpo":
                val_chat = _as_chat(val_rows, tok)
                emit("status", {"text": "measuring the base's reward on the held-out prompts"})
                result.reward_before, result.grader_before = mean_reward(model, tok, val_chat, graders, weights, cfg, dp)
                emit("reward", {"when": "before", "reward": result.reward_before, "graders": result.grader_before})
                # one generation batch a step: `batch` completions in each process, whole groups in all of them
                args = _trainer_args(trl.GRPOConfig, cfg, out, device, num_generations=cfg.num_generations,
                                     max_completion_length=cfg.max_completion_tokens, temperature=cfg.temperature,
                                     reward_weights=weights, beta=0.0, generation_batch_size=cfg.batch * dp.world,
                                     log_completions=False)
                trainer = trl.GRPOTrainer(model=model, reward_funcs=graders, args=args, train_dataset=ds,
                                          processing_class=tok)
            else:
                # plain DPO lowers the rejected answers, and can lower the chosen ones with them (the margin is
                # all it sees): `sft_weight` adds the chosen answers' negative log-likelihood, as RPO does
                # (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 2; TRL's "sft" loss)
                losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight else {}
                args = _trainer_args(trl.DPOConfig, cfg, out, device, beta=cfg.beta,
                                     max_length=cfg.max_prompt_tokens + cfg.max_completion_tokens, **losses)
                trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
            from transformers import PrinterCallback, ProgressCallback

            for cb in (PrinterCallback, ProgressCallback):  # progress is reported through on_event
                trainer.remove_callback(cb)
            start = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0
            emit("status", {"text": f"training ({method}, {cfg.steps} steps"
                                    + (f" in {dp.world} processes" if dp.world > 1 else "")
                                    + (f", resuming at step {start})" if start else ")")})
            with _Interrupt() as interrupt:
                trainer.add_callback(_Progress(emit, interrupt, dp).callback)
                try:
                    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
                except KeyboardInterrupt:  # the second Ctrl-C: at once, from the last whole checkpoint
                    interrupted(emit, out)
                    raise
                if interrupt.requested:
                    interrupted(emit, out)
                    raise KeyboardInterrupt
            result.history = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
            model = trainer.model
            if method == "grpo":
                result.reward_after, result.grader_after = mean_reward(model, tok, val_chat, graders, weights, cfg, dp)
                # the completions no grader could score, in all the processes
                failed = dp.sum([float(g.failed) for g in graders])
                result.graded_none = {g.spec: int(n) for g, n in zip(graders, failed) if n}
                emit("reward", {"when": "after", "reward": result.reward_after, "graders": result.grader_after})
            dp.barrier()  # every process is done with the checkpoints
            if dp.rank != 0:  # rank 0 writes the outputs
                result.adapter = None
                return result
            result.seconds = time.perf_counter() - t0
            out.mkdir(parents=True, exist_ok=True)
            with _atomic_dir(out / "adapter") as tmp:
                model.save_pretrained(tmp)
                _copy_tokenizer(base, tok, tmp)
            del trainer, model
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the run is whole in adapter/
            if lora_gguf:
                from ..formats.lora_gguf import write_lora_gguf

                emit("status", {"text": "writing the adapter as a llama.cpp LoRA GGUF"})
                result.lora_gguf = write_lora_gguf(out / "adapter", base.folder / base.gguf_file if base.gguf_file
                                                   else base.folder, out / "adapter.gguf")
            if merge or gguf:
                emit("status", {"text": "merging"})
                result.merged = out / "merged"
                _merge(base, out / "adapter", result.merged, tok, None)
            if gguf:
                emit("status", {"text": f"converting to GGUF ({gguf})"})
                result.gguf = _export_gguf(result.merged, out, gguf, reg_name, reg_tag, quantize_with, check_with,
                                           source=f"tune:{out.resolve()}")
                result.registered = f"{reg_name}:{reg_tag}"
    finally:
        dp.close()
    result.plot = _plot(result, out / "training.png")
    write_text(out / "metrics.json", json.dumps({"result": result.to_dict(), "config": asdict(cfg),
                                                 "history": result.history}, indent=1, default=str) + "\n")
    _record(result, cfg)
    return result


@contextmanager
def _quiet_datasets():
    """TRL's "Tokenizing train dataset" bars (the datasets library's) would cut into llmdesk's output."""
    import datasets

    on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if on:
            datasets.enable_progress_bars()


def interrupted(emit, out: Path) -> None:
    ckpt = last_checkpoint(out)
    emit("interrupted", {"step": int(ckpt.name.rsplit("-", 1)[1]) if ckpt else None,
                         "checkpoint": str(ckpt) if ckpt else None})


def _plot(result: RewardResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    h = result.history
    keys = ["loss"] + (["reward"] if result.method == "grpo" else [])
    keys += sorted({k for r in h for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    fig, axes = plt.subplots(1, 2 if result.method == "grpo" else 1, figsize=(10 if result.method == "grpo" else 6, 4),
                             squeeze=False)
    for k in keys:
        pts = [(r["step"], r[k]) for r in h if k in r and r[k] is not None and not math.isnan(r[k])]
        if not pts:
            continue
        ax = axes[0][0] if k == "loss" else axes[0][-1]
        ax.plot(*zip(*pts), label=k.removeprefix("rewards/").removesuffix("/mean"))
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend()
    axes[0][0].set_title(f"{result.method} loss")
    if result.method == "grpo":
        axes[0][-1].set_title("mean reward (and each grader's)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _record(result: RewardResult, cfg: RewardConfig) -> None:
    from ..store import results

    results.record(result.method, model=result.registered or str(result.out_dir), model_sha256=None,
                   data_sha256=None, settings={"base": result.base, **asdict(cfg)},
                   metrics={k: v for k, v in result.to_dict().items()
                            if k in ("steps", "train_rows", "val_rows", "reward_before", "reward_after", "seconds")})
