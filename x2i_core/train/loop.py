"""The set-up and the step loop every trainer shares: config checks, accumulation, optimiser steps,
logging, periodic checkpoints, resume."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import X2IInputError
from .checkpoints import CheckpointManager, X2ICheckpointError, _test_crash, check_output_dir, load_state
from .distributed import Dist
from .metrics import MetricsLog

# -- trainer set-up shared by the trainers -------------------------------------------
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_trainer(trainer, cfg, required: tuple[str, ...]) -> None:
    """Checks and attributes every trainer needs: ``dist``, ``out``, ``tcfg``, ``global_batch``,
    ``local_batch``, ``device``, ``weight_dtype`` (errors name the config key)."""
    trainer.cfg = cfg
    trainer.dist = Dist()
    for key in required:
        if not getattr(cfg, key):
            raise X2IInputError(f"config needs '{key}'")
    trainer.out = check_output_dir(cfg.output_dir)
    trainer.tcfg = cfg.train
    trainer.global_batch = int(trainer.tcfg.batch_size)
    if trainer.global_batch < 1 or trainer.global_batch % trainer.dist.world:
        raise X2IInputError(f"train.batch_size {trainer.global_batch} (global) must be a positive multiple of the "
                            f"{trainer.dist.world} processes")
    trainer.local_batch = trainer.global_batch // trainer.dist.world
    trainer.device = trainer.dist.device
    mp = trainer.tcfg.mixed_precision  # load_config has mapped the other spellings (false, none, fp32, ...)
    if mp not in WEIGHT_DTYPES:
        raise X2IInputError(f"train.mixed_precision {mp!r}: expected no, bf16 or fp16")
    trainer.weight_dtype = WEIGHT_DTYPES[mp]
    accumulation(trainer)  # a bad value is refused before any model loads


def check_alignnet(trainer, name: str) -> None:
    """The trainer's AlignNet fits its MLLM (one check for every caller, an X2IShapeError); the encoder then
    pads as the AlignNet was trained (its recorded pad rows)."""
    from ..registry import check_fits, identity_of

    net, enc = trainer.alignnet, trainer.encoder
    check_fits(net.provenance, net.config.in_channels, net.config.input_dim, identity_of(enc), f"AlignNet '{name}'")
    if net.provenance is not None and net.provenance.pad_rows:
        enc.pad_rows = net.provenance.pad_rows


def trainer_state(trainer, step: int, **extra) -> dict:
    """What a checkpoint stores besides the trained weights."""
    return {"step": step, "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "global_batch": trainer.global_batch, **extra}


def read_trainer_state(folder: str, global_batch: int) -> dict:
    """Read (not apply) ``trainer_state.pt`` of a checkpoint folder; checks it is whole and fits this run."""
    path = os.path.join(folder, "trainer_state.pt")
    state = load_state(path)
    missing = [k for k in ("step", "optimizer", "scheduler") if not isinstance(state, dict) or k not in state]
    if missing:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise X2ICheckpointError(f"checkpoint state '{path}' is incomplete: expected the keys step, optimizer and "
                                 f"scheduler, found {found}")
    if int(state.get("global_batch", global_batch)) != global_batch:
        raise X2IInputError(f"checkpoint {folder} was trained with global batch {state['global_batch']}, this run "
                            f"uses {global_batch}; keep train.batch_size to resume exactly")
    return state


def resume_trainer(trainer, ckpt: "CheckpointManager", read_weights, apply_weights) -> dict | None:
    """Resume ``trainer`` from the newest usable checkpoint (see :meth:`CheckpointManager.resume`) unless
    ``checkpoint.resume`` is off.  ``read_weights(folder)`` reads the trained weights; they are applied with
    ``apply_weights(weights)`` only after the trainer state has been read too, so a damaged folder changes
    nothing.  Returns the stored trainer state (with its ``step``), or None for a fresh start."""
    if trainer.cfg.checkpoint.resume in ("never", False, None):  # load_config maps no / off / none
        return None
    found = {}

    def load(folder):
        weights = read_weights(folder)
        state = read_trainer_state(folder, trainer.global_batch)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        apply_weights(weights)
        found["state"] = state
        return int(state["step"])

    return found["state"] if ckpt.resume(load) is not None else None


def accumulation(trainer) -> int:
    """``train.gradient_accumulation``: micro-batches per optimizer step (1 = none)."""
    n = trainer.tcfg.gradient_accumulation
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise X2IInputError(f"train.gradient_accumulation {n!r}: expected a whole number of at least 1")
    return n


def optimize(trainer, step: int, micro_fn, params) -> dict:
    """One optimizer step over ``train.gradient_accumulation`` micro-batches.

    ``micro_fn(micro, weight)`` runs micro-batch ``micro`` (= ``step * accumulation + i``: the index data and
    noise are drawn for, so accumulating N batches of B equals one batch of N x B) and back-propagates
    ``weight * loss`` itself (a trainer may need a context around backward); it returns ``(loss, extras)``.
    Gradients of all but the last micro-batch are not all-reduced under DDP.  Then clip to
    ``train.max_grad_norm``, optimizer and schedule step; returns the step's metrics (mean loss)."""
    n = accumulation(trainer)
    model = getattr(trainer, "model", None)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    trainer.optimizer.zero_grad(set_to_none=True)
    total, extras = 0.0, {}
    for i in range(n):
        with model.no_sync() if ddp and i < n - 1 else contextlib.nullcontext():
            loss, more = micro_fn(step * n + i, 1.0 / n)
        total += float(loss) / n
        for k, v in (more or {}).items():
            extras[k] = extras.get(k, 0) + v
    gnorm = torch.nn.utils.clip_grad_norm_(params, float(trainer.tcfg.max_grad_norm))
    trainer.optimizer.step()
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.scheduler.step()
    return {"loss": total, "grad_norm": float(gnorm), "lr": float(lr), **extras}


def backward(loss: torch.Tensor, weight: float) -> float:
    """``(weight * loss).backward()``; the loss value (for ``optimize``'s ``micro_fn``)."""
    (loss * weight).backward()
    return float(loss.detach())


def run_steps(trainer, start: int, total: int, metrics: "MetricsLog", desc: str, step_fn, save_fn,
              after_step=None) -> None:
    """The loop every trainer shares: step, mean loss over ranks, log, progress, periodic checkpoints,
    then a final checkpoint at ``total`` (not rewritten by a run resumed from it)."""
    import time

    from tqdm import tqdm

    every = int(trainer.cfg.checkpoint.every)
    log_every = max(1, int(trainer.cfg.log.every))
    bar = tqdm(total=total, initial=start, desc=desc, disable=not trainer.dist.main)
    try:
        for step in range(start, total):
            t0 = time.time()
            info = step_fn(step)
            info["loss"] = trainer.dist.mean(info["loss"])
            info["seconds"] = round(time.time() - t0, 4)
            if step % log_every == 0 or step == total - 1:
                metrics.log(step + 1, **info)
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.4g}")
            done = step + 1
            _test_crash(f"step:{done}")
            if every and done % every == 0 and done < total:
                save_fn(done)
            if after_step is not None:
                after_step(done)
        if start < total or start == 0:  # a run resumed from its final checkpoint has it already
            save_fn(total)
    finally:
        bar.close()


def save_checkpoint(trainer, ckpt: "CheckpointManager", step: int, writer) -> None:
    """Rank 0 writes ``writer(folder)`` atomically; every rank waits for it."""
    if trainer.dist.main:
        ckpt.save(step, writer)
    trainer.dist.barrier()
