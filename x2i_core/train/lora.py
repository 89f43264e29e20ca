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

import dataclasses
import json
import logging
import math
import os
import random

import torch

from ..errors import X2IInputError
from . import runtime as rt, samples as sm
from .base import load_frozen_x2i_and_flux, make_optimizer_and_schedule
from .config import CheckpointSection, FluxTrainSection, LogSection, SamplesSection, Section, section
from .flux_training import FluxTrainer, flow_matching_loss, pack_latents, stack, to_pixels, unpack_latents, vae_latent

log = logging.getLogger("x2i")

# Attention and MLP projections of every double- and single-stream block.
DEFAULT_TARGETS = (
    r".*(transformer_blocks|single_transformer_blocks)\.\d+\.("
    r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out)"
)

@dataclasses.dataclass
class LoraSection(Section):
    rank: int = 16
    alpha: float | None = None       # None: alpha = rank
    targets: str = DEFAULT_TARGETS   # a regular expression over the transformer's module names
    dropout: float = 0.0


@dataclasses.dataclass
class ImageDataSection(Section):
    path: str | None = None          # a folder, a JSONL or a .tar shard (see scan_dataset)
    resolution: int = 512
    buckets: bool = True             # aspect-ratio buckets of about resolution^2 pixels
    bucket_step: int = 64


@dataclasses.dataclass
class LoraTrainSection(FluxTrainSection):
    warmup_steps: int = 50
    guidance: float = 1.0
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class LoraSamples(SamplesSection):
    guidance: float = 3.5


@dataclasses.dataclass
class LoraTrainingConfig(Section):
    mllm: str | None = None
    alignnet: str | None = None
    flux: str | None = None                  # diffusers FLUX folder (transformer, vae, scheduler)
    flux_transformer: str | None = None      # optional: a single-file FLUX (ComfyUI / BFL layout) replacing transformer/
    output_dir: str | None = None
    seed: int = 0
    preset: str = "auto"
    lora: LoraSection = section(LoraSection)
    data: ImageDataSection = section(ImageDataSection)
    train: LoraTrainSection = section(LoraTrainSection)
    checkpoint: CheckpointSection = section(CheckpointSection, every=250)
    log: LogSection = section(LogSection)
    samples: LoraSamples = section(LoraSamples, prompts=["A portrait in the trained style."], steps=28, size=512)


# -- dataset --------------------------------------------------------------------
def scan_dataset(path: str) -> list[dict]:
    """Samples ``{"image": ImageSource, "caption": str, "references": [ImageSource]}`` from a folder (images with
    a sidecar .txt, or a .json with ``caption`` and optional ``references``), a JSONL of ``{"image",
    "caption", "references"}`` or a WebDataset ``.tar`` shard (an image member + ``txt`` or ``json``)."""
    sm.check_exists(path, "a folder of images with captions, a JSONL or a .tar shard")
    if os.path.isdir(path):
        samples, missing = _scan_folder(path)
    elif path.lower().endswith(".tar"):
        samples, missing = _scan_tar(path)
    else:
        samples, missing = _scan_jsonl(path)
    if missing:
        raise X2IInputError(
            f"{len(missing)} training image(s) have no caption, e.g. {missing[:5]}; add a same-name .txt "
            "(or a .json with 'caption') next to each image, or a 'caption' field in the JSONL")
    if not samples:
        raise X2IInputError(f"data.path '{path}' holds no captioned images ({', '.join(sm.IMAGE_EXTS)})")
    return samples


def _sample(image: sm.ImageSource, caption, references=()) -> dict | None:
    caption = str(caption).strip() if caption is not None else ""
    return {"image": image, "caption": caption, "references": list(references)} if caption else None


def _scan_jsonl(path: str):
    samples, missing = [], []
    for where, rec in sm.jsonl_records(path):
        if not rec.get("image"):
            raise X2IInputError(f"{where} has no 'image'")
        refs = [sm.image_file(sm.relative_to(path, r)) for r in rec.get("references", [])]
        s = _sample(sm.image_file(sm.relative_to(path, rec["image"])), rec.get("caption"), refs)
        if s:
            samples.append(s)
        else:
            missing.append(rec["image"])
    return samples, missing


def _scan_folder(path: str):
    index = sm.folder_index(path)
    meta = {stem: sm.read_json_file(files[".json"]) for stem, files in index.items() if ".json" in files}
    refs_used = {r for m in meta.values() for r in m.get("references", [])}
    samples, missing = [], []
    for stem, files in index.items():
        image = sm.first_image(files)
        if image is None or os.path.basename(image) in refs_used:
            continue
        caption = meta.get(stem, {}).get("caption")
        if caption is None and ".txt" in files:
            caption = sm.read_text(files[".txt"])
        refs = [sm.image_file(os.path.join(path, r)) for r in meta.get(stem, {}).get("references", [])]
        s = _sample(sm.image_file(image), caption, refs)
        if s:
            samples.append(s)
        else:
            missing.append(os.path.basename(image))
    return samples, missing


def _scan_tar(path: str):
    samples, missing = [], []
    for key, group in sm.tar_groups(path).items():
        image = sm.tar_image(path, key, group)
        if image is None:
            continue
        caption = sm.tar_text(group, "txt")
        if caption is None and "json" in group:
            caption = sm.json_object(group["json"], f"{path}:{key}.json").get("caption")
        s = _sample(image, caption)
        if s:
            samples.append(s)
        else:
            missing.append(image.name)
    return samples, missing


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




# -- trainer ----------------------------------------------------------------------
class LoraTrainer(FluxTrainer):
    run_name = "lora"
    weights_name = "lora.safetensors"

    def _setup(self):
        self.samples = scan_dataset(self.cfg.data.path)

    def _load_models(self):
        from peft import LoraConfig

        cfg = self.cfg
        transformer = load_frozen_x2i_and_flux(self)
        lcfg = cfg.lora
        rank = int(lcfg.rank)
        alpha = float(lcfg.alpha) if lcfg.alpha is not None else float(rank)
        if rank < 1:
            raise X2IInputError(f"lora.rank must be at least 1, found {rank}")
        import re

        pattern = re.compile(lcfg.targets)
        targets = [(n, m) for n, m in transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
        if not targets:
            raise X2IInputError(f"lora.targets {lcfg.targets!r} matches no Linear layer of the FLUX transformer")
        for name, mod in targets:
            if rank > min(mod.in_features, mod.out_features):
                raise X2IInputError(
                    f"lora.rank {rank} is larger than layer '{name}' ({mod.in_features} -> {mod.out_features}); "
                    f"use a rank of at most {min(mod.in_features, mod.out_features)}")
        self.rank, self.alpha = rank, alpha
        torch.manual_seed(int(cfg.seed))
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=lcfg.targets,
                                           lora_dropout=float(lcfg.dropout), init_lora_weights="gaussian"))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if self.tcfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = self.trained = transformer.to(self.device).train()
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.model = (torch.nn.parallel.DistributedDataParallel(
            transformer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled else transformer)
        make_optimizer_and_schedule(self, self.params)

    def _prepare_data(self):
        """Load, bucket, VAE-encode and X2I-encode every sample once (corrupt images skipped and counted)."""
        dcfg = self.cfg.data
        res = int(dcfg.resolution)
        step = int(dcfg.bucket_step)
        if res % 16 or step % 16:
            raise X2IInputError(f"data.resolution {res} and data.bucket_step {step} must be multiples of 16")
        sizes = bucket_sizes(res, step) if dcfg.buckets else [(res, res)]
        self.items, self.skipped = [], []
        for s in self.samples:
            try:
                img = s["image"].open()
                refs = [r.open() for r in s["references"]]
            except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
                self.skipped.append((s["image"].name, str(exc)))
                continue
            size = pick_bucket(img.width, img.height, sizes)
            lat = vae_latent(self.vae, to_pixels(img, size), self.device, self.weight_dtype)
            pooled, seq = self.condition(s["caption"], refs)
            self.items.append({"latent": lat, "pooled": pooled, "seq": seq, "bucket": size})
        if self.skipped:
            log.warning("skipped %d unreadable image(s), e.g. %s", len(self.skipped), self.skipped[0])
        if not self.items:
            raise X2IInputError(f"no training image could be read ({len(self.skipped)} unreadable)")
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(self.items):
            self.by_bucket.setdefault((it["bucket"], it["seq"].shape[0]), []).append(i)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.cfg.seed}:{epoch}")
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
        x0 = stack(items, "latent", self.device)
        noise, sigma = self.draws(step, self.dist.rank * self.local_batch, len(items), x0.shape[1:])
        return rt.backward(self.loss(items, x0, noise, sigma), weight), None

    def loss(self, items, x0, noise, sigma, train=True):
        return flow_matching_loss(self.model if train else self.transformer, self.transformer.config, x0, noise, sigma,
                                  stack(items, "seq", self.device), stack(items, "pooled", self.device),
                                  self.tcfg.guidance, self.weight_dtype)

    def sample(self, step: int) -> list[str]:
        """Images from the fixed prompts with the current LoRA (rank 0)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from ..mllm.base import EncodeRequest

        scfg = self.cfg.samples
        folder = os.path.join(self.out, "samples")
        os.makedirs(folder, exist_ok=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.cfg.flux, subfolder="scheduler")
        pipe = FluxPipeline(scheduler=scheduler, vae=self.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        paths = []
        self.transformer.eval()
        try:
            for i, prompt in enumerate(scfg.prompts):
                with torch.no_grad():
                    hs = self.encoder.encode(EncodeRequest(text=prompt), preset=self.cfg.preset)
                    pooled, seq = self.alignnet(hs.hidden)
                    img = pipe(prompt_embeds=seq.to(self.weight_dtype), pooled_prompt_embeds=pooled.to(self.weight_dtype),
                               num_inference_steps=int(scfg.steps), guidance_scale=float(scfg.guidance),
                               width=int(scfg.size), height=int(scfg.size),
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
            "rank": self.rank, "alpha": self.alpha, "targets": self.cfg.lora.targets, "step": step,
            "mllm": os.path.basename(os.path.normpath(self.cfg.mllm)),
            "alignnet": os.path.basename(self.cfg.alignnet), "preset": self.cfg.preset,
            "resolution": self.cfg.data.resolution})}
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

    def _finish(self, final: str, total: int, eval_start) -> None:
        rt.write_eval_report(self.out, eval_start, self.eval_loss())
        rt.write_json(os.path.join(self.out, "data_report.json"), {
            "samples": len(self.items), "skipped_unreadable": [p for p, _ in self.skipped],
            "buckets": sorted({f"{w}x{h}" for (w, h), _ in self.by_bucket})})




def run(config_path: str | None, overrides: list[str]) -> str:
    return rt.run_trainer(LoraTrainer, LoraTrainingConfig, config_path, overrides)


__all__ = ["LoraTrainingConfig", "LoraTrainer", "run", "scan_dataset", "bucket_sizes", "pack_latents", "unpack_latents"]
