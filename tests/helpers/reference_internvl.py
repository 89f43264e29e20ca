"""The reference's InternVL recipes on the reference's own stack (transformers 4.49.0, tokenizers 0.21.0 from
``make refstack`` first on ``PYTHONPATH``).  Nothing here imports x2i_core.

    python reference_internvl.py build OUT_DIR VOCAB_DIR    # a tiny InternVL2.5 in the *original* layout
    python reference_internvl.py run JOB.json               # hidden states of every case

``build`` writes what an original InternVL2.5 folder holds: ``model_type`` ``internvl_chat`` with its
``vision_config`` / ``llm_config``, the original weight names (InternViT's fused ``qkv``, ``ls1``/``ls2``,
``mlp1.*``, ``language_model.*``), the real Qwen2.5 tokenizer vocabulary plus InternVL's added tokens
(``<IMG_CONTEXT>`` lands on 151667, the id the reference hard-codes), and a ``modeling_internvl_chat.py``
that must never be imported (it writes a marker file if it is).

``run`` follows the reference's sources: ``utils/datamodule_internvl.py`` (training: ``str()`` of the dict,
no chat template, ``padding="max_length", max_length=512, truncation=True``), ``infer/inference_internvl.py``
(inference: the ``internvl2_5`` conversation with its system message, ``<image>\\n`` + the dict without
``'image input'``, the image resized to 128x128 then ``load_image`` tiles, ``<image>`` replaced by
``<img>`` + ``<IMG_CONTEXT>`` x tokens-per-tile x tiles + ``</img>``, the same padding) and
``InternVLChatModel.generate`` (the ViT features written over the ``<IMG_CONTEXT>`` embeddings, then the
language model called with ``inputs_embeds`` and the mask: no position ids, so positions are 0..S-1).

The language model is transformers 4.49's own ``Qwen2ForCausalLM`` (what the reference's InternVL code
instantiates).  The vision tower is remote code in the released folders and is not part of transformers
4.49, so ``vit_features`` re-derives InternViT-300M + ``mlp1`` in plain torch from the original weight names
(patch conv, class token, bicubic position embedding, pre-norm blocks with layer scale, pixel shuffle v2).
The released AlignNets were computed on CUDA; the 4.49 unmask step for fully masked query rows is applied
here too (right padding leaves no such row, so it changes nothing - as on CUDA).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from reference_stack import _check_versions, _emulate_cuda_unmask  # the same folder (run as a script)

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
ADDED = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAP = '''import os
open(os.environ.get("X2I_REMOTE_CODE_MARKER", "/tmp/x2i-internvl-remote-code-ran"), "a").write("imported\\n")
raise ImportError("the original InternVL remote code must not be imported by the converter")
'''


def build(out_dir, vocab_dir, seed=0, tile=56):
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    _check_versions()
    os.makedirs(out_dir, exist_ok=True)
    # Qwen2.5's vocabulary and its 22 special tokens (ids up to 151664; ComfyUI's copy adds four more, which
    # InternVL's tokenizer does not have), then InternVL's added tokens from 151665.
    staging = os.path.join(out_dir, ".vocab")
    os.makedirs(staging, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(vocab_dir, name), "rb") as src, open(os.path.join(staging, name), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(vocab_dir, "tokenizer_config.json"), encoding="utf-8") as fh:
        tok_cfg = json.load(fh)
    tok_cfg["added_tokens_decoder"] = {k: v for k, v in tok_cfg["added_tokens_decoder"].items() if int(k) <= 151664}
    with open(os.path.join(staging, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(tok_cfg, fh)
    tok = AutoTokenizer.from_pretrained(staging)
    tok.add_tokens(ADDED, special_tokens=True)
    tok.pad_token = "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 151667, tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    tok.save_pretrained(out_dir)
    import shutil

    shutil.rmtree(staging)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    llm = dict(vocab_size=151674, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False, use_sliding_window=False, sliding_window=32768, max_window_layers=2,
               hidden_act="silu", bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
               torch_dtype="bfloat16")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lm = Qwen2ForCausalLM(Qwen2Config(**llm))
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 if p.dim() >= 2 else 1 + 0.1 * torch.randn(p.shape, generator=g))
    tensors = {f"language_model.{k}": v.contiguous() for k, v in lm.state_dict().items()}
    d, inner, layers, grid = 32, 64, 2, tile // 14

    def rnd(*shape, scale=0.05, base=0.0):
        return (base + scale * torch.randn(shape, generator=g)).contiguous()

    v = "vision_model."
    tensors.update({f"{v}embeddings.class_embedding": rnd(1, 1, d, scale=0.5),
                    f"{v}embeddings.patch_embedding.weight": rnd(d, 3, 14, 14),
                    f"{v}embeddings.patch_embedding.bias": rnd(d),
                    f"{v}embeddings.position_embedding": rnd(1, grid * grid + 1, d, scale=0.5)})
    for i in range(layers):
        p = f"{v}encoder.layers.{i}."
        tensors.update({p + "attn.qkv.weight": rnd(3 * d, d, scale=0.2), p + "attn.qkv.bias": rnd(3 * d),
                        p + "attn.proj.weight": rnd(d, d, scale=0.2), p + "attn.proj.bias": rnd(d),
                        p + "ls1": rnd(d, scale=0.2, base=0.5), p + "ls2": rnd(d, scale=0.2, base=0.5),
                        p + "mlp.fc1.weight": rnd(inner, d, scale=0.2), p + "mlp.fc1.bias": rnd(inner),
                        p + "mlp.fc2.weight": rnd(d, inner, scale=0.2), p + "mlp.fc2.bias": rnd(d),
                        p + "norm1.weight": rnd(d, scale=0.1, base=1.0), p + "norm1.bias": rnd(d),
                        p + "norm2.weight": rnd(d, scale=0.1, base=1.0), p + "norm2.bias": rnd(d)})
    tensors.update({"mlp1.0.weight": rnd(4 * d, scale=0.1, base=1.0), "mlp1.0.bias": rnd(4 * d),
                    "mlp1.1.weight": rnd(64, 4 * d, scale=0.2), "mlp1.1.bias": rnd(64),
                    "mlp1.3.weight": rnd(64, 64, scale=0.2), "mlp1.3.bias": rnd(64)})
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": tile,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "torch_dtype": "bfloat16",
        "llm_config": dict(llm, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": d,
                          "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": inner,
                          "image_size": tile, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
                          "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
                          "use_flash_attn": False},
    }
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    for name in ("modeling_internvl_chat.py", "configuration_internvl_chat.py"):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as fh:
            fh.write(TRAP)
    return out_dir


# -- the reference's image tiling (utils/internvl_util.py), re-derived ---------------------------------
def _closest_ratio(aspect, ratios, width, height, size):
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * size * size * r[0] * r[1]:
            best = r
    return best


def load_image(image, size, max_num=12):
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    w, h = image.size
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    rw, rh = _closest_ratio(w / h, ratios, w, h, size)
    resized = image.resize((size * rw, size * rh))
    tiles = [resized.crop(((k % rw) * size, (k // rw) * size, (k % rw + 1) * size, (k // rw + 1) * size))
             for k in range(rw * rh)]
    if len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    transform = T.Compose([T.Resize((size, size), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    return torch.stack([transform(t.convert("RGB")) for t in tiles])


# -- InternViT + mlp1 from the original weight names --------------------------------------------------
def vit_features(w, cfg, pixel_values):
    vc = cfg["vision_config"]
    d, heads, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]
    v = "vision_model."
    x = F.conv2d(pixel_values, w[f"{v}embeddings.patch_embedding.weight"], w[f"{v}embeddings.patch_embedding.bias"],
                 stride=vc["patch_size"])
    b, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w[f"{v}embeddings.class_embedding"].expand(b, 1, -1), x], dim=1)
    pos = w[f"{v}embeddings.position_embedding"]
    side = vc["image_size"] // vc["patch_size"]
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).reshape(1, -1, gh * gw)
    x = x + torch.cat([pos[:, :1], grid.permute(0, 2, 1)], dim=1)
    for i in range(vc["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        y = F.layer_norm(x, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        n = y.shape[1]
        q, k, val = F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"]).reshape(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = F.linear((att @ val).transpose(1, 2).reshape(b, n, d), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        x = x + y * w[p + "ls1"]
        y = F.layer_norm(x, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + y * w[p + "ls2"]
    x = x[:, 1:]
    s = int(x.shape[1] ** 0.5)
    x = x.reshape(b, s, s, -1)
    r = cfg["downsample_ratio"]
    n_, wd, ht, c = x.shape
    x = x.view(n_, wd, int(ht * r), int(c / r)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n_, int(ht * r), int(wd * r), int(c / (r * r))).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(b, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    return F.linear(F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"])


def internvl25_query(question):
    """get_conv_template('internvl2_5') with the reference's system message, one question, assistant open."""
    sep = "<|im_end|>\n"
    return f"<|im_start|>system\n{SYSTEM}{sep}<|im_start|>user\n{question}{sep}<|im_start|>assistant\n"


@torch.no_grad()
def run(job_file):
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    versions = _check_versions()
    with open(job_file, encoding="utf-8") as fh:
        job = json.load(fh)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    _emulate_cuda_unmask(Qwen2Model)
    folder = job["model"]
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    weights = {k: v.float() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    lm = Qwen2ForCausalLM(Qwen2Config(**cfg["llm_config"])).eval()
    lm.load_state_dict({k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")})
    assert lm.config._attn_implementation == "sdpa", lm.config._attn_implementation
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, pad_token="<|endoftext|>")
    context_id = 151667  # the reference sets img_context_token_id to this constant
    size = cfg["force_image_size"]
    per_tile = int((size // cfg["vision_config"]["patch_size"]) ** 2 * cfg["downsample_ratio"] ** 2)
    tensors = {}
    for case in job["cases"]:
        pixel_values = None
        if case["recipe"] == "training":
            text = str({"Text input": case["text"], "Instruction editing description": "no", "image input": "no"})
        else:
            question = str({"Text input": case.get("text"), "Instruction editing description": "no"})
            if case.get("image"):
                image = Image.open(case["image"]).convert("RGB").resize((128, 128))
                pixel_values = load_image(image, size)
                question = "<image>\n" + question
            text = internvl25_query(question)
            if pixel_values is not None:
                text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * per_tile * pixel_values.shape[0] + "</img>", 1)
        enc = tok(text, return_tensors="pt", padding="max_length", max_length=512, truncation=True,
                  add_special_tokens=True)
        embeds = lm.get_input_embeddings()(enc["input_ids"])
        if pixel_values is not None:
            vit = vit_features(weights, cfg, pixel_values)
            flat = embeds.reshape(-1, embeds.shape[-1])
            selected = enc["input_ids"].reshape(-1) == context_id
            assert int(selected.sum()) == vit.shape[0] * vit.shape[1]
            flat[selected] = vit.reshape(-1, flat.shape[-1])
            embeds = flat.reshape(embeds.shape)
        out = lm(inputs_embeds=embeds, attention_mask=enc["attention_mask"], output_hidden_states=True)
        key = case["id"]
        tensors[f"{key}.hidden"] = torch.stack(out.hidden_states, dim=1).contiguous()
        tensors[f"{key}.input_ids"] = enc["input_ids"].contiguous()
        tensors[f"{key}.attention_mask"] = enc["attention_mask"].contiguous()
        if pixel_values is not None:
            tensors[f"{key}.pixel_values"] = pixel_values.contiguous()
    save_file(tensors, job["out"], metadata={"versions": json.dumps(versions)})


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}; expected build or run")
    print("ok", file=sys.stderr)
    os._exit(0)
