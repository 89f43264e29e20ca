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

import io
import json
import logging
import os
import tarfile

import numpy as np
import torch

from ..errors import X2IInputError
from . import runtime as rt
from .base import Trainer, load_frozen_x2i_and_flux, make_optimizer_and_schedule
from .lora import fit_to, pack_latents, unpack_latents

log = logging.getLogger("x2i")

DEFAULTS = {
    "mllm": None, "alignnet": None, "flux": None, "flux_transformer": None, "output_dir": None, "seed": 0,
    "preset": "auto",
    "lightcontrol": {"init": None, "num_modules": 19},
    "data": {"path": None, "resolution": 512},
    "train": {"steps": 1000, "batch_size": 1, "lr": 1e-5, "weight_decay": 1e-2, "warmup_steps": 100,
              "min_lr_ratio": 0.0, "max_grad_norm": 1.0, "optimizer": "adamw", "mixed_precision": "no",
              "guidance": 3.5, "sigma_mean": 0.0, "sigma_std": 1.0, "gradient_accumulation": 1},
    "checkpoint": {"every": 500, "keep_last": 3, "resume": "auto"},
    "log": {"every": 1, "tensorboard": False},
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def scan_triples(path: str) -> list[dict]:
    """``[{"source": PIL-loader, "target": ..., "instruction": str}]`` (images loaded lazily)."""
    from PIL import Image

    if not path or not os.path.exists(path):
        raise X2IInputError(f"data.path '{path}' does not exist")
    out = []

    def from_file(p):
        return lambda: Image.open(p)

    if os.path.isfile(path) and path.endswith(".jsonl"):
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                missing = [k for k in ("source", "target", "instruction") if not rec.get(k)]
                if missing:
                    raise X2IInputError(f"{path}:{n} lacks {missing}")
                out.append({"source": from_file(os.path.join(base, rec["source"])),
                            "target": from_file(os.path.join(base, rec["target"])),
                            "instruction": rec["instruction"], "name": rec["target"]})
    elif os.path.isfile(path) and path.endswith(".tar"):
        groups: dict[str, dict] = {}
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, field = m.name.partition(".")
                data = tf.extractfile(m).read()
                groups.setdefault(key, {})[field] = data
        for key, g in sorted(groups.items()):
            src = next((g[f] for f in g if f.startswith("source")), None)
            tgt = next((g[f] for f in g if f.startswith("target")), None)
            txt = g.get("txt") or g.get("instruction.txt")
            if src is None or tgt is None or not txt:
                raise X2IInputError(f"{path}: sample '{key}' needs source.*, target.* and txt members")
            out.append({"source": (lambda b=src: Image.open(io.BytesIO(b))),
                        "target": (lambda b=tgt: Image.open(io.BytesIO(b))),
                        "instruction": txt.decode("utf-8").strip(), "name": key})
    elif os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            stem, ext = os.path.splitext(name)
            if not stem.endswith("_target") or ext.lower() not in IMAGE_EXTS:
                continue
            base = stem[: -len("_target")]
            src = next((os.path.join(path, base + "_source" + e) for e in IMAGE_EXTS
                        if os.path.isfile(os.path.join(path, base + "_source" + e))), None)
            txt = os.path.join(path, base + ".txt")
            if src is None or not os.path.isfile(txt):
                raise X2IInputError(f"{name}: needs {base}_source.<png|jpg> and {base}.txt beside it")
            with open(txt, encoding="utf-8") as fh:
                out.append({"source": from_file(src), "target": from_file(os.path.join(path, name)),
                            "instruction": fh.read().strip(), "name": name})
    else:
        raise X2IInputError(f"data.path '{path}': expected a folder, a .jsonl or a .tar shard")
    if not out:
        raise X2IInputError(f"data.path '{path}' holds no (source, instruction, target) triples")
    return out


class LightControlTrainer(Trainer):
    run_name = "lightcontrol"
    weights_name = "lightcontrol.safetensors"

    def _setup(self):
        self.triples = scan_triples(self.cfg["data"]["path"])

    def _load_models(self):
        from ..lightcontrol import LightControl, LightControlConfig, load_lightcontrol

        cfg = self.cfg
        self.flux = load_frozen_x2i_and_flux(self).to(self.device).eval()
        width = self.flux.config.num_attention_heads * self.flux.config.attention_head_dim
        lcfg = cfg["lightcontrol"]
        if lcfg["init"]:
            lc = load_lightcontrol(lcfg["init"])
        else:
            torch.manual_seed(int(cfg["seed"]))
            n = min(int(lcfg["num_modules"]), len(self.flux.transformer_blocks))
            lc = LightControl(LightControlConfig(num_modules=n, out_dim=width))
        if lc.config.out_dim != width:
            raise X2IInputError(f"LightControl width {lc.config.out_dim} differs from the FLUX transformer's {width}")
        self.lc = lc.to(self.device).float().requires_grad_(True).train()
        self.model = (torch.nn.parallel.DistributedDataParallel(self.lc) if self.dist.enabled else self.lc)
        make_optimizer_and_schedule(self, self.lc.parameters())

    def _prepare_data(self):
        from ..mllm.base import EncodeRequest

        res = int(self.cfg["data"]["resolution"])
        if res % 16:
            raise X2IInputError(f"data.resolution {res} must be a multiple of 16")
        scale, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor or 0.0

        def to_px(im):
            return torch.from_numpy(np.asarray(fit_to(im, (res, res)), dtype=np.float32) / 127.5 - 1.0)

        self.items, self.skipped = [], []
        for t in self.triples:
            try:
                src = t["source"]().convert("RGB")
                tgt = t["target"]().convert("RGB")
            except (OSError, ValueError) as exc:
                self.skipped.append((t["name"], str(exc)))
                continue
            hint = to_px(src).permute(2, 0, 1)
            with torch.no_grad():
                lat = self.vae.encode(to_px(tgt).permute(2, 0, 1)[None].to(self.device, self.weight_dtype)).latent_dist.mode()
                hs = self.encoder.encode(EncodeRequest(text=t["instruction"], images=[src]), preset=self.cfg["preset"])
                pooled, seq = self.alignnet(hs.hidden)
            self.items.append({"latent": ((lat - shift) * scale)[0].float().cpu(), "hint": hint,
                               "pooled": pooled[0].cpu(), "seq": seq[0].cpu()})
        if not self.items:
            raise X2IInputError(f"no training triple could be read ({len(self.skipped)} unreadable)")

    def _forward(self, x0, noise, sigma, items, train=True):
        b, c, h, w = x0.shape
        from diffusers import FluxPipeline

        from ..lightcontrol import inject

        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        hint = torch.stack([it["hint"] for it in items]).to(self.device)
        residuals = (self.model if train else self.lc)(hint, sigma * 1000.0, len(self.flux.transformer_blocks))
        seq = torch.stack([it["seq"] for it in items]).to(self.device, self.weight_dtype)
        pooled = torch.stack([it["pooled"] for it in items]).to(self.device, self.weight_dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.weight_dtype)
        guidance = (torch.full((b,), float(self.tcfg["guidance"]), device=self.device, dtype=self.weight_dtype)
                    if self.flux.config.guidance_embeds else None)
        with inject(self.flux, [r.to(self.weight_dtype) for r in residuals]):
            pred = self.flux(hidden_states=pack_latents(xt).to(self.weight_dtype), timestep=sigma.to(self.weight_dtype),
                             guidance=guidance, pooled_projections=pooled, encoder_hidden_states=seq,
                             txt_ids=torch.zeros(seq.shape[1], 3, device=self.device, dtype=self.weight_dtype),
                             img_ids=img_ids, return_dict=False)[0]
        return torch.nn.functional.mse_loss(unpack_latents(pred.float(), h, w), (noise - x0).float())

    def _draw(self, seed, step, index, shape):
        g = rt.step_generator(seed, step, index)
        noise = torch.randn(shape, generator=g)
        u = torch.randn((), generator=g) * float(self.tcfg["sigma_std"]) + float(self.tcfg["sigma_mean"])
        return noise, torch.sigmoid(u)

    def step(self, step: int) -> dict:
        return rt.optimize(self, step, self._micro, self.lc.parameters())

    def _micro(self, step: int, weight: float):
        """One micro-batch (``step`` counts micro-batches): the flow-matching loss, back-propagated."""
        n = len(self.items)
        first = step * self.global_batch + self.dist.rank * self.local_batch
        idx = [(first + k) % n for k in range(self.local_batch)]
        items = [self.items[i] for i in idx]
        x0 = torch.stack([it["latent"] for it in items]).to(self.device)
        opt_step = step // rt.accumulation(self)  # per optimizer step + sample index, as for one big batch
        draws = [self._draw(self.cfg["seed"], opt_step, first + k, x0.shape[1:]) for k in range(len(items))]
        noise = torch.stack([d[0] for d in draws]).to(self.device)
        sigma = torch.stack([d[1] for d in draws]).to(self.device)
        return rt.backward(self._forward(x0, noise, sigma, items), weight), None

    @torch.no_grad()
    def eval_loss(self, sigmas=(0.25, 0.5, 0.75)) -> float:
        self.lc.eval()
        try:
            total = []
            for i, it in enumerate(self.items):
                for j, s in enumerate(sigmas):
                    noise = torch.randn(it["latent"].shape, generator=rt.step_generator(4242, j, i))[None]
                    total.append(float(self._forward(it["latent"][None].to(self.device), noise.to(self.device),
                                                     torch.tensor([s], device=self.device), [it], train=False)))
            return sum(total) / len(total)
        finally:
            self.lc.train()

    def _write_weights(self, path: str, step: int) -> None:
        self.lc.save(path)

    def _read_weights(self, folder: str):
        from ..lightcontrol import load_lightcontrol

        return load_lightcontrol(os.path.join(folder, self.weights_name))

    def _apply_weights(self, lc) -> None:
        self.lc.load_state_dict(lc.state_dict())

    def _eval_start(self, start: int):
        return self.eval_loss()

    def _finish(self, final: str, total: int, eval_start) -> None:
        rt.write_eval_report(self.out, eval_start, self.eval_loss(), skipped_unreadable=[n for n, _ in self.skipped])


def run(config_path: str | None, overrides: list[str]) -> str:
    return rt.run_trainer(LightControlTrainer, DEFAULTS, config_path, overrides)
