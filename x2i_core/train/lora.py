"""LoRA training of FLUX under X2I conditioning (text, or reference images + text).

The prompts of the training samples are X2I conditionings - MLLM(text [+
reference images]) -> AlignNet, both frozen - so a LoRA can be trained for
image+text -> image, which T5/CLIP conditioning cannot express.  peft LoRA on
the diffusers FLUX transformer, flow-matching loss (x_t = (1-s) x0 + s e,
target e - x0) with logit-normal sigmas, latents and conditionings cached once,
aspect-ratio buckets, the shared runtime's checkpoints / exact resume / CSV.

The saved file is one safetensors in the diffusers/PEFT layout with a
``transformer.`` prefix (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``),
``.alpha`` tensors when alpha != rank, which ComfyUI's stock
``LoraLoaderModelOnly`` maps completely onto FLUX and diffusers'
``load_lora_weights`` reads.

    python -m x2i_core train-lora --config FILE.yaml [key=value ...]
"""

from __future__ import annotations

import json
import logging
import math
import os
import random

import numpy as np
import torch

from ..errors import X2IInputError
from . import runtime as rt
from .base import Trainer, load_frozen_x2i_and_flux, make_optimizer_and_schedule

log = logging.getLogger("x2i")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Attention and MLP projections of every double- and single-stream block.
DEFAULT_TARGETS = (
    r".*(transformer_blocks|single_transformer_blocks)\.\d+\.("
    r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out)"
)

DEFAULTS = {
    "mllm": None,
    "alignnet": None,
    "flux": None,                  # diffusers FLUX folder (transformer, vae, scheduler)
    "flux_transformer": None,      # optional: a single-file FLUX (ComfyUI / BFL layout) replacing transformer/
    "output_dir": None,
    "seed": 0,
    "preset": "auto",
    "lora": {"rank": 16, "alpha": None, "targets": DEFAULT_TARGETS, "dropout": 0.0},
    "data": {"path": None, "resolution": 512, "buckets": True, "bucket_step": 64},
    "train": {"steps": 1000, "batch_size": 1, "lr": 1e-4, "weight_decay": 1e-2, "warmup_steps": 50,
              "min_lr_ratio": 0.0, "max_grad_norm": 1.0, "optimizer": "adamw", "mixed_precision": "no",
              "gradient_checkpointing": False, "guidance": 1.0, "sigma_mean": 0.0, "sigma_std": 1.0,
              "gradient_accumulation": 1},
    "checkpoint": {"every": 250, "keep_last": 3, "resume": "auto"},
    "log": {"every": 1, "tensorboard": False},
    "samples": {"every": 0, "prompts": ["A portrait in the trained style."], "steps": 28, "size": 512,
                "guidance": 3.5},
}


# -- dataset --------------------------------------------------------------------
def scan_dataset(path: str) -> list[dict]:
    """Samples ``{"image", "caption", "references"}`` from a folder (sidecar .txt/.json) or a JSONL file."""
    if not path or not os.path.exists(path):
        raise X2IInputError(f"data.path '{path}' does not exist; expected a folder of images with captions or a JSONL")
    samples, missing = [], []
    if os.path.isfile(path):
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise X2IInputError(f"{path}:{n} is not valid JSON ({exc})") from exc
                img = rec.get("image")
                if not img:
                    raise X2IInputError(f"{path}:{n} has no 'image'")
                refs = [os.path.join(base, r) for r in rec.get("references", [])]
                cap = rec.get("caption")
                if not cap or not str(cap).strip():
                    missing.append(img)
                    continue
                samples.append({"image": os.path.join(base, img), "caption": str(cap).strip(), "references": refs})
    else:
        names = sorted(os.listdir(path))
        refs_used = set()
        meta = {}
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".json":
                with open(os.path.join(path, name), encoding="utf-8") as fh:
                    try:
                        meta[stem] = json.load(fh)
                    except json.JSONDecodeError as exc:
                        raise X2IInputError(f"{os.path.join(path, name)} is not valid JSON ({exc})") from exc
                refs_used.update(meta[stem].get("references", []))
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS or name in refs_used:
                continue
            cap = None
            refs = []
            if stem in meta:
                cap = meta[stem].get("caption")
                refs = [os.path.join(path, r) for r in meta[stem].get("references", [])]
            txt = os.path.join(path, stem + ".txt")
            if cap is None and os.path.isfile(txt):
                with open(txt, encoding="utf-8") as fh:
                    cap = fh.read().strip()
            if not cap:
                missing.append(name)
                continue
            samples.append({"image": os.path.join(path, name), "caption": cap, "references": refs})
    if missing:
        raise X2IInputError(
            f"{len(missing)} training image(s) have no caption, e.g. {missing[:5]}; add a same-name .txt "
            "(or a .json with 'caption') next to each image, or a 'caption' field in the JSONL")
    if not samples:
        raise X2IInputError(f"data.path '{path}' holds no captioned images ({', '.join(IMAGE_EXTS)})")
    return samples


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    area = resolution * resolution
    sizes = set()
    w = max(step, (resolution // 2) // step * step)
    while w <= resolution * 2:
        h = max(step, round(area / w / step) * step)
        sizes.add((w, h))
        w += step
    return sorted(sizes)


def pick_bucket(w: int, h: int, sizes) -> tuple[int, int]:
    ratio = math.log(w / h)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), abs(s[0] * s[1] - w * h)))


def fit_to(img, size):
    """Resize to cover ``size`` and centre-crop."""
    from PIL import Image

    tw, th = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((nw, nh), resample=Image.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


# -- trainer ----------------------------------------------------------------------
class LoraTrainer(Trainer):
    run_name = "lora"
    weights_name = "lora.safetensors"

    def _setup(self):
        self.samples = scan_dataset(self.cfg["data"]["path"])

    def _load_models(self):
        from peft import LoraConfig

        cfg = self.cfg
        transformer = load_frozen_x2i_and_flux(self)
        a = self.alignnet.config
        if (a.output_dim1, a.output_dim0) != (transformer.config.joint_attention_dim,
                                              transformer.config.pooled_projection_dim):
            raise X2IInputError(f"AlignNet outputs {a.output_dim1}/{a.output_dim0} but the FLUX transformer expects "
                                f"{transformer.config.joint_attention_dim}/{transformer.config.pooled_projection_dim}")
        lcfg = cfg["lora"]
        rank = int(lcfg["rank"])
        alpha = float(lcfg["alpha"]) if lcfg["alpha"] is not None else float(rank)
        if rank < 1:
            raise X2IInputError(f"lora.rank must be at least 1, found {rank}")
        import re

        pattern = re.compile(lcfg["targets"])
        targets = [(n, m) for n, m in transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
        if not targets:
            raise X2IInputError(f"lora.targets {lcfg['targets']!r} matches no Linear layer of the FLUX transformer")
        for name, mod in targets:
            if rank > min(mod.in_features, mod.out_features):
                raise X2IInputError(
                    f"lora.rank {rank} is larger than layer '{name}' ({mod.in_features} -> {mod.out_features}); "
                    f"use a rank of at most {min(mod.in_features, mod.out_features)}")
        self.rank, self.alpha = rank, alpha
        torch.manual_seed(int(cfg["seed"]))
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=lcfg["targets"],
                                           lora_dropout=float(lcfg["dropout"]), init_lora_weights="gaussian"))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if self.tcfg["gradient_checkpointing"]:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer.to(self.device).train()
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.model = (torch.nn.parallel.DistributedDataParallel(
            transformer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled else transformer)
        make_optimizer_and_schedule(self, self.params)

    def _prepare_data(self):
        """Load, bucket, VAE-encode and X2I-encode every sample once (corrupt images skipped and counted)."""
        from PIL import Image, UnidentifiedImageError

        from ..mllm.base import EncodeRequest

        dcfg = self.cfg["data"]
        res = int(dcfg["resolution"])
        step = int(dcfg["bucket_step"])
        if res % 16 or step % 16:
            raise X2IInputError(f"data.resolution {res} and data.bucket_step {step} must be multiples of 16")
        sizes = bucket_sizes(res, step) if dcfg["buckets"] else [(res, res)]
        scale = self.vae.config.scaling_factor
        shift = self.vae.config.shift_factor or 0.0
        self.items, self.skipped = [], []
        for s in self.samples:
            try:
                with Image.open(s["image"]) as im:
                    im.load()
                    img = im.convert("RGB")
                refs = []
                for r in s["references"]:
                    with Image.open(r) as rim:
                        rim.load()
                        refs.append(rim.convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                self.skipped.append((s["image"], str(exc)))
                continue
            size = pick_bucket(img.width, img.height, sizes)
            px = torch.from_numpy(np.asarray(fit_to(img, size), dtype=np.float32) / 127.5 - 1.0)
            px = px.permute(2, 0, 1)[None].to(self.device, self.weight_dtype)
            with torch.no_grad():
                lat = self.vae.encode(px).latent_dist.mode()
                lat = ((lat - shift) * scale)[0].float().cpu()
                hs = self.encoder.encode(EncodeRequest(text=s["caption"], images=refs or None), preset=self.cfg["preset"])
                pooled, seq = self.alignnet(hs.hidden)
            self.items.append({"latent": lat, "pooled": pooled[0].cpu(), "seq": seq[0].cpu(), "bucket": size})
        if self.skipped:
            log.warning("skipped %d unreadable image(s), e.g. %s", len(self.skipped), self.skipped[0])
        if not self.items:
            raise X2IInputError(f"no training image could be read ({len(self.skipped)} unreadable)")
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(self.items):
            self.by_bucket.setdefault((it["bucket"], it["seq"].shape[0]), []).append(i)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.cfg['seed']}:{epoch}")
        batches = []
        for key in sorted(self.by_bucket):
            idx = list(self.by_bucket[key])
            rng.shuffle(idx)
            while len(idx) < self.global_batch:
                idx += idx[: self.global_batch - len(idx)]
            for i in range(0, len(idx) - self.global_batch + 1, self.global_batch):
                batches.append(idx[i:i + self.global_batch])
        rng.shuffle(batches)
        return batches

    def batch_for(self, step: int) -> list[int]:
        epoch, rest = 0, step
        while True:
            batches = self.epoch_batches(epoch)
            if rest < len(batches):
                return batches[rest]
            rest -= len(batches)
            epoch += 1

    def step(self, step: int) -> dict:
        return rt.optimize(self, step, self._micro, self.params)

    def _micro(self, step: int, weight: float):
        """One micro-batch (``step`` counts micro-batches): the flow-matching loss, back-propagated."""
        gbatch = self.batch_for(step)
        local = gbatch[self.dist.rank * self.local_batch:(self.dist.rank + 1) * self.local_batch]
        items = [self.items[i] for i in local]
        x0 = torch.stack([it["latent"] for it in items]).to(self.device)
        b, c, h, w = x0.shape
        noise, sig = [], []
        for k in range(b):
            g = rt.step_generator(self.cfg["seed"], step, self.dist.rank * self.local_batch + k)
            noise.append(torch.randn(c, h, w, generator=g))
            u = torch.randn((), generator=g) * float(self.tcfg["sigma_std"]) + float(self.tcfg["sigma_mean"])
            sig.append(torch.sigmoid(u))
        noise = torch.stack(noise).to(self.device)
        sigma = torch.stack(sig).to(self.device)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        target = noise - x0
        packed = pack_latents(xt)
        from diffusers import FluxPipeline

        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.weight_dtype)
        seq = torch.stack([it["seq"] for it in items]).to(self.device, self.weight_dtype)
        pooled = torch.stack([it["pooled"] for it in items]).to(self.device, self.weight_dtype)
        txt_ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=self.weight_dtype)
        guidance = (torch.full((b,), float(self.tcfg["guidance"]), device=self.device, dtype=self.weight_dtype)
                    if self.transformer.config.guidance_embeds else None)
        amp = torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32)
        with amp:
            pred = self.model(hidden_states=packed.to(self.weight_dtype), timestep=sigma.to(self.weight_dtype),
                              guidance=guidance, pooled_projections=pooled, encoder_hidden_states=seq,
                              txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(unpack_latents(pred.float(), h, w), target.float())
        return rt.backward(loss, weight), None

    @torch.no_grad()
    def eval_loss(self, sigmas=(0.25, 0.5, 0.75), seed: int = 12345) -> float:
        """Flow-matching loss on every training sample at fixed sigmas and fixed noise (a steady yardstick)."""
        from diffusers import FluxPipeline

        was_training = self.transformer.training
        self.transformer.eval()
        total, n = 0.0, 0
        try:
            for i, it in enumerate(self.items):
                x0 = it["latent"][None].to(self.device)
                _, c, h, w = x0.shape
                img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.weight_dtype)
                seq = it["seq"][None].to(self.device, self.weight_dtype)
                pooled = it["pooled"][None].to(self.device, self.weight_dtype)
                txt_ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=self.weight_dtype)
                guidance = (torch.full((1,), float(self.tcfg["guidance"]), device=self.device, dtype=self.weight_dtype)
                            if self.transformer.config.guidance_embeds else None)
                for j, s in enumerate(sigmas):
                    g = rt.step_generator(seed, j, i)
                    noise = torch.randn(x0.shape[1:], generator=g)[None].to(self.device)
                    xt = (1 - s) * x0 + s * noise
                    pred = self.transformer(hidden_states=pack_latents(xt).to(self.weight_dtype),
                                            timestep=torch.full((1,), s, device=self.device, dtype=self.weight_dtype),
                                            guidance=guidance, pooled_projections=pooled, encoder_hidden_states=seq,
                                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
                    total += float(torch.nn.functional.mse_loss(unpack_latents(pred.float(), h, w), (noise - x0).float()))
                    n += 1
        finally:
            self.transformer.train(was_training)
        return total / n

    def sample(self, step: int) -> list[str]:
        """Images from the fixed prompts with the current LoRA (rank 0)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from ..mllm.base import EncodeRequest

        scfg = self.cfg["samples"]
        folder = os.path.join(self.out, "samples")
        os.makedirs(folder, exist_ok=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.cfg["flux"], subfolder="scheduler")
        pipe = FluxPipeline(scheduler=scheduler, vae=self.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        paths = []
        self.transformer.eval()
        try:
            for i, prompt in enumerate(scfg["prompts"]):
                with torch.no_grad():
                    hs = self.encoder.encode(EncodeRequest(text=prompt), preset=self.cfg["preset"])
                    pooled, seq = self.alignnet(hs.hidden)
                    img = pipe(prompt_embeds=seq.to(self.weight_dtype), pooled_prompt_embeds=pooled.to(self.weight_dtype),
                               num_inference_steps=int(scfg["steps"]), guidance_scale=float(scfg["guidance"]),
                               width=int(scfg["size"]), height=int(scfg["size"]),
                               generator=torch.Generator().manual_seed(i)).images[0]
                path = os.path.join(folder, f"step-{step:08d}-{i}.png")
                img.save(path)
                paths.append(path)
        finally:
            self.transformer.train()
        return paths

    # -- saving -----------------------------------------------------------------------
    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.transformer)
        out = {f"transformer.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}
        if self.alpha != self.rank:
            for k in list(out):
                if k.endswith(".lora_A.weight"):
                    out[k[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(self.alpha)
        return out

    def save_lora(self, path: str, step: int) -> None:
        from ..io import atomic_save_safetensors

        meta = {"x2i_format": "lora", "x2i_lora": json.dumps({
            "rank": self.rank, "alpha": self.alpha, "targets": self.cfg["lora"]["targets"], "step": step,
            "mllm": os.path.basename(os.path.normpath(self.cfg["mllm"])),
            "alignnet": os.path.basename(self.cfg["alignnet"]), "preset": self.cfg["preset"],
            "resolution": self.cfg["data"]["resolution"]})}
        atomic_save_safetensors(self.lora_state(), path, metadata=meta)

    def _write_weights(self, path: str, step: int) -> None:
        self.save_lora(path, step)

    def _read_weights(self, folder: str):
        from ..io import load_weights_file

        sd = load_weights_file(os.path.join(folder, self.weights_name), what="LoRA checkpoint").tensors
        return {k[len("transformer."):]: v for k, v in sd.items() if not k.endswith(".alpha")}

    def _apply_weights(self, sd) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.transformer, sd)

    def _eval_start(self, start: int):
        return self.eval_loss()

    def _finish(self, final: str, total: int, eval_start) -> None:
        rt.write_eval_report(self.out, eval_start, self.eval_loss())
        rt.write_json(os.path.join(self.out, "data_report.json"), {
            "samples": len(self.items), "skipped_unreadable": [p for p, _ in self.skipped],
            "buckets": sorted({f"{w}x{h}" for (w, h), _ in self.by_bucket})})


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4] (FLUX's 2x2 patches, row-major)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def run(config_path: str | None, overrides: list[str]) -> str:
    return rt.run_trainer(LoraTrainer, DEFAULTS, config_path, overrides)


__all__ = ["DEFAULTS", "LoraTrainer", "run", "scan_dataset", "bucket_sizes", "pack_latents", "unpack_latents"]
