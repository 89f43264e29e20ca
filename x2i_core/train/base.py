"""One shape for the three trainers (AlignNet distillation, LoRA, LightControl).

``Trainer(cfg)`` runs the set-up template: the config checks every trainer needs
(:func:`runtime.setup_trainer`: output folder, batch over ranks, device, dtype),
then the subclass's ``_setup()`` (its own checks, before any model loads),
``_load_models()`` and ``_prepare_data()``.  ``fit()`` is the loop template:
checkpoints (resume from the newest one that verifies, atomic saves), the run's
``config.json``, the metrics log, :func:`runtime.run_steps`, and the final
weights file.  A subclass says what its weights are (``weights_name``,
``_write_weights``, ``_read_weights``, ``_apply_weights``), how one step runs
(``step`` or ``_step_fn``) and what else it writes at the end (``_finish``).
"""

from __future__ import annotations

import os

from ..errors import X2IInputError, X2IShapeError
from . import runtime as rt
from .config import Section


class Trainer:
    required: tuple[str, ...] = ("mllm", "alignnet", "flux", "output_dir")  # config keys that must be set
    run_name = "train"                     # the progress bar's label
    weights_name = "weights.safetensors"   # the trained weights, in each checkpoint and as the final file
    metric_columns: tuple[str, ...] = ("loss", "grad_norm", "lr", "seconds")
    write_config = True                    # the run's config.json in the output folder

    def __init__(self, cfg: Section):
        rt.setup_trainer(self, cfg, self.required)
        self._setup()
        self._load_models()
        self._prepare_data()

    # -- hooks ------------------------------------------------------------------------
    def _setup(self) -> None:
        """Trainer-specific config checks, before any model loads."""

    def _load_models(self) -> None:
        raise NotImplementedError

    def _prepare_data(self) -> None:
        raise NotImplementedError

    def _write_weights(self, path: str, step: int) -> None:
        raise NotImplementedError

    def _read_weights(self, folder: str):
        """The trained weights of a checkpoint folder (checked, not yet applied)."""
        raise NotImplementedError

    def _apply_weights(self, weights) -> None:
        raise NotImplementedError

    def _state_extra(self) -> dict:
        """What a checkpoint's trainer state stores besides step, optimiser, scheduler and batch."""
        return {}

    def _write_extra(self, folder: str, step: int) -> None:
        """More files in a checkpoint folder."""

    def _resumed(self, state: dict | None) -> None:
        """Called with the stored trainer state after a resume (None for a fresh start)."""

    def _step_fn(self):
        return self.step

    def _eval_start(self, start: int):
        """Before the first step of a fresh run: the figure the final report compares with (or None)."""
        return None

    def _finish(self, final: str, total: int, eval_start) -> None:
        """Rank 0, after the final weights are written: reports."""

    # -- template ---------------------------------------------------------------------
    def _save(self, ckpt: rt.CheckpointManager, step: int) -> None:
        def writer(folder):
            self._write_weights(os.path.join(folder, self.weights_name), step)
            rt.save_state(os.path.join(folder, "trainer_state.pt"), rt.trainer_state(self, step, **self._state_extra()))
            self._write_extra(folder, step)

        rt.save_checkpoint(self, ckpt, step, writer)

    def _resume(self, ckpt: rt.CheckpointManager) -> int:
        """The newest checkpoint that verifies and loads (a damaged one is reported and the previous one
        used); 0 for a fresh start."""
        state = rt.resume_trainer(self, ckpt, self._read_weights, self._apply_weights)
        self._resumed(state)
        return 0 if state is None else int(state["step"])

    def _after_step(self, done: int) -> None:
        samples = getattr(self.cfg, "samples", None)
        every = int(samples.every) if samples is not None else 0
        if every and done % every == 0 and self.dist.main:
            self.sample(done)

    def fit(self) -> str:
        total = int(self.tcfg.steps)
        ckpt = rt.CheckpointManager(self.out, self.cfg.checkpoint.keep_last, quiet=not self.dist.main)
        start = self._resume(ckpt)
        if self.dist.main and self.write_config:
            rt.write_json(os.path.join(self.out, "config.json"), self.cfg.to_dict())
        metrics = rt.MetricsLog(self.out, list(self.metric_columns), resume_step=start or None,
                                enabled=self.dist.main, tensorboard=bool(self.cfg.log.tensorboard))
        eval_start = self._eval_start(start) if self.dist.main and start == 0 else None
        try:
            rt.run_steps(self, start, total, metrics, self.run_name, self._step_fn(), lambda s: self._save(ckpt, s),
                         self._after_step)
        finally:
            metrics.close()
        final = os.path.join(self.out, self.weights_name)
        if self.dist.main:
            self._write_weights(final, total)
            self._finish(final, total, eval_start)
        self.dist.barrier()
        return final

    def close(self) -> None:
        self.dist.close()


def load_frozen_x2i_and_flux(trainer):
    """The frozen parts the LoRA and LightControl trainers share: the MLLM, its AlignNet (checked to fit it and
    the FLUX transformer) and the VAE -> ``trainer.encoder / alignnet / vae``; returns the FLUX transformer (diffusers folder, or
    ``flux_transformer``: a BFL single file) in the weight dtype, frozen, not yet moved to the device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from ..alignnet import load_alignnet
    from ..mllm import load_mllm

    cfg = trainer.cfg
    flux_dir = cfg.flux
    if not os.path.isdir(os.path.join(flux_dir, "vae")):
        raise X2IInputError(f"FLUX folder '{flux_dir}' has no vae/; expected a diffusers FLUX folder")
    trainer.encoder = load_mllm(cfg.mllm, dtype=trainer.weight_dtype, device=trainer.device)
    trainer.alignnet = load_alignnet(cfg.alignnet, dtype=trainer.weight_dtype, device=trainer.device)
    rt.check_alignnet(trainer, cfg.alignnet)
    trainer.vae = AutoencoderKL.from_pretrained(flux_dir, subfolder="vae",
                                                torch_dtype=trainer.weight_dtype).to(trainer.device)
    trainer.vae.requires_grad_(False).eval()
    if cfg.flux_transformer:
        from ..flux.convert import diffusers_flux_from_bfl
        from ..io import load_weights_file

        sd = load_weights_file(cfg.flux_transformer, what="FLUX").tensors
        flux = diffusers_flux_from_bfl({k: v.float() for k, v in sd.items()}, trainer.weight_dtype)
    else:
        flux = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer", torch_dtype=trainer.weight_dtype)
    a, f = trainer.alignnet.config, flux.config
    if (a.output_dim1, a.output_dim0) != (f.joint_attention_dim, f.pooled_projection_dim):
        raise X2IShapeError(f"AlignNet '{cfg.alignnet}' outputs token/pooled widths {a.output_dim1}/{a.output_dim0}, "
                            f"but the FLUX transformer expects {f.joint_attention_dim}/{f.pooled_projection_dim}; "
                            "use an AlignNet trained for this FLUX")
    return flux.requires_grad_(False)


def make_optimizer_and_schedule(trainer, params) -> None:
    """``trainer.optimizer`` over ``params`` and its cosine schedule with warm-up, from ``train.*``."""
    t = trainer.tcfg
    trainer.optimizer = rt.make_optimizer(params, t.optimizer, float(t.lr), float(t.weight_decay))
    trainer.scheduler = rt.cosine_with_warmup(trainer.optimizer, int(t.warmup_steps), int(t.steps),
                                              float(t.min_lr_ratio))


__all__ = ["Trainer", "load_frozen_x2i_and_flux", "make_optimizer_and_schedule"]
