"""More than one process: `llmdesk tune` data parallel, or sharded (FSDP), under `accelerate launch`,
torchrun or `--processes N`.

Every process loads the data and computes the same batches (a pure function of (seed, step)); of
each micro-batch of batch*P examples, process r trains examples r, r+P, ... Its loss is divided by
the trained tokens of the whole step, so the gradients summed over the processes are the
single-process gradient of the same examples, and every process applies the same update.

- Data parallel (the default): every process holds the whole model; the gradients are summed in
  one flat all-reduce a step.
- Sharded (`--fsdp`, or accelerate's FSDP config: ACCELERATE_USE_FSDP): PyTorch's FSDP2
  (`fully_shard`) over one mesh of all the processes, one unit per decoder layer and one for the
  rest (embeddings, final norm, output head); each process keeps 1/P of every parameter, of its
  gradient and of its optimizer state, gathers a layer's weights just before the layer runs and
  drops them after, and the gradients are reduce-scattered (summed, not averaged: the loss is
  already divided by the whole step's tokens). It runs with gloo on CPU and NCCL on GPUs.

The outputs (adapter, merged model, GGUF) hold full tensors either way, gathered for rank 0 when
sharded, so they do not depend on how the run was made; only rank 0 writes them. A sharded
checkpoint is a shard a process (rank 0's `checkpoint.pt`, the others' `checkpoint.rankR.stepS.pt`
beside it), so that no process ever holds the whole training state. Alone (no WORLD_SIZE, or 1),
nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmdesk.errors import LlmdeskError


def process_rank() -> int:
    """This process's rank among those `accelerate launch` started (0 when run alone)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


class DataParallel:
    """The processes of one run, as `accelerate launch` (or torchrun) describes them in the
    environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `fsdp` shards the model
    over them (also when accelerate's FSDP config set ACCELERATE_USE_FSDP)."""

    def __init__(self, fsdp: bool = False) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = process_rank()
        self.fsdp = fsdp or (self.world > 1 and _env_flag("ACCELERATE_USE_FSDP"))
        self.started = False
        if self.fsdp and self.world == 1:
            raise LlmdeskError("--fsdp shards the model over several processes: add --processes N (or start "
                               "the command with accelerate launch or torchrun)")

    def start(self) -> None:
        if self.world == 1:
            return
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            raise LlmdeskError("llmdesk tune does not run DeepSpeed (ZeRO); for sharding use FSDP: '--fsdp', or "
                               "'accelerate config' with FSDP instead of DeepSpeed")
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.started = True

    # -- sharding ----------------------------------------------------------------------------

    def shard(self, model, root) -> None:
        """FSDP2 on `model` (a transformers model: its `_no_split_modules` name the decoder layer
        class, as accelerate's FSDP auto-wrap reads them), then on `root`, the module the loop calls
        (which holds the rest: embeddings, norm, output head). A no-op unless sharding."""
        if not self.fsdp:
            return
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        kinds = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in kinds]
        if not layers:
            raise LlmdeskError(f"--fsdp: {type(model).__name__} does not name its decoder layers "
                               "(_no_split_modules), so it cannot be sharded layer by layer; train without --fsdp")
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (self.world,))
        for m in [*layers, root]:
            fully_shard(m, mesh=mesh)
            m.set_gradient_divide_factor(1.0)  # summed: the loss is already divided by the step's tokens
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

    def param_bytes(self, model) -> int:
        """The bytes of parameters this process holds (its shards when sharded)."""
        from torch.distributed.tensor import DTensor

        return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                   for p in model.parameters())

    def gather(self, t):
        """The full tensor on CPU (an all-gather of a sharded one: every process must call it, in
        the same order); the tensor itself otherwise."""
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            t = t.full_tensor()
        return t.detach().cpu()

    # -- checkpoints: a shard a process when sharded ---------------------------------------------

    def trained_state(self, model, opt) -> tuple[dict, dict]:
        """(trainable weights by name, the optimizer's state_dict): this process's shards when
        sharded (plain tensors), else the tensors themselves."""
        from torch.distributed.tensor import DTensor

        local = lambda t: t.to_local().detach().clone() if isinstance(t, DTensor) else t.detach()  # noqa: E731
        weights = {k: local(v) for k, v in model.named_parameters() if v.requires_grad}
        state = opt.state_dict()
        state = {**state, "state": {i: {k: local(v) if hasattr(v, "detach") else v for k, v in st.items()}
                                    for i, st in state["state"].items()}}
        return weights, state

    def shard_path(self, ckpt: Path, step: int) -> Path:
        """Where this process keeps its shard of the checkpoint of `step` (rank 0's is in `ckpt`)."""
        return ckpt.with_name(f"{ckpt.stem}.rank{self.rank}.step{step}{ckpt.suffix}")

    def drop_old_shards(self, ckpt: Path, step: int) -> None:
        """Once rank 0 has written the checkpoint of `step`, the other steps' shards are not needed."""
        for f in ckpt.parent.glob(f"{ckpt.stem}.rank*.step*{ckpt.suffix}"):
            if not f.name.endswith(f".step{step}{ckpt.suffix}"):
                f.unlink(missing_ok=True)

    def own_shard(self, ckpt: Path, state: dict) -> dict:
        """A checkpoint as this process resumes it: rank 0's file, with this process's own
        weights and optimizer state when sharded. One line when it was sharded and this run is not,
        or the other way round."""
        if bool(state.get("fsdp")) != self.fsdp:
            how = "with --fsdp (a shard a process)" if state.get("fsdp") else "without --fsdp"
            raise LlmdeskError(f"{ckpt}: was trained {how}; resume it the same way")
        if not self.fsdp or self.rank == 0:
            return state
        import torch

        path = self.shard_path(ckpt, state["step"])
        if not path.is_file():
            raise LlmdeskError(f"{path}: missing (process {self.rank}'s part of the checkpoint of step "
                               f"{state['step']}); this checkpoint cannot be resumed")
        shard = torch.load(path, map_location="cpu", weights_only=False)
        return {**state, "weights": shard["weights"], "optimizer": shard["optimizer"]}

    def load_trained_state(self, model, opt, params: list, weights: dict, optimizer: dict) -> None:
        """What `trained_state` saved, back into the model and the optimizer (over `params`)."""
        if not self.fsdp:
            model.load_state_dict(weights, strict=False)
            opt.load_state_dict(optimizer)
            return
        import torch
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.to_local().copy_(weights[name])

        def like(v, p):  # a state tensor's shard, as a shard of the whole (AdamW's moments)
            if hasattr(v, "dim") and v.dim() > 0:
                return DTensor.from_local(v.to(p.dtype), p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())
            return v

        opt.load_state_dict({**optimizer, "state": {i: {k: like(v, params[int(i)]) for k, v in st.items()}
                                                    for i, st in optimizer["state"].items()}})

    # -- data parallel -------------------------------------------------------------------------

    def share(self, examples: list) -> list:
        return examples[self.rank:: self.world]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def all_objects(self, obj) -> list:
        """`obj` (picklable) of every process, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        got: list = [None] * self.world
        dist.all_gather_object(got, obj)
        return got

    def sum_grads(self, params: list) -> None:
        """The gradients summed over the processes, in one flat all-reduce (a process whose share
        of the step was empty adds zeros). Sharded, FSDP has reduce-scattered them already."""
        if self.world == 1 or self.fsdp:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        i = 0
        for p in params:
            n = p.numel()
            p.grad = flat[i: i + n].view_as(p).to(p.dtype)
            i += n

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def _device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def launch(processes: int, tune_args: list[str]) -> int:
    """`llmdesk tune TUNE_ARGS` in `processes` processes on this machine, as `accelerate launch`
    or torchrun would start them (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; one a GPU
    where there are GPUs, else the cores shared out). They share the terminal, so Ctrl-C reaches
    each; when one fails the others are given a moment to fail the same way (and say so once,
    from rank 0), then stopped. Returns the first non-zero exit code, else 0."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sk:  # a free port for the processes to meet on
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    cmd = [sys.executable, "-m", "llmdesk.cli.main", "tune", *tune_args]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]
    failed_at = None
    while True:
        try:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return next((c for c in codes if c), 0)
            if failed_at is None and any(c for c in codes if c is not None):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 20:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.2)
        except KeyboardInterrupt:  # the processes got it too: they stop after the step in flight
            continue

