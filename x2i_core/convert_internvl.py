"""Convert an original InternVL2.5 folder (``model_type`` ``internvl_chat``, the layout the released
InternVL AlignNets were trained with) to the transformers ``-hf`` layout that :mod:`x2i_core.mllm.internvl`
loads - without running the folder's Python code.

The original folders hold remote code (``modeling_internvl_chat.py`` ...).  Nothing of it is imported
here: the config is read as JSON, the weights as safetensors (torch pickles are refused), and every tensor
is renamed (the vision tower's fused ``qkv`` split into q / k / v) to what
``InternVLForConditionalGeneration`` expects.  Supported: Qwen2 language models (InternVL2.5-1B / -4B,
the two with released AlignNets) and the pixel-shuffle version ``v2`` they use.

    python -m x2i_core convert-internvl /models/InternVL2_5-1B /models/InternVL2_5-1B-x2i-hf

The output folder is written in a temporary folder beside it and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

from .errors import X2IFileError, X2IInputError
from .io import make_temp_dir

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The system message of InternVL's internvl2_5 conversation template.
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def chat_template(system: str) -> str:
    """A ChatML template with ``system`` as the default system message: ``<IMG_CONTEXT>`` per image and
    ``<video>`` per video before the text, as the -hf processors expect (they expand them into image tokens)."""
    return (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
        "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
        "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


CHAT_TEMPLATE = chat_template(SYSTEM)
MEDIA_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# original name -> -hf name (regular expressions, applied in order; the fused qkv is split separately)
RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.q_norm\.", r"model.vision_tower.encoder.layer.\1.attention.q_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.k_norm\.", r"model.vision_tower.encoder.layer.\1.attention.k_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def hf_names(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One original tensor -> its -hf name(s) and tensor(s)."""
    m = QKV.match(name)
    if m:
        q, k, v = tensor.chunk(3, dim=0)
        base = f"model.vision_tower.encoder.layer.{m.group(1)}.attention"
        return {f"{base}.q_proj.{m.group(2)}": q.clone(), f"{base}.k_proj.{m.group(2)}": k.clone(),
                f"{base}.v_proj.{m.group(2)}": v.clone()}
    for pattern, repl in RENAMES:
        if re.match(pattern, name):
            return {re.sub(pattern, repl, name): tensor}
    raise X2IFileError(f"weight '{name}' is not part of an InternVL2.5 (Qwen2) checkpoint; nothing was written")


def _read_config(src: str) -> dict[str, Any]:
    from .mllm.chat import read_model_config

    cfg = read_model_config(src)
    if cfg.get("model_type") != "internvl_chat":
        raise X2IInputError(f"'{src}' holds a {cfg.get('model_type')!r} model; convert-internvl reads the original "
                            "InternVL layout (model_type 'internvl_chat', e.g. OpenGVLab/InternVL2_5-1B)")
    llm = cfg.get("llm_config") or {}
    arch = (llm.get("architectures") or ["?"])[0]
    if arch != "Qwen2ForCausalLM":
        raise X2IInputError(f"'{src}' uses a {arch} language model; convert-internvl supports Qwen2 language models "
                            "(InternVL2.5-1B and -4B, the ones with released X2I AlignNets)")
    if cfg.get("ps_version", "v2") != "v2":
        raise X2IInputError(f"'{src}' uses pixel-shuffle version {cfg.get('ps_version')!r}; only 'v2' is supported")
    if not isinstance(cfg.get("vision_config"), dict):
        raise X2IFileError(f"'{src}/config.json' has no vision_config; expected an InternVL config")
    return cfg


def _weight_files(src: str) -> list[str]:
    names = sorted(os.listdir(src))
    files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        found = f" (only torch pickles: {', '.join(pickles)})" if pickles else ""
        raise X2IFileError(f"'{src}' has no .safetensors weights{found}; "
                           "convert-internvl reads safetensors only - download the model's .safetensors files")
    return files


def hf_config(cfg: dict[str, Any], image_token_id: int, pad_id: int | None, eos_id: int | None):
    from transformers import InternVLConfig

    v = cfg["vision_config"]
    size = int(cfg.get("force_image_size") or v["image_size"])
    patch = int(v["patch_size"])
    ratio = float(cfg.get("downsample_ratio", 0.5))
    vision = dict(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                  num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                  image_size=[size, size], patch_size=[patch, patch], attention_bias=bool(v.get("qkv_bias", True)),
                  use_qk_norm=bool(v.get("qk_normalization", False)), norm_type=v.get("norm_type", "layer_norm"),
                  layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)), hidden_act=v.get("hidden_act", "gelu"),
                  use_mean_pooling=True, use_absolute_position_embeddings=True)
    text = {k: val for k, val in cfg["llm_config"].items()
            if k not in ("architectures", "auto_map", "_name_or_path", "transformers_version", "attn_implementation",
                         "torch_dtype")}
    text["model_type"] = "qwen2"
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                          image_seq_length=int((size // patch) ** 2 * ratio ** 2), downsample_ratio=ratio,
                          vision_feature_layer=int(cfg.get("select_layer", -1)),
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          pad_token_id=pad_id, eos_token_id=eos_id,
                          torch_dtype=cfg.get("torch_dtype") or cfg["llm_config"].get("torch_dtype", "bfloat16"))


def _tokenizer(src: str):
    from transformers import AutoTokenizer

    tok_cfg_path = os.path.join(src, "tokenizer_config.json")
    if not os.path.isfile(tok_cfg_path):
        raise X2IFileError(f"'{src}' has no tokenizer_config.json; download the model folder completely")
    with open(tok_cfg_path, encoding="utf-8") as fh:
        tok_cfg = json.load(fh)
    if "auto_map" in tok_cfg or "Qwen2" not in str(tok_cfg.get("tokenizer_class", "Qwen2Tokenizer")):
        raise X2IInputError(f"'{src}' needs a remote-code tokenizer ({tok_cfg.get('tokenizer_class')}); "
                            "convert-internvl supports the Qwen2-tokenizer InternVL2.5 models")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False, extra_special_tokens=MEDIA_TOKENS)
    except (OSError, ValueError) as exc:
        raise X2IFileError(f"'{src}': its tokenizer cannot be read ({exc})") from exc
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"  # what the reference sets when it loads these tokenizers
    missing = [t for t in ("<img>", "</img>", "<IMG_CONTEXT>") if t not in tok.get_vocab()]
    if missing:
        raise X2IFileError(f"'{src}': its tokenizer lacks InternVL's image tokens {missing}")
    return tok


def convert_internvl(src: str, dst: str, force: bool = False) -> str:
    """Convert the original folder ``src`` to a new -hf folder ``dst`` (see the module docstring)."""
    src, dst = os.fspath(src), os.fspath(dst)
    cfg = _read_config(src)
    files = _weight_files(src)
    if os.path.exists(dst) and not force:
        raise X2IFileError(f"output folder '{dst}' exists; choose a new folder (or pass --force to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise X2IFileError(f"output folder's parent '{parent}' does not exist")
    tok = _tokenizer(src)
    image_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    config = hf_config(cfg, image_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
    tmp = make_temp_dir(".tmp-internvl-", parent)
    try:
        _write_weights(src, files, tmp)
        config.save_pretrained(tmp)
        _write_processor(cfg, config, tok, tmp)
        if os.path.isfile(os.path.join(src, "generation_config.json")):
            shutil.copy(os.path.join(src, "generation_config.json"), os.path.join(tmp, "generation_config.json"))
        with open(os.path.join(tmp, "x2i_converted_from.json"), "w", encoding="utf-8") as fh:
            json.dump({"source": os.path.abspath(src), "model_type": "internvl_chat",
                       "weights": files, "template": cfg.get("template")}, fh, indent=2)
        _check_complete(tmp, config)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_weights(src: str, files: list[str], tmp: str) -> None:
    """Each source weight file renamed to the -hf keys, one output file per input (with an index if several)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index: dict[str, str] = {}
    total = 0
    for name in files:
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(os.path.join(src, name), "pt") as fh:
                for key in fh.keys():
                    out.update(hf_names(key, fh.get_tensor(key)))
        except X2IFileError:
            raise
        except Exception as exc:  # safetensors' own error types vary by version
            raise X2IFileError(f"'{os.path.join(src, name)}' is not a readable safetensors file ({exc})") from exc
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(tmp, name), metadata={"format": "pt"})
        index.update({k: name for k in out})
        total += sum(v.numel() * v.element_size() for v in out.values())
    if len(files) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": index}, fh, indent=2)
    elif files[0] != "model.safetensors":
        os.replace(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))


def _write_processor(cfg: dict, config, tok, tmp: str) -> None:
    """The -hf processor: GOT-OCR2 image tiles of the model's size, the video processor, the chat template."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    size = config.vision_config.image_size[0]
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": size, "width": size}, crop_to_patches=bool(cfg.get("dynamic_image_size", True)),
            min_patches=int(cfg.get("min_dynamic_patch", 1)), max_patches=int(cfg.get("max_dynamic_patch", 12)),
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_normalize=True),
        video_processor=InternVLVideoProcessor(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN,
                                               image_std=IMAGENET_STD),
        tokenizer=tok, image_seq_length=config.image_seq_length, chat_template=CHAT_TEMPLATE)
    tok.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(tmp)


def _check_complete(folder: str, config) -> None:
    """Every weight the -hf model has is in the converted files, and nothing else (shapes checked on load)."""
    from safetensors import safe_open
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        expected = set(InternVLForConditionalGeneration(config).state_dict())
    if config.text_config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    found: set[str] = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as fh:
                found.update(fh.keys())
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise X2IFileError(f"converted weights do not match the -hf InternVL model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}; nothing was written")
