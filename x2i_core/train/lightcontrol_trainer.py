"""Training LightControl (the paper's stage 2) on (source image, instruction, target image) triples.

Frozen FLUX, frozen X2I conditioning of the instruction *with the source image*
(MLLM -> AlignNet), flow-matching loss on the target's latents with
logit-normal sigmas and guidance 3.5; only the LightControl modules train,
fed the source image.  Shares checkpoints / exact resume / metrics with the
other trainers.

    python -m x2i_core train-lightcontrol --config FILE.yaml [key=value ...]

Data: a JSONL of ``{"source", "target", "instruction"}`` (paths relative to the
file), a folder of ``NAME_source.png`` / ``NAME_target.png`` / ``NAME.txt``, or
WebDataset ``.tar`` shards whose samples hold ``source.png``, ``target.png`` and
``txt`` members.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from ..errors import X2IInputError
from . import runtime as rt, samples as sm
from .base import load_frozen_x2i_and_flux, make_optimizer_and_schedule
from .config import CheckpointSection, FluxTrainSection, LogSection, Section, section
from .flux_training import FluxTrainer, flow_matching_loss, stack, to_pixels, vae_latent

log = logging.getLogger("x2i")

@dataclasses.dataclass
class LightControlSection(Section):
    init: str | None = None          # start from this LightControl file
    num_modules: int = 19            # one per FLUX double block (at most the transformer's count)


@dataclasses.dataclass
class TripleDataSection(Section):
    path: str | None = None          # a folder, a .jsonl or a .tar shard (see scan_triples)
    resolution: int = 512


@dataclasses.dataclass
class LightControlTrainSection(FluxTrainSection):
    lr: float = 1e-5


@dataclasses.dataclass
class LightControlTrainingConfig(Section):
    mllm: str | None = None
    alignnet: str | None = None
    flux: str | None = None
    flux_transformer: str | None = None
    output_dir: str | None = None
    seed: int = 0
    preset: str = "auto"
    lightcontrol: LightControlSection = section(LightControlSection)
    data: TripleDataSection = section(TripleDataSection)
    train: LightControlTrainSection = section(LightControlTrainSection)
    checkpoint: CheckpointSection = section(CheckpointSection)
    log: LogSection = section(LogSection)


def scan_triples(path: str) -> list[dict]:
    """``[{"source": ImageSource, "target": ImageSource, "instruction": str, "name": str}]``."""
    sm.check_exists(path, "a folder, a .jsonl or a .tar shard of (source, instruction, target) triples")
    low = path.lower()
    if os.path.isdir(path):
        out = _scan_folder(path)
    elif low.endswith(".tar"):
        out = _scan_tar(path)
    elif low.endswith((".jsonl", ".json")):
        out = _scan_jsonl(path)
    else:
        raise X2IInputError(f"data.path '{path}': expected a folder, a .jsonl or a .tar shard")
    if not out:
        raise X2IInputError(f"data.path '{path}' holds no (source, instruction, target) triples")
    return out


def _scan_jsonl(path: str) -> list[dict]:
    out = []
    for where, rec in sm.jsonl_records(path):
        missing = [k for k in ("source", "target", "instruction") if not rec.get(k)]
        if missing:
            raise X2IInputError(f"{where} lacks {missing}")
        out.append({"source": sm.image_file(sm.relative_to(path, rec["source"])),
                    "target": sm.image_file(sm.relative_to(path, rec["target"])),
                    "instruction": str(rec["instruction"]).strip(), "name": rec["target"]})
    return out


def _scan_tar(path: str) -> list[dict]:
    out = []
    for key, group in sm.tar_groups(path).items():
        src, tgt = sm.tar_image(path, key, group, "source."), sm.tar_image(path, key, group, "target.")
        txt = sm.tar_text(group, "txt", "instruction.txt")
        if src is None or tgt is None or not txt:
            raise X2IInputError(f"{path}: sample '{key}' needs source.*, target.* and txt members")
        out.append({"source": src, "target": tgt, "instruction": txt, "name": key})
    return out


def _scan_folder(path: str) -> list[dict]:
    index = sm.folder_index(path)
    out = []
    for stem, files in index.items():
        target = sm.first_image(files)
        if not stem.endswith("_target") or target is None:
            continue
        base = stem[: -len("_target")]
        src = sm.first_image(index.get(base + "_source", {}))
        txt = index.get(base, {}).get(".txt")
        if src is None or txt is None:
            raise X2IInputError(f"{os.path.basename(target)}: needs {base}_source.<png|jpg> and {base}.txt beside it")
        out.append({"source": sm.image_file(src), "target": sm.image_file(target),
                    "instruction": sm.read_text(txt), "name": os.path.basename(target)})
    return out


class LightControlTrainer(FluxTrainer):
    eval_seed = 4242
    run_name = "lightcontrol"
    weights_name = "lightcontrol.safetensors"

    def _setup(self):
        self.triples = scan_triples(self.cfg.data.path)

    def _load_models(self):
        from ..lightcontrol import LightControl, LightControlConfig, load_lightcontrol

        cfg = self.cfg
        self.flux = load_frozen_x2i_and_flux(self).to(self.device).eval()
        width = self.flux.config.num_attention_heads * self.flux.config.attention_head_dim
        lcfg = cfg.lightcontrol
        if lcfg.init:
            lc = load_lightcontrol(lcfg.init)
        else:
            torch.manual_seed(int(cfg.seed))
            n = min(int(lcfg.num_modules), len(self.flux.transformer_blocks))
            lc = LightControl(LightControlConfig(num_modules=n, out_dim=width))
        if lc.config.out_dim != width:
            raise X2IInputError(f"LightControl width {lc.config.out_dim} differs from the FLUX transformer's {width}")
        self.lc = self.trained = lc.to(self.device).float().requires_grad_(True).train()
        self.model = (torch.nn.parallel.DistributedDataParallel(self.lc) if self.dist.enabled else self.lc)
        make_optimizer_and_schedule(self, self.lc.parameters())

    def _prepare_data(self):
        res = int(self.cfg.data.resolution)
        if res % 16:
            raise X2IInputError(f"data.resolution {res} must be a multiple of 16")
        self.items, self.skipped = [], []
        for t in self.triples:
            try:
                src, tgt = t["source"].open(), t["target"].open()
            except (OSError, ValueError) as exc:
                self.skipped.append((t["name"], str(exc)))
                continue
            pooled, seq = self.condition(t["instruction"], [src])
            self.items.append({"latent": vae_latent(self.vae, to_pixels(tgt, (res, res)), self.device, self.weight_dtype),
                               "hint": to_pixels(src, (res, res)), "pooled": pooled, "seq": seq})
        if not self.items:
            raise X2IInputError(f"no training triple could be read ({len(self.skipped)} unreadable)")

    def loss(self, items, x0, noise, sigma, train=True):
        """The flow-matching loss with LightControl's residuals (from the source images) injected into FLUX."""
        from ..lightcontrol import inject

        hint = stack(items, "hint", self.device)
        residuals = (self.model if train else self.lc)(hint, sigma * 1000.0, len(self.flux.transformer_blocks))
        return flow_matching_loss(self.flux, self.flux.config, x0, noise, sigma, stack(items, "seq", self.device),
                                  stack(items, "pooled", self.device), self.tcfg.guidance, self.weight_dtype,
                                  context=inject(self.flux, [r.to(self.weight_dtype) for r in residuals]))

    def step(self, step: int) -> dict:
        return rt.optimize(self, step, self._micro, self.lc.parameters())

    def _micro(self, step: int, weight: float):
        """One micro-batch (``step`` counts micro-batches): the flow-matching loss, back-propagated."""
        n = len(self.items)
        first = step * self.global_batch + self.dist.rank * self.local_batch
        items = [self.items[(first + k) % n] for k in range(self.local_batch)]
        x0 = stack(items, "latent", self.device)
        opt_step = step // rt.accumulation(self)  # per optimizer step + sample index, as for one big batch
        noise, sigma = self.draws(opt_step, first, len(items), x0.shape[1:])
        return rt.backward(self.loss(items, x0, noise, sigma), weight), None

    def _write_weights(self, path: str, step: int) -> None:
        self.lc.save(path)

    def _read_weights(self, folder: str):
        from ..lightcontrol import load_lightcontrol

        return load_lightcontrol(os.path.join(folder, self.weights_name))

    def _apply_weights(self, lc) -> None:
        self.lc.load_state_dict(lc.state_dict())

    def _finish(self, final: str, total: int, eval_start) -> None:
        rt.write_eval_report(self.out, eval_start, self.eval_loss(), skipped_unreadable=[n for n, _ in self.skipped])


def run(config_path: str | None, overrides: list[str]) -> str:
    return rt.run_trainer(LightControlTrainer, LightControlTrainingConfig, config_path, overrides)
