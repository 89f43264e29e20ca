"""Attention distillation of an AlignNet (the paper's stage 1), with one shared frozen FLUX.

Per step and sample: pure-noise latents (the reference: 1024x1024 -> 4096
packed tokens, sigma 1 = the first step of the schedule, guidance 3.5); the
teacher pass feeds FLUX the caption's T5 sequence and CLIP pooled vector
(no grad) and stores each attention output; the student pass feeds the *same*
FLUX weights ``AlignNet(MLLM(caption))`` and, as each block's attention
output appears, adds that pair's loss (normalise over features, T = 3,
KL(student || teacher), batchmean; non-finite pairs skipped) and drops the
teacher tensor - so no more than one block's loss intermediates exist at a
time.  Only the AlignNet trains.

With ``train.gradient_checkpointing`` the FLUX blocks are checkpointed: their
forward runs again during backward, and so does the loss the hooks add inside
them (the hooks stay fed around ``backward()``; the teacher captures are kept
until then).  The loss and the gradients equal the run without it.

    python -m x2i_core distill --config FILE.yaml [key=value ...]
    torchrun --nproc_per_node N -m x2i_core distill --config FILE.yaml
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import torch

from ..alignnet import AlignNet, AlignNetConfig, load_alignnet
from ..errors import X2IInputError, X2IShapeError
from ..flux.capture import AttentionCapture, collect
from ..mllm.chat import check_pad_rows
from ..ops.kl import distill_loss, finite_or_skip
from ..registry import Provenance, check_fits, identity_of
from . import runtime as rt
from .base import Trainer, make_optimizer_and_schedule
from .config import CheckpointSection, LogSection, SamplesSection, Section, TrainSection, section
from .data import CaptionStream

log = logging.getLogger("x2i")

@dataclasses.dataclass
class AlignNetSection(Section):
    init: str | None = None          # start from this AlignNet file instead of a fresh one
    fusion: str = "conv"             # conv / scale / mean
    kernel_size: int = 5
    use_t5: bool = False
    t5_layers: int = 2
    t5_heads: int = 16
    t5_head_dim: int = 128


@dataclasses.dataclass
class CaptionDataSection(Section):
    paths: list[str] = dataclasses.field(default_factory=list)  # .txt / .jsonl / .parquet / .tar (globs, folders)
    caption_key: str | None = None
    shuffle: bool = True
    validate_first: int = 1000       # captions checked against distill.tokens before training
    skip_long: bool = False


@dataclasses.dataclass
class DistillTrainSection(TrainSection):
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class DistillSection(Section):
    resolution: int = 1024
    tokens: int = 512
    guidance: float = 3.5
    timestep: str = "first"          # first (sigma 1) / uniform
    temperature: float = 3.0
    loss_backend: str = "auto"       # auto / fused / rowwise / reference
    cache_teacher_embeddings: bool = False


@dataclasses.dataclass
class DistributedSection(Section):
    fsdp_flux: bool = False          # shard the frozen FLUX over the ranks (FSDP2) when it does not fit


@dataclasses.dataclass
class DistillTrainingConfig(Section):
    mllm: str | None = None          # Hugging Face MLLM folder (Qwen2.5-VL)
    flux: str | None = None          # diffusers FLUX folder *with* its T5 / CLIP (the teacher encoders)
    output_dir: str | None = None
    seed: int = 0
    preset: str = "training"         # student prompt convention (what the released AlignNets used)
    pad_rows: str = "reference"      # left-pad rows as the released AlignNets saw them; "constant" = newer transformers
    alignnet: AlignNetSection = section(AlignNetSection)
    data: CaptionDataSection = section(CaptionDataSection)
    train: DistillTrainSection = section(DistillTrainSection)
    distill: DistillSection = section(DistillSection)
    checkpoint: CheckpointSection = section(CheckpointSection)
    distributed: DistributedSection = section(DistributedSection)
    log: LogSection = section(LogSection)
    samples: SamplesSection = section(SamplesSection, prompts=["A red fox in the snow at dawn."])


class DistillTrainer(Trainer):
    required = ("mllm", "flux", "output_dir")
    run_name = "distill"
    weights_name = "alignnet.safetensors"
    metric_columns = ("loss", "pairs", "skipped", "grad_norm", "lr", "seconds")

    def __init__(self, cfg: Section):
        if not cfg.data.paths:
            raise X2IInputError("config needs data.paths (caption files: .txt, .jsonl, .parquet or .tar shards)")
        super().__init__(cfg)

    def _setup(self):
        self.train_cfg = self.tcfg
        self.dcfg = self.cfg.distill
        self.pad_rows = check_pad_rows(self.cfg.pad_rows)
        res = int(self.dcfg.resolution)
        if res % 16:
            raise X2IInputError(f"distill.resolution {res} must be a multiple of 16")
        if self.dcfg.loss_backend not in ("auto", "fused", "rowwise", "reference"):
            raise X2IInputError(f"distill.loss_backend {self.dcfg.loss_backend!r}: expected auto, fused, rowwise "
                                "or reference")
        if self.dcfg.timestep not in ("first", "uniform"):
            raise X2IInputError(f"distill.timestep {self.dcfg.timestep!r}: expected 'first' (sigma 1) or 'uniform'")

    def _prepare_data(self):
        cfg = self.cfg
        self.stream = CaptionStream(cfg.data.paths, cfg.data.caption_key, cfg.seed,
                                    cfg.data.shuffle)
        self._validate_data()

    # -- setup --------------------------------------------------------------------
    def _load_models(self):
        from ..mllm import load_mllm

        self.encoder = load_mllm(self.cfg.mllm, dtype=self.weight_dtype, device=self.device)
        self._load_teacher_flux()
        self.net = self._build_alignnet().to(self.device)
        if self.train_cfg.gradient_checkpointing:
            self.flux.enable_gradient_checkpointing()
            if self.net.config.use_t5:
                self.net.t5stack.gradient_checkpointing = True
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = self.net
        if self.cfg.distributed.fsdp_flux and self.dist.enabled:
            self._shard_flux()
        self.capture = AttentionCapture(self.flux)
        make_optimizer_and_schedule(self, self.net.parameters())

    def _load_teacher_flux(self) -> None:
        """The one FLUX both passes share, with its own CLIP and T5 as the teacher's encoders (frozen)."""
        from diffusers import FluxPipeline

        flux_dir = self.cfg.flux
        no_teacher = X2IInputError(
            f"FLUX folder '{flux_dir}' lacks text_encoder / text_encoder_2 (or their tokenizers): distillation "
            "needs FLUX's own CLIP and T5 as the teacher's encoders (a full diffusers FLUX download has them)")
        for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer"):
            if not os.path.isdir(os.path.join(flux_dir, part)):
                if part == "transformer":
                    raise X2IInputError(f"FLUX folder '{flux_dir}' is not a diffusers FLUX folder (no transformer/)")
                raise no_teacher
        try:
            pipe = FluxPipeline.from_pretrained(flux_dir, torch_dtype=self.weight_dtype)
        except (OSError, ValueError) as exc:
            raise X2IInputError(f"FLUX folder '{flux_dir}' cannot be loaded ({exc})") from exc
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise no_teacher
        pipe.to(self.device)
        for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
            m.requires_grad_(False).eval()
        self.pipe = pipe
        self.flux = pipe.transformer
        t5_dim = pipe.text_encoder_2.config.d_model
        if t5_dim != self.flux.config.joint_attention_dim:
            raise X2IShapeError(f"teacher T5 width {t5_dim} differs from FLUX's context width "
                                f"{self.flux.config.joint_attention_dim}")

    def _build_alignnet(self) -> AlignNet:
        """The student: ``alignnet.init`` or a fresh AlignNet for this MLLM and FLUX, checked against both and
        stamped with what it is distilled on."""
        cfg, acfg, tcfg = self.cfg, self.cfg.alignnet, self.flux.config
        if acfg.init:
            net = load_alignnet(acfg.init)
        else:
            fusion = acfg.fusion
            if fusion not in ("conv", "scale", "mean"):
                raise X2IInputError(f"alignnet.fusion {fusion!r}: expected conv, scale or mean")
            torch.manual_seed(int(cfg.seed))
            net = AlignNet(AlignNetConfig(
                in_channels=self.encoder.channels, input_dim=self.encoder.hidden_size,
                output_dim0=tcfg.pooled_projection_dim, output_dim1=tcfg.joint_attention_dim,
                kernel_size=int(acfg.kernel_size), use_t5=bool(acfg.use_t5), use_scale=fusion == "scale",
                use_cnn=fusion == "conv", num_layers=int(acfg.t5_layers), num_heads=int(acfg.t5_heads),
                head_dim=int(acfg.t5_head_dim)))
        c = net.config
        mllm = identity_of(self.encoder)
        check_fits(net.provenance, c.in_channels, c.input_dim, mllm, f"AlignNet '{acfg.init}'")
        # What the file will record: the MLLM, prompt convention and pad rows it is distilled on.
        net.provenance = Provenance(mllm.family, mllm.model, mllm.channels, mllm.hidden, cfg.preset,
                                    self.pad_rows, "trained")
        if (c.output_dim1, c.output_dim0) != (tcfg.joint_attention_dim, tcfg.pooled_projection_dim):
            raise X2IShapeError(
                f"AlignNet outputs widths {c.output_dim1}/{c.output_dim0} but FLUX '{cfg.flux}' expects "
                f"{tcfg.joint_attention_dim}/{tcfg.pooled_projection_dim}")
        return net.requires_grad_(True).train()

    def _shard_flux(self) -> None:
        if self.device.type != "cuda":
            raise X2IInputError("distributed.fsdp_flux shards FLUX over CUDA ranks (nccl); it is not "
                                "available on CPU processes - use plain DDP there")
        from torch.distributed.fsdp import fully_shard

        for block in list(self.flux.transformer_blocks) + list(self.flux.single_transformer_blocks):
            fully_shard(block)
        fully_shard(self.flux)

    def _too_long(self, caption: str) -> str | None:
        limit = int(self.dcfg.tokens)
        n = len(self.pipe.tokenizer_2(caption).input_ids)
        if n > limit:
            return f"{n} T5 tokens > distill.tokens {limit}"
        return None

    def _validate_data(self):
        head = self.stream.head(int(self.cfg.data.validate_first))
        if not head:
            raise X2IInputError(f"dataset {self.stream.files[:3]} has no captions")
        long = [(c, why) for c in head if (why := self._too_long(c))]
        if long and not self.cfg.data.skip_long:
            cap, why = long[0]
            raise X2IInputError(
                f"{len(long)} of the first {len(head)} captions exceed the token limit ({why}), e.g. "
                f"{cap[:80]!r}…; raise distill.tokens, shorten them, or set data.skip_long=true to skip them")

    # -- one step ------------------------------------------------------------------
    def _teacher_embeds(self, captions):
        tokens = int(self.dcfg.tokens)
        if not self.dcfg.cache_teacher_embeddings:
            with torch.no_grad():
                pe, pooled, _ = self.pipe.encode_prompt(captions, captions, device=self.device,
                                                        max_sequence_length=tokens)
            return pe, pooled
        from safetensors.torch import load_file, save_file

        cache = os.path.join(self.out, "teacher_cache")
        os.makedirs(cache, exist_ok=True)
        pes, pools = [], []
        for cap in captions:
            key = hashlib.sha1(f"{tokens}\0{cap}".encode("utf-8")).hexdigest()
            path = os.path.join(cache, key + ".safetensors")
            if os.path.isfile(path):
                d = load_file(path, device=str(self.device))
            else:
                with torch.no_grad():
                    pe, pooled, _ = self.pipe.encode_prompt([cap], [cap], device=self.device, max_sequence_length=tokens)
                d = {"pe": pe[0].contiguous(), "pooled": pooled[0].contiguous()}
                tmp = path + f".tmp{os.getpid()}"
                save_file({k: v.cpu() for k, v in d.items()}, tmp)
                os.replace(tmp, path)
            pes.append(d["pe"])
            pools.append(d["pooled"])
        return torch.stack(pes).to(self.weight_dtype), torch.stack(pools).to(self.weight_dtype)

    def _latents(self, step: int, first_index: int):
        res = int(self.dcfg.resolution)
        side = res // 16
        lat, sig = [], []
        for k in range(self.local_batch):
            g = rt.step_generator(self.cfg.seed, step, first_index + k)
            lat.append(torch.randn(side * side, 64, generator=g))
            sig.append(1.0 if self.dcfg.timestep == "first" else float(torch.rand((), generator=g)))
        latents = torch.stack(lat).to(self.device, self.weight_dtype)
        sigmas = torch.tensor(sig, device=self.device, dtype=self.weight_dtype)
        img_ids = self.pipe._prepare_latent_image_ids(self.local_batch, side, side, self.device, self.weight_dtype)
        return latents, sigmas, img_ids

    def _flux(self, latents, sigmas, img_ids, seq, pooled):
        txt_ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=self.weight_dtype)
        guidance = None
        if self.flux.config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), float(self.dcfg.guidance), device=self.device,
                                  dtype=self.weight_dtype)
        return self.flux(hidden_states=latents, timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def step(self, step: int, captions: list[str]) -> dict:
        """One optimizer step.  ``captions``: this rank's captions of each micro-batch in turn
        (``train.gradient_accumulation`` x the local batch)."""
        n, lb = rt.accumulation(self), self.local_batch
        if len(captions) != n * lb:
            raise X2IInputError(f"step {step}: {len(captions)} captions for {n} micro-batch(es) of {lb}")

        def micro(m, weight):
            a = m - step * n
            return self._micro(m, captions[a * lb:(a + 1) * lb], weight)

        return rt.optimize(self, step, micro, self.net.parameters())

    def _micro(self, step: int, captions: list[str], weight: float):
        """One micro-batch (``step`` counts micro-batches): teacher and student passes, the summed pair
        losses back-propagated with ``weight``."""
        first_index = step * self.global_batch + self.dist.rank * self.local_batch
        # Noise is drawn per (optimizer step, sample index): N micro-batches of B draw what one batch of N x B
        # would (sample indices count on across the micro-batches).
        latents, sigmas, img_ids = self._latents(step // rt.accumulation(self), first_index)
        t_seq, t_pooled = self._teacher_embeds(captions)
        with torch.no_grad():
            teacher = collect(self.capture, lambda: self._flux(latents, sigmas, img_ids, t_seq, t_pooled))
            hidden = self.encoder.encode_text(captions, preset=self.cfg.preset, pad_rows=self.pad_rows).hidden
        s_tokens = hidden.shape[2]
        t_tokens = t_seq.shape[1]
        temperature = float(self.dcfg.temperature)
        backend = self.dcfg.loss_backend
        # Under activation checkpointing each block's forward (and the loss its hooks add) runs again in
        # backward, so the teacher captures stay until then; otherwise each is dropped once used.
        recomputed = bool(self.train_cfg.gradient_checkpointing)
        terms, skipped = [], []

        def pair_loss(key, out):
            if key[0] == "double" and key[2] == "txt" and s_tokens != t_tokens:
                teacher.pop(key, None)
                return None  # text streams of different lengths are not comparable
            ref = teacher[key] if recomputed else teacher.pop(key)
            if key[0] == "single" and s_tokens != t_tokens:
                out, ref = out[:, s_tokens:], ref[:, t_tokens:]
            return distill_loss(out.float() if out.dtype == torch.float16 else out, ref, temperature, backend)

        def record(key, out):
            value = pair_loss(key, out)
            if value is None:
                return
            if finite_or_skip(value.detach()):
                terms.append(value)
            else:
                skipped.append(key)

        def recompute(key, out):
            pair_loss(key, out)  # the same graph as in the forward, for the checkpoint's saved tensors

        amp = torch.autocast(self.device.type, dtype=self.weight_dtype) if self.weight_dtype != torch.float32 \
            else torch.autocast(self.device.type, enabled=False)
        with amp:
            pooled, seq = self.model(hidden)
            self.capture.run(record, lambda: self._flux(latents, sigmas, img_ids, seq.to(self.weight_dtype),
                                                        pooled.to(self.weight_dtype)))
        if not terms:
            raise X2IInputError(f"step {step}: every loss term was non-finite ({len(skipped)} pairs)")
        loss = torch.stack([t.float() for t in terms]).sum()
        try:
            with self.capture.feeding(recompute):
                value = rt.backward(loss, weight)
        finally:
            teacher.clear()
        return value, {"pairs": len(terms), "skipped": len(skipped)}

    # -- checkpoints ------------------------------------------------------------------
    def _write_weights(self, path: str, step: int) -> None:
        self.net.save(path)

    def _state_extra(self) -> dict:
        return {"data_position": self.position}

    def _write_extra(self, folder: str, step: int) -> None:
        rt.write_json(os.path.join(folder, "meta.json"), {"step": step, "config": self.cfg.to_dict()})

    def _read_weights(self, folder: str):
        return load_alignnet(os.path.join(folder, self.weights_name))

    def _apply_weights(self, net) -> None:
        self.net.load_state_dict(net.state_dict())

    def _resumed(self, state: dict | None) -> None:
        self.position = 0 if state is None else int(state.get("data_position", state["step"] * self.global_batch))

    # -- loop ------------------------------------------------------------------------
    def _step_fn(self):
        """Each optimiser step reads the next global batch from the caption stream (every rank the same
        batch, then its share), skipping captions over the token limit when ``data.skip_long``."""
        skip_long = bool(self.cfg.data.skip_long)
        stream = self.stream.iterate_from(self.position)
        self.skipped_long = 0

        def step_fn(step):
            local = []
            for _ in range(rt.accumulation(self)):
                batch = []
                while len(batch) < self.global_batch:  # every rank reads the same global batch
                    cap = next(stream)
                    self.position += 1
                    if skip_long and self._too_long(cap):
                        self.skipped_long += 1
                        continue
                    batch.append(cap)
                local += batch[self.dist.rank * self.local_batch:(self.dist.rank + 1) * self.local_batch]
            return self.step(step, local)

        return step_fn

    def _finish(self, final: str, total: int, eval_start) -> None:
        if self.skipped_long:
            log.warning("skipped %d captions over the token limit", self.skipped_long)

    def sample(self, step: int) -> list[str]:
        from ..pipeline import X2IPipeline

        folder = os.path.join(self.out, "samples")
        os.makedirs(folder, exist_ok=True)
        self.net.eval()
        pipe = X2IPipeline(self.encoder, self.net, self.pipe, alignnet_name="AlignNet (training)")
        paths = []
        scfg = self.cfg.samples
        try:
            for i, prompt in enumerate(scfg.prompts):
                img = pipe.generate(prompt, preset=self.cfg.preset, steps=int(scfg.steps), seed=i,
                                    width=int(scfg.size), height=int(scfg.size), progress=False)
                path = os.path.join(folder, f"step-{step:08d}-{i}.png")
                img.save(path)
                paths.append(path)
        finally:
            self.net.train()
        return paths

    def close(self):
        self.capture.remove()
        self.dist.close()


def run(config_path: str | None, overrides: list[str]) -> str:
    return rt.run_trainer(DistillTrainer, DistillTrainingConfig, config_path, overrides)


__all__ = ["DistillTrainingConfig", "DistillTrainer", "run"]
