"""The tiny model factory: real formats, real special tokens, deterministic."""

import ast
import json
import os

import torch
from safetensors.torch import load_file

from x2i_core.tiny import QWEN_SPECIAL_TOKENS, comfy_flux_state_dict, make_tiny_models, taesd_flux_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tokenizer_has_real_special_tokens_and_chat_template(encoder):
    tok = encoder.processor.tokenizer
    for t in QWEN_SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = encoder.processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    # Byte-level: any language round-trips.
    s = "Ein Hund 一只狗 🐕"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_tiny_models_are_deterministic(tmp_path, tiny):
    again = make_tiny_models(str(tmp_path / "again"), comfy=False)
    for key in ("alignnet_safetensors",):
        a, b = load_file(tiny[key]), load_file(again[key])
        assert all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(os.path.join(tiny["mllm"], "model.safetensors"))
    b = load_file(os.path.join(again["mllm"], "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(tiny["mllm"], "tokenizer.json"), encoding="utf-8") as f1, \
            open(os.path.join(again["mllm"], "tokenizer.json"), encoding="utf-8") as f2:
        assert json.load(f1) == json.load(f2)


def test_cache_is_reused_when_complete(tiny):
    root = os.path.dirname(os.path.dirname(tiny["mllm"]))
    before = os.path.getmtime(tiny["alignnet"])
    assert make_tiny_models(root, comfy=False) == tiny
    assert os.path.getmtime(tiny["alignnet"]) == before


def test_comfy_flux_single_file_has_the_detected_shapes():
    sd = comfy_flux_state_dict(double_blocks=1, single_blocks=0, dtype=torch.float16)
    assert sd["img_in.weight"].shape == (3072, 64)
    assert sd["txt_in.weight"].shape == (3072, 4096)
    assert sd["vector_in.in_layer.weight"].shape == (3072, 768)
    assert "guidance_in.in_layer.weight" in sd
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert not any(k.startswith("single_blocks.") for k in sd)
    n = sum(v.numel() for v in sd.values())
    assert 390e6 < n < 420e6


def test_taesd_vae_has_comfy_layout():
    sd = taesd_flux_state_dict()
    assert sd["taesd_encoder.0.weight"].shape[1] == 3
    assert any(k.startswith("taesd_decoder.1.") for k in sd) and not any(k.startswith("taesd_decoder.0.") for k in sd)
    assert "vae_scale" in sd and "vae_shift" in sd
    enc_out = [k for k in sd if k.startswith("taesd_encoder.") and k.endswith(".weight")][-1]
    assert sd[enc_out].shape[0] == 16


def test_x2i_core_never_imports_comfyui():
    for folder, _, files in os.walk(os.path.join(ROOT, "x2i_core")):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module or ""]
                for m in mods:
                    assert m.split(".")[0] not in {"comfy", "comfy_api", "folder_paths", "nodes", "execution",
                                                    "comfy_extras", "comfy_execution"}, f"{name} imports {m}"
