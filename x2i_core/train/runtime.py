"""The trainer runtime shared by distillation, LightControl and LoRA training, one module per concern
(``config``, ``distributed``, ``checkpoints``, ``metrics``, ``optim``, ``loop``); this module gathers their
public names (``from . import runtime as rt``) and runs a trainer from a config.

* config: typed config dataclasses, read from a YAML file + ``key.sub=value`` overrides;
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

from .checkpoints import (
    MANIFEST,
    MANIFEST_FORMAT,
    CheckpointManager,
    X2ICheckpointError,
    check_output_dir,
    load_state,
    save_state,
)
from .config import OFF_WORDS, Section, load_config
from .distributed import Dist, step_generator
from .loop import (
    WEIGHT_DTYPES,
    accumulation,
    backward,
    check_alignnet,
    optimize,
    read_trainer_state,
    resume_trainer,
    run_steps,
    save_checkpoint,
    setup_trainer,
    trainer_state,
)
from .metrics import MetricsLog, read_metrics, write_eval_report, write_json
from .optim import cosine_with_warmup, make_optimizer


def run_trainer(trainer_cls, schema: type[Section], config_path: str | None, overrides: list[str] | None) -> str:
    """Config file + overrides -> typed config (``schema``) -> trainer -> fit; the path of the trained file."""
    trainer = trainer_cls(load_config(schema, config_path, overrides))
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["MANIFEST", "MANIFEST_FORMAT", "OFF_WORDS", "WEIGHT_DTYPES", "CheckpointManager", "Dist",
           "MetricsLog", "Section", "X2ICheckpointError", "accumulation", "backward", "check_alignnet", "check_output_dir",
           "cosine_with_warmup", "load_config", "load_state", "make_optimizer", "optimize",
           "read_metrics", "read_trainer_state", "resume_trainer", "run_steps", "run_trainer", "save_checkpoint",
           "save_state", "setup_trainer", "step_generator", "trainer_state", "write_eval_report", "write_json"]
