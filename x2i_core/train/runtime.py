"""The trainer runtime shared by distillation, LightControl and LoRA training.

* config: a YAML file + ``key.sub=value`` overrides over a dict of defaults;
* distributed: ``torch.distributed`` (env:// as set by torchrun; gloo on CPU,
  nccl on CUDA), world/rank helpers, DDP wrapping;
* checkpoints: ``checkpoints/step-XXXXXXXX/`` folders written in a temporary
  sibling and renamed into place (a killed write never leaves a folder that
  looks complete), keep-last-N, resume from the newest;
* logging: a CSV of per-step metrics rewritten on resume so it continues
  exactly, optional TensorBoard, tqdm progress on rank 0;
* optimisers and schedules: AdamW (or bitsandbytes' 8-bit AdamW when asked
  for and installed), cosine with warmup.

Randomness that matters for exactness (noise, timesteps) is derived from
``(seed, global step, sample index)`` - never from a global RNG - so a resumed
run and an uninterrupted one draw identical numbers, on any number of ranks.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
from typing import Any, Mapping

import torch

from ..errors import X2IFileError, X2IInputError

log = logging.getLogger("x2i")


# -- config ---------------------------------------------------------------------
def deep_update(base: dict, other: Mapping) -> dict:
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def run_trainer(trainer_cls, defaults: Mapping, config_path: str | None, overrides: list[str] | None) -> str:
    """Config file + overrides -> trainer -> fit; the path of the trained file."""
    trainer = trainer_cls(load_config(defaults, config_path, overrides))
    try:
        return trainer.fit()
    finally:
        trainer.close()


def load_config(defaults: Mapping, path: str | None = None, overrides: list[str] | None = None) -> dict:
    import yaml

    cfg = copy.deepcopy(dict(defaults))
    if path:
        if not os.path.isfile(path):
            raise X2IInputError(f"config file '{path}' does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise X2IInputError(f"config file '{path}' is not valid YAML ({exc})") from exc
        if not isinstance(data, Mapping):
            raise X2IInputError(f"config file '{path}' must hold a mapping of settings")
        _check_keys(defaults, data, "")
        deep_update(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise X2IInputError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = cfg
        parts = key.split(".")
        ref = defaults
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise X2IInputError(f"override key {key!r}: {p!r} is not a section")
            node = node[p]
            ref = ref.get(p, {}) if isinstance(ref, Mapping) else {}
        if isinstance(ref, Mapping) and ref and parts[-1] not in ref:
            raise X2IInputError(f"override key {key!r} is unknown; known here: {sorted(ref)}")
        node[parts[-1]] = value
    return cfg


def _check_keys(defaults: Mapping, data: Mapping, prefix: str) -> None:
    for k, v in data.items():
        if k not in defaults:
            raise X2IInputError(f"config key '{prefix}{k}' is unknown; known: {sorted(defaults)}")
        if isinstance(v, Mapping) and isinstance(defaults[k], Mapping) and defaults[k]:
            _check_keys(defaults[k], v, f"{prefix}{k}.")


# -- distributed -------------------------------------------------------------------
class Dist:
    """Rank/world info; initialises torch.distributed when launched by torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def step_generator(seed: int, step: int, index: int, device="cpu") -> torch.Generator:
    """A generator for one sample of one step, independent of ranks and resumes."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) * 1_000_003 + int(index))
    return g


# -- trainer set-up shared by the trainers -------------------------------------------
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_trainer(trainer, cfg: dict, required: tuple[str, ...]) -> None:
    """Checks and attributes every trainer needs: ``dist``, ``out``, ``tcfg``, ``global_batch``,
    ``local_batch``, ``device``, ``weight_dtype`` (errors name the config key)."""
    trainer.cfg = cfg
    trainer.dist = Dist()
    for key in required:
        if not cfg.get(key):
            raise X2IInputError(f"config needs '{key}'")
    trainer.out = check_output_dir(cfg["output_dir"])
    trainer.tcfg = cfg["train"]
    trainer.global_batch = int(trainer.tcfg["batch_size"])
    if trainer.global_batch < 1 or trainer.global_batch % trainer.dist.world:
        raise X2IInputError(f"train.batch_size {trainer.global_batch} (global) must be a positive multiple of the "
                            f"{trainer.dist.world} processes")
    trainer.local_batch = trainer.global_batch // trainer.dist.world
    trainer.device = trainer.dist.device
    mp = trainer.tcfg["mixed_precision"]
    if mp not in WEIGHT_DTYPES:
        raise X2IInputError(f"train.mixed_precision {mp!r}: expected no, bf16 or fp16")
    trainer.weight_dtype = WEIGHT_DTYPES[mp]


def trainer_state(trainer, step: int, **extra) -> dict:
    """What a checkpoint stores besides the trained weights."""
    return {"step": step, "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "global_batch": trainer.global_batch, **extra}


def load_trainer_state(folder: str, optimizer, scheduler, global_batch: int) -> dict:
    """Restore optimizer and schedule from a checkpoint folder; returns the stored state (with its step)."""
    state = load_state(os.path.join(folder, "trainer_state.pt"))
    if int(state.get("global_batch", global_batch)) != global_batch:
        raise X2IInputError(f"checkpoint {folder} was trained with global batch {state['global_batch']}, this run "
                            f"uses {global_batch}; keep train.batch_size to resume exactly")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def optimize(trainer, loss: torch.Tensor, params) -> dict:
    """Backward, clip to ``train.max_grad_norm``, optimizer and schedule step; the metrics of the step."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, float(trainer.tcfg["max_grad_norm"]))
    trainer.optimizer.step()
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.scheduler.step()
    return {"loss": float(loss.detach()), "grad_norm": float(gnorm), "lr": float(lr)}


def run_steps(trainer, start: int, total: int, metrics: "MetricsLog", desc: str, step_fn, save_fn,
              after_step=None) -> None:
    """The loop every trainer shares: step, mean loss over ranks, log, progress, periodic checkpoints,
    then a final checkpoint at ``total``."""
    import time

    from tqdm import tqdm

    every = int(trainer.cfg["checkpoint"]["every"])
    log_every = max(1, int(trainer.cfg["log"]["every"]))
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
            if every and done % every == 0 and done < total:
                save_fn(done)
            if after_step is not None:
                after_step(done)
        save_fn(total)
    finally:
        bar.close()


def save_checkpoint(trainer, ckpt: "CheckpointManager", step: int, writer) -> None:
    """Rank 0 writes ``writer(folder)`` atomically; every rank waits for it."""
    if trainer.dist.main:
        ckpt.save(step, writer)
    trainer.dist.barrier()


# -- output folder ----------------------------------------------------------------
def check_output_dir(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise X2IInputError(f"output folder '{path}' cannot be created ({exc.strerror})") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise X2IInputError(f"output folder '{path}' is not writable ({exc.strerror})") from exc
    return path


# -- checkpoints ------------------------------------------------------------------
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointManager:
    """``output/checkpoints/step-XXXXXXXX/`` with atomic writes and keep-last-N."""

    def __init__(self, output_dir: str, keep_last: int = 3):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = max(1, int(keep_last))

    def steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.root) if (m := _STEP_DIR.match(name)))

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, writer) -> str:
        """``writer(tmp_dir)`` fills a temporary folder that is then renamed into place."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):  # leftovers of a killed write
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=self.root)
        try:
            writer(tmp)
            if os.environ.get("X2I_TEST_CRASH") == f"checkpoint:{step}":  # fault injection for resume tests
                os.kill(os.getpid(), signal.SIGKILL)
            _fsync_tree(tmp)
            final = self.path(step)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.steps()[:-self.keep_last]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def save_state(path: str, state: dict) -> None:
    """Optimizer / scheduler / counters: plain tensors and containers (weights-only loadable)."""
    torch.save(state, path)


def load_state(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable checkpoint the same way
        raise X2IFileError(f"checkpoint state '{path}' cannot be read ({exc})") from exc


# -- metrics ------------------------------------------------------------------------
class MetricsLog:
    """A CSV of per-step metrics that resumes exactly (rows after the resume step are dropped)."""

    def __init__(self, output_dir: str, fields: list[str], resume_step: int | None, enabled: bool = True,
                 tensorboard: bool = False):
        self.path = os.path.join(output_dir, "metrics.csv")
        self.fields = ["step", *fields]
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.fh, fieldnames=self.fields)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.csv only")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.writer.writerow({"step": step, **{k: (repr(v) if isinstance(v, float) else v) for k, v in values.items()}})
        self.fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(output_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(output_dir, "metrics.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- optimisation -------------------------------------------------------------------
def make_optimizer(params, name: str, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise X2IInputError("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes, CUDA only)") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise X2IInputError(f"optimizer {name!r} is unknown; expected adamw or adamw8bit")


def cosine_with_warmup(optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_eval_report(output_dir: str, start: float | None, end: float, **extra) -> None:
    """``eval.json``: the fixed-noise loss before training (kept from the first run on resume) and now."""
    path = os.path.join(output_dir, "eval.json")
    prev = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            prev = json.load(fh)
    write_json(path, {"fixed_noise_loss_start": start if start is not None else prev.get("fixed_noise_loss_start"),
                      "fixed_noise_loss_end": end, **extra})


def write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
