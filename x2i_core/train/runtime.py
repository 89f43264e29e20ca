"""The trainer runtime shared by distillation, LightControl and LoRA training.

* config: a YAML file + ``key.sub=value`` overrides over a dict of defaults;
* distributed: ``torch.distributed`` (env:// as set by torchrun; gloo on CPU,
  nccl on CUDA), world/rank helpers, DDP wrapping;
* checkpoints: ``checkpoints/step-XXXXXXXX/`` folders written in a temporary
  sibling, sealed by a ``manifest.json`` of sizes and sha256s and renamed into
  place (a killed write never leaves a folder that looks complete); resume
  from the newest one that verifies (a damaged one is reported and skipped),
  keep-last-N counting only usable ones (see ``CheckpointManager``);
* logging: a CSV of per-step metrics rewritten on resume so it continues
  exactly, optional TensorBoard, tqdm progress on rank 0;
* optimisers and schedules: AdamW (or bitsandbytes' 8-bit AdamW when asked
  for and installed), cosine with warmup.

Randomness that matters for exactness (noise, timesteps) is derived from
``(seed, global step, sample index)`` - never from a global RNG - so a resumed
run and an uninterrupted one draw identical numbers, on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import uuid
from typing import Any, Mapping

import torch

from ..errors import X2IFileError, X2IInputError
from ..io import atomic_write_json, make_temp_dir

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
    _normalise(defaults, cfg, "")
    return cfg


# Spellings of "off", in a YAML file or on the command line (YAML reads no/off/false as False, null/~ as None).
OFF_WORDS = ("no", "false", "none", "off", "null")
# Settings with a fixed set of values, one of which means off: key -> (canonical off value, other values, aliases).
CHOICES = {
    "train.mixed_precision": ("no", ("bf16", "fp16"), {"fp32": "no"}),
    "checkpoint.resume": ("never", ("auto",), {"never": "never"}),
}


def _is_off(value) -> bool:
    return value is False or value is None or (isinstance(value, str) and value.strip().lower() in OFF_WORDS)


def _normalise(defaults: Mapping, cfg: dict, prefix: str) -> None:
    """One spelling per value: booleans from yes/no/true/false/on/off/1/0, the listed choices (each with
    its "off" spellings), and ``None`` for an off-spelling of a setting that defaults to ``None``."""
    for k, default in defaults.items():
        key, value = f"{prefix}{k}", cfg.get(k)
        if isinstance(default, Mapping) and default and isinstance(value, dict):
            _normalise(default, value, key + ".")
        elif key in CHOICES:
            off, values, aliases = CHOICES[key]
            word = value.strip().lower() if isinstance(value, str) else value
            if _is_off(word):
                cfg[k] = off
            elif word in values or word in aliases:
                cfg[k] = aliases.get(word, word)
            else:
                spelled = ", ".join([f"{off} (or {' / '.join(w for w in OFF_WORDS + tuple(aliases) if w != off)})",
                                     *values])
                raise X2IInputError(f"{key} {value!r}: expected one of {spelled}")
        elif isinstance(default, bool):
            cfg[k] = _as_bool(key, value)
        elif default is None and _is_off(value):
            cfg[k] = None


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if value is not None else "none"
    if word in ("yes", "true", "on", "1"):
        return True
    if word in OFF_WORDS or word == "0":
        return False
    raise X2IInputError(f"{key} {value!r}: expected true or false (also yes/no, on/off, 1/0)")


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
    mp = trainer.tcfg["mixed_precision"]  # load_config has mapped the other spellings (false, none, fp32, ...)
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
    if trainer.cfg["checkpoint"]["resume"] in ("never", False, None):  # load_config maps no / off / none
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
    n = trainer.tcfg.get("gradient_accumulation", 1)
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
    gnorm = torch.nn.utils.clip_grad_norm_(params, float(trainer.tcfg["max_grad_norm"]))
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
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "x2i-checkpoint"


class X2ICheckpointError(X2IFileError):
    """A checkpoint folder is corrupt or unusable (its message names the file, the expected and the found)."""


def _test_crash(point: str) -> None:
    """Fault injection for the resume tests: SIGKILL this process at ``point`` when ``X2I_TEST_CRASH`` names it.

    ``step:N`` - after the optimizer update (and metrics row) of step N, before its checkpoint;
    ``checkpoint:N[:PHASE]`` - while checkpoint N is written, PHASE one of ``begin`` (temporary folder
    made, nothing in it), ``written`` (the default: every file written, no manifest yet), ``manifest``
    (manifest written and synced, not yet renamed into place), ``renamed`` (in place, older ones not
    pruned), ``torn`` (in place, then its largest file cut to half its size - a write the disk lost;
    see :meth:`CheckpointManager.save`), ``pruning`` (the first pruned folder moved out of view but not
    deleted, or after pruning when there is nothing to prune).
    """
    spec = os.environ.get("X2I_TEST_CRASH")
    if not spec:
        return
    if re.fullmatch(r"checkpoint:\d+", spec):
        spec += ":written"
    if spec == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative, ``/``-separated, sorted), the manifest excluded."""
    out = []
    for base, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    for base, _dirs, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(base)


class CheckpointManager:
    """``output/checkpoints/step-XXXXXXXX/`` with atomic, verifiable writes and keep-last-N.

    Each folder is filled under a temporary ``.tmp-*`` name; ``manifest.json`` (the size and sha256 of
    every other file) is written last, everything is fsynced, and only then is the folder renamed into
    place - so a folder named ``step-*`` is either complete or damaged *after* it was written (a lost
    write, a bad disk, a hand edit), which :meth:`verify` detects.  :meth:`resume` loads the newest
    checkpoint that verifies, falling back past damaged ones; pruning keeps the ``keep_last`` newest
    *usable* checkpoints (damaged ones are never counted, and deleted), so a damaged newer folder never
    costs a good older one.  Folders without a manifest (written before manifests existed) are *legacy*:
    they are accepted if they load, unverified.
    """

    def __init__(self, output_dir: str, keep_last: int = 3, quiet: bool = False):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = max(1, int(keep_last))
        self.quiet = quiet  # no log lines (the ranks other than 0)
        self._verified: dict[str, tuple] = {}  # folder -> (name, size, mtime_ns) of files that verified

    def steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.root) if (m := _STEP_DIR.match(name)))

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    # -- verification --------------------------------------------------------------
    def _signature(self, folder: str) -> tuple:
        sig = []
        for rel in [*_files(folder), MANIFEST]:
            st = os.stat(os.path.join(folder, rel))
            sig.append((rel, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def verify(self, step: int) -> str:
        """``'verified'`` when every file matches the manifest, ``'legacy'`` for a folder without one
        (nothing to check against: :meth:`resume` verifies it by loading); raises
        :class:`X2ICheckpointError` naming the file, what the manifest expects and what was found."""
        folder = self.path(step)
        where = f"checkpoint {folder}"
        if not os.path.isdir(folder):
            raise X2ICheckpointError(f"{where} does not exist")
        mpath = os.path.join(folder, MANIFEST)
        if not os.path.exists(mpath):
            return "legacy"
        try:
            if self._verified.get(folder) == self._signature(folder):
                return "verified"
        except OSError:
            pass
        try:
            with open(mpath, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' cannot be read: expected the JSON manifest "
                                     f"written with the checkpoint, found {type(exc).__name__}: {exc}") from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
                or not all(isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values())):
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' is malformed: expected format "
                                     f"'{MANIFEST_FORMAT}' with a size and sha256 per file, found "
                                     f"{json.dumps(manifest)[:200]}")
        if manifest.get("step") != step:
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' names step {manifest.get('step')!r}, "
                                     f"expected {step} (the folder's name)")
        if not files:
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' lists no files, expected the checkpoint's "
                                     f"weights and trainer state")
        for rel, want in sorted(files.items()):
            p = os.path.join(folder, *rel.split("/"))
            if not os.path.isfile(p):
                raise X2ICheckpointError(f"checkpoint file '{p}' is missing: expected {want['size']} bytes "
                                         f"(sha256 {want['sha256'][:16]}…) as listed in {MANIFEST}, found no file")
            try:
                size = os.path.getsize(p)
                if size != want["size"]:
                    raise X2ICheckpointError(f"checkpoint file '{p}' is truncated or overwritten: expected "
                                             f"{want['size']} bytes as listed in {MANIFEST}, found {size} bytes")
                digest = _sha256(p)
            except OSError as exc:
                raise X2ICheckpointError(f"checkpoint file '{p}' cannot be read: expected {want['size']} readable "
                                         f"bytes as listed in {MANIFEST}, found {exc.strerror or exc}") from exc
            if digest != want["sha256"]:
                raise X2ICheckpointError(f"checkpoint file '{p}' is corrupt: expected sha256 {want['sha256']} "
                                         f"as listed in {MANIFEST}, found {digest} ({size} bytes, sizes agree)")
        try:
            self._verified[folder] = self._signature(folder)
        except OSError:
            pass
        return "verified"

    def usable(self, step: int) -> bool:
        """Counts for keep-last pruning: verified, or legacy (only loading could tell more)."""
        try:
            self.verify(step)
            return True
        except X2ICheckpointError:
            return False

    def resume(self, load_fn) -> int | None:
        """Restore the newest usable checkpoint: ``load_fn(folder)`` reads and applies it and returns its step.

        Folders are tried newest first.  One that fails :meth:`verify`, or whose ``load_fn`` raises
        :class:`~x2i_core.errors.X2IFileError` (a legacy folder with an unreadable file), or whose stored
        step differs from its name, is logged as a warning naming the folder and the problem, and the
        previous one is tried; nothing is deleted here.  ``load_fn`` should read every file before it
        applies any, and must fully overwrite what it restores (a later candidate replaces a failed one).

        Returns ``None`` when there is no checkpoint folder at all (a fresh start).  When folders exist
        but *none* is usable, raises :class:`X2ICheckpointError` listing each folder and its problem
        instead of silently starting over: the damage may be transient (a flaky mount) and a fresh run
        would prune the folders.  Set ``checkpoint.resume=never`` to start from scratch deliberately.
        """
        steps = self.steps()
        problems = []
        for step in reversed(steps):
            folder = self.path(step)
            try:
                kind = self.verify(step)
                loaded = int(load_fn(folder))
                if loaded != step:
                    raise X2ICheckpointError(f"checkpoint {folder}: its trainer state says step {loaded}, "
                                             f"expected {step} (the folder's name)")
            except X2IFileError as exc:
                problems.append(f"{os.path.basename(folder)}: {exc}")
                if not self.quiet:
                    log.warning("checkpoint %s is unusable, trying the previous one: %s", folder, exc)
                continue
            if not self.quiet:
                if kind == "legacy":
                    log.warning("checkpoint %s has no %s (written by an older version): it loaded, but its files "
                                "are not checksum-verified", folder, MANIFEST)
                if problems:
                    log.warning("resuming from %s (step %d) instead of the newest checkpoint step-%08d, which is "
                                "unusable", folder, step, steps[-1])
                else:
                    log.info("resuming from %s (step %d)", folder, step)
            return step
        if problems:
            raise X2ICheckpointError(
                f"no usable checkpoint in {self.root}: " + "; ".join(problems) +
                ". Move the folders away or set checkpoint.resume=never to start over (new checkpoints then "
                "replace them)")
        return None

    # -- writing ----------------------------------------------------------------------
    def save(self, step: int, writer) -> str:
        """``writer(tmp_dir)`` fills a temporary folder; the manifest follows, then the rename into place
        (a same-step folder already there is moved aside first), then keep-last pruning."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):  # leftovers of a killed write or prune
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        tmp = make_temp_dir(f".tmp-step-{step:08d}-", self.root)
        final = self.path(step)
        try:
            _test_crash(f"checkpoint:{step}:begin")
            writer(tmp)
            _test_crash(f"checkpoint:{step}:written")
            self._write_manifest(tmp, step)
            _fsync_tree(tmp)
            _test_crash(f"checkpoint:{step}:manifest")
            if os.path.exists(final):  # e.g. a damaged folder being redone: out of view, then replaced
                os.replace(final, self._aside("replaced", step))
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._verified[final] = self._signature(final)
        _test_crash(f"checkpoint:{step}:renamed")
        if os.environ.get("X2I_TEST_CRASH") == f"checkpoint:{step}:torn":
            victim = max(_files(final), key=lambda rel: (os.path.getsize(os.path.join(final, rel)), rel))
            with open(os.path.join(final, victim), "r+b") as fh:
                fh.truncate(os.path.getsize(os.path.join(final, victim)) // 2)
            _test_crash(f"checkpoint:{step}:torn")
        self.prune(keep=step, crash_point=f"checkpoint:{step}:pruning")
        return final

    def _aside(self, why: str, step: int) -> str:
        """A fresh ``.tmp-*`` name to move a folder to before deleting it (swept by the next save)."""
        return os.path.join(self.root, f".tmp-{why}-{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _write_manifest(self, folder: str, step: int) -> None:
        files = {}
        for rel in _files(folder):
            p = os.path.join(folder, *rel.split("/"))
            files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
        if not files:
            raise X2ICheckpointError(f"checkpoint {step}: the writer left no files in {folder}")
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump({"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())

    def prune(self, keep: int | None = None, crash_point: str | None = None) -> list[int]:
        """Delete all but the ``keep_last`` newest usable checkpoints (``keep``, the one just written, always
        stays); damaged folders are not counted and are deleted too.  Returns the steps deleted."""
        kept = {keep} if keep is not None else set()
        doomed = []
        for s in reversed(self.steps()):
            if s in kept:
                continue
            if len(kept) < self.keep_last and self.usable(s):
                kept.add(s)
            else:
                doomed.append(s)
        for s in doomed:
            folder = self.path(s)
            aside = self._aside("pruned", s)
            try:
                os.replace(folder, aside)  # out of view at once: never a half-deleted step-* folder
            except OSError:
                continue
            self._verified.pop(folder, None)
            if crash_point:
                _test_crash(crash_point)
                crash_point = None
            shutil.rmtree(aside, ignore_errors=True)
        if crash_point:
            _test_crash(crash_point)
        return sorted(doomed)


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
    atomic_write_json(path, data)
