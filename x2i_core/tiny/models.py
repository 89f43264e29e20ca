"""Tiny random models in the same on-disk formats real users download.

``python -m x2i_core make-tiny-models DIR`` writes:

* ``mllm/Qwen2.5-VL-tiny/`` - a Hugging Face Qwen2.5-VL folder (2 decoder
  layers, width 64, a 2-block vision tower), with a byte-level BPE tokenizer
  trained here on a built-in corpus that carries the real Qwen2.5-VL special
  tokens and chat template, and the image/video processor configs;
* ``mllm/Qwen2.5-Omni-tiny/`` and ``mllm/InternVL-tiny/`` - the other MLLM
  families in their released folder formats, same depth and width (so one
  AlignNet fits all three), see :mod:`x2i_core.tiny.families`;
* ``x2i/alignnet-tiny.pt`` - a matching AlignNet in the *published* layout
  (``torch.save({"config", "state_dict"})``), plus ``x2i/alignnet-tiny.safetensors``
  in ours;
* ``flux/FLUX-tiny/`` - a diffusers FLUX folder (transformer with 1 double and
  1 single block, width 32; a small 16-channel AutoencoderKL; the
  flow-matching scheduler; tiny CLIP-L / T5 stand-ins with their tokenizers,
  the teacher encoders for distillation - X2I inference never loads them);
* unless ``comfy=False``: ``comfy/flux-tiny-3072.safetensors`` - a FLUX in the
  original (BFL) key layout that ComfyUI's stock UNETLoader detects (width
  3072 is fixed by the detector, 1 double block, 0 single blocks, ~0.8 GB in
  fp16) and ``comfy/taesd-flux-tiny.safetensors`` - a 16-channel TAESD-format
  VAE that ComfyUI's VAELoader accepts for FLUX latents.

Everything is deterministic from ``seed``; a ``manifest.json`` records what
was built so a cache can be reused.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from ..io import atomic_save_safetensors, atomic_write_json
from ..prompt import QWEN25VL_CHAT_TEMPLATE  # the published template, reproduced
from .parts import (  # noqa: F401  (re-exported: the tokenizer and helpers are part of this module's API)
    QWEN_SPECIAL_TOKENS,
    _bpe,
    _spread,
    _staging,
    _unigram,
    build_tokenizer,
)

log = logging.getLogger("x2i")

TINY_VERSION = 10

def build_teacher_text_encoders(seed: int = 0, joint_dim: int = 4096, pooled_dim: int = 768):
    """Tiny CLIP-L and T5-XXL stand-ins (2 layers) with their tokenizers: FLUX's teacher encoders."""
    from tokenizers import processors
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    clip_tok = _bpe(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = clip_tok.token_to_id("<|startoftext|>"), clip_tok.token_to_id("<|endoftext|>")
    clip_tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    # A generic fast tokenizer with CLIP's special tokens (CLIPTokenizerFast insists on CLIP's own BPE).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=clip_tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)
    t5_tok = _unigram(["<pad>", "</s>", "<unk>"])
    t5_tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", t5_tok.token_to_id("</s>"))])
    tokenizer_2 = T5TokenizerFast(tokenizer_object=t5_tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  model_max_length=512, extra_ids=0)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=pooled_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        projection_dim=pooled_dim)).eval()
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=joint_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=t5_tok.token_to_id("<pad>"),
        eos_token_id=t5_tok.token_to_id("</s>"), decoder_start_token_id=0, tie_word_embeddings=False)).eval()
    return tokenizer, clip, tokenizer_2, t5


def build_qwen25vl(out_dir: str, seed: int = 0, num_layers: int = 2, hidden: int = 64) -> str:
    """A tiny Qwen2.5-VL model folder at ``out_dir``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = build_tokenizer(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": mrope}, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
            out_hidden_size=hidden, tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _spread(model, seed)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.do_sample = False
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 768, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                    chat_template=QWEN25VL_CHAT_TEMPLATE)
    with _staging(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out_dir


def build_alignnet(channels: int, hidden: int, seed: int = 0, fusion: str = "conv", use_t5: bool = False,
                   output_dim0: int = 768, output_dim1: int = 4096):
    from ..alignnet import AlignNet, AlignNetConfig

    cfg = AlignNetConfig(in_channels=channels, input_dim=hidden, output_dim0=output_dim0, output_dim1=output_dim1,
                         num_layers=2, num_heads=2, head_dim=hidden // 2, use_t5=use_t5,
                         use_scale=fusion == "scale", use_cnn=fusion == "conv")
    torch.manual_seed(seed)
    net = AlignNet(cfg)
    with torch.no_grad():
        # Small output scale so the tiny FLUX sees inputs of T5-like magnitude.
        net.mlp.projector[2].weight.mul_(0.5)
    return net.eval()


def save_published_alignnet(net, path: str) -> None:
    """``torch.save({"config": …, "state_dict": …})`` as the released checkpoints are."""
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"config": net.config.to_dict(), "state_dict": net.state_dict()}, tmp)


def build_flux_diffusers(out_dir: str, seed: int = 0, joint_dim: int = 4096, pooled_dim: int = 768,
                         double_blocks: int = 1, single_blocks: int = 1, heads: int = 2) -> str:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double_blocks, num_single_layers=single_blocks,
        attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=joint_dim, pooled_projection_dim=pooled_dim,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, sample_size=64,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    tokenizer, clip, tokenizer_2, t5 = build_teacher_text_encoders(seed + 3, joint_dim, pooled_dim)
    with _staging(out_dir) as tmp:
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        clip.save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=True)
        tokenizer_2.save_pretrained(os.path.join(tmp, "tokenizer_2"))
        t5.save_pretrained(os.path.join(tmp, "text_encoder_2"), safe_serialization=True)
        transformer.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
        vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as fh:
            json.dump({
                "_class_name": "FluxPipeline", "_diffusers_version": _diffusers_version(),
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }, fh, indent=2)
    return out_dir


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def comfy_flux_state_dict(seed: int = 0, double_blocks: int = 1, single_blocks: int = 0, hidden: int = 3072,
                          context_dim: int = 4096, vec_dim: int = 768, in_channels: int = 64,
                          dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random FLUX weights in the original key layout (what ComfyUI's detector reads)."""
    g = torch.Generator().manual_seed(seed)
    mlp = hidden * 4
    head_dim = 128
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name, out_f, in_f, bias=True):
        shapes[f"{name}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{name}.bias"] = (out_f,)

    lin("img_in", hidden, in_channels)
    lin("txt_in", hidden, context_dim)
    for emb, width in (("time_in", 256), ("guidance_in", 256), ("vector_in", vec_dim)):
        lin(f"{emb}.in_layer", hidden, width)
        lin(f"{emb}.out_layer", hidden, hidden)
    for i in range(double_blocks):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            lin(f"{p}_mod.lin", 6 * hidden, hidden)
            lin(f"{p}_attn.qkv", 3 * hidden, hidden)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (head_dim,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (head_dim,)
            lin(f"{p}_attn.proj", hidden, hidden)
            lin(f"{p}_mlp.0", mlp, hidden)
            lin(f"{p}_mlp.2", hidden, mlp)
    for i in range(single_blocks):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * hidden + mlp, hidden)
        lin(f"{p}.linear2", hidden, hidden + mlp)
        shapes[f"{p}.norm.query_norm.scale"] = (head_dim,)
        shapes[f"{p}.norm.key_norm.scale"] = (head_dim,)
        lin(f"{p}.modulation.lin", 3 * hidden, hidden)
    lin("final_layer.linear", in_channels, hidden)
    lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    sd = {}
    for name, shape in shapes.items():
        if name.endswith(".scale"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * (0.5 / shape[-1] ** 0.5)
        sd[name] = t.to(dtype)
    return sd


def taesd_flux_state_dict(seed: int = 0, latent_channels: int = 16) -> dict[str, torch.Tensor]:
    """A TAESD-format VAE (16 latent channels) in ComfyUI's single-file key layout.

    Built with diffusers' ``AutoencoderTiny`` (the same architecture) and
    renamed: ``encoder.layers.N`` -> ``taesd_encoder.N``; ``decoder.layers.N``
    -> ``taesd_decoder.(N+1)`` (ComfyUI's decoder starts with a parameterless
    clamp); plus ``vae_scale`` / ``vae_shift``.
    """
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(latent_channels=latent_channels)
    sd = {}
    for k, v in tiny.state_dict().items():
        part, _, rest = k.partition(".layers.")
        idx, _, tail = rest.partition(".")
        if part == "encoder":
            sd[f"taesd_encoder.{int(idx)}.{tail}"] = v
        elif part == "decoder":
            sd[f"taesd_decoder.{int(idx) + 1}.{tail}"] = v
    # Random decoders output ~0 (black after ComfyUI's [-1, 1] mapping); centre the
    # last conv on mid-grey and widen it so the tiny pictures show their noise.
    last = max((k for k in sd if k.startswith("taesd_decoder.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    sd[last] = sd[last] * 20.0
    sd[last.replace(".weight", ".bias")] = torch.full_like(sd[last.replace(".weight", ".bias")], 0.5)
    sd["vae_scale"] = torch.tensor(0.3611)
    sd["vae_shift"] = torch.tensor(0.1159)
    return {k: v.contiguous() for k, v in sd.items()}


def make_tiny_models(root: str, seed: int = 0, comfy: bool = True, force: bool = False) -> dict[str, Any]:
    """Build the full tiny set under ``root`` (reused when its manifest matches)."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    manifest_path = os.path.join(root, "manifest.json")
    wanted = {"version": TINY_VERSION, "seed": seed}
    if not force and os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        if all(manifest.get(k) == v for k, v in wanted.items()) and (manifest.get("comfy") or not comfy):
            if all(os.path.exists(os.path.join(root, p)) for p in manifest["paths"].values()):
                return _absolute(root, manifest)
    paths = {
        "mllm": "mllm/Qwen2.5-VL-tiny",
        "alignnet": "x2i/alignnet-tiny.pt",
        "alignnet_safetensors": "x2i/alignnet-tiny.safetensors",
        "flux": "flux/FLUX-tiny",
    }
    log.info("building tiny models in %s", root)
    build_qwen25vl(os.path.join(root, paths["mllm"]), seed=seed)
    from .families import build_internvl, build_minicpmo, build_qwen25omni

    paths["mllm_omni"] = "mllm/Qwen2.5-Omni-tiny"
    build_qwen25omni(os.path.join(root, paths["mllm_omni"]), seed=seed + 10)
    paths["mllm_internvl"] = "mllm/InternVL-tiny"
    build_internvl(os.path.join(root, paths["mllm_internvl"]), seed=seed + 11)
    paths["mllm_minicpmo"] = "mllm/MiniCPM-o-tiny"
    build_minicpmo(os.path.join(root, paths["mllm_minicpmo"]), seed=seed + 12)
    os.makedirs(os.path.join(root, "x2i"), exist_ok=True)
    # MiniCPM-o's tiny LLM is 128 wide (its resampler has width / 128 heads): an AlignNet of its own, in the
    # published layout (a bare torch state dict, as the released AlignNets)
    paths["alignnet_minicpmo"] = "x2i/alignnet-minicpmo-tiny.pt"
    save_published_alignnet(build_alignnet(channels=3, hidden=128, seed=seed + 13),
                            os.path.join(root, paths["alignnet_minicpmo"]))
    net = build_alignnet(channels=3, hidden=64, seed=seed + 1)
    save_published_alignnet(net, os.path.join(root, paths["alignnet"]))
    net.save(os.path.join(root, paths["alignnet_safetensors"]))
    build_flux_diffusers(os.path.join(root, paths["flux"]), seed=seed + 2)
    # LightControl for the diffusers tiny FLUX (width 32), in the published layout (a bare ModuleList state dict).
    from ..lightcontrol import LightControl, LightControlConfig

    paths["lightcontrol"] = "x2i/lightcontrol-tiny-w32.bin"
    torch.manual_seed(seed + 6)
    lc = LightControl(LightControlConfig(num_modules=1, out_dim=32))
    from ..io import atomic_path

    with atomic_path(os.path.join(root, paths["lightcontrol"])) as tmp:
        torch.save(lc.state_dict(), tmp)
    # A narrow-context variant (T5 width 64, CLIP width 32) for fast training tests.
    paths["flux_small"] = "flux/FLUX-tiny-ctx64"
    build_flux_diffusers(os.path.join(root, paths["flux_small"]), seed=seed + 5, joint_dim=64, pooled_dim=32)
    if comfy:
        paths["comfy_flux"] = "comfy/flux-tiny-3072.safetensors"
        paths["comfy_vae"] = "comfy/taesd-flux-tiny.safetensors"
        os.makedirs(os.path.join(root, "comfy"), exist_ok=True)
        atomic_save_safetensors(comfy_flux_state_dict(seed + 3), os.path.join(root, paths["comfy_flux"]))
        atomic_save_safetensors(taesd_flux_state_dict(seed + 4), os.path.join(root, paths["comfy_vae"]))
        paths["comfy_lightcontrol"] = "x2i/lightcontrol-tiny-3072.safetensors"
        torch.manual_seed(seed + 7)
        LightControl(LightControlConfig(num_modules=1, out_dim=3072)).save(os.path.join(root, paths["comfy_lightcontrol"]))
    manifest = {**wanted, "comfy": comfy, "paths": paths}
    atomic_write_json(manifest_path, manifest)
    return _absolute(root, manifest)


def _absolute(root: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: os.path.join(root, v) for k, v in manifest["paths"].items()}


def default_cache_dir() -> str:
    env = os.environ.get("X2I_TINY_DIR")
    if env:
        return env
    from ..mllm.chat import transformers_major

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # One cache per transformers major version: each saves its configs its own way (a stack never reads the
    # other's files; the reference oracles build their own with transformers 4.49).
    return os.path.join(base, "x2i", f"tiny-v{TINY_VERSION}-tf{transformers_major()}")
