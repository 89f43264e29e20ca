"""Writes the drag-and-drop workflows in ``workflows/`` (UI format) and their thumbnails.

The graphs are declared compactly below; input/output sockets and their types
come from a real ComfyUI's ``/object_info`` (saved JSON or a running server),
so the files carry exactly the slots the frontend expects.

    python tools/make_workflows.py OBJECT_INFO.json
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

PROMPT = "一只在雪地里奔跑的红狐狸，清晨的阳光 (a red fox running through snow at dawn)"

# name -> (description, nodes); node = (id, type, pos, widgets, {input: (src_id, src_slot)}, title)
WORKFLOWS = {
    "x2i_text2image.json": (
        "X2I text to image with stock FLUX nodes: the MLLM reads the prompt (any language), the AlignNet turns it "
        "into a FLUX conditioning, stock KSampler/VAE do the rest.",
        [
            (1, "UNETLoader", (40, 60), ["flux1-dev.safetensors", "default"], {}, None),
            (2, "VAELoader", (40, 200), ["ae.safetensors"], {}, None),
            (3, "X2IMLLMLoader", (40, 320), ["Qwen2.5-VL-7B-Instruct", "auto", "default"], {}, None),
            (4, "X2IAlignNetLoader", (40, 500), ["alignnet-qwen2.5-vl-7b.safetensors"], {}, None),
            (5, "X2IMLLMEncode", (420, 320), [PROMPT, "auto", 0], {"mllm": (3, 0)}, None),
            (6, "X2IAlignNetProject", (820, 320), [3.5], {"hidden": (5, 0), "alignnet": (4, 0)}, None),
            (7, "ConditioningZeroOut", (820, 520), [], {"conditioning": (6, 0)}, None),
            (8, "EmptySD3LatentImage", (820, 640), [1024, 1024, 1], {}, None),
            (9, "KSampler", (1200, 200), [0, "fixed", 28, 1.0, "euler", "simple", 1.0],
             {"model": (1, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)}, None),
            (10, "VAEDecode", (1580, 200), [], {"samples": (9, 0), "vae": (2, 0)}, None),
            (11, "SaveImage", (1580, 360), ["X2I"], {"images": (10, 0)}, None),
        ],
    ),
    "x2i_sampler.json": (
        "X2I with the one-node X2I Sampler (FLUX guidance, cfg 1, empty latent and decode in one node).",
        [
            (1, "UNETLoader", (40, 60), ["flux1-dev.safetensors", "default"], {}, None),
            (2, "VAELoader", (40, 200), ["ae.safetensors"], {}, None),
            (3, "X2IMLLMLoader", (40, 320), ["Qwen2.5-VL-7B-Instruct", "auto", "default"], {}, None),
            (4, "X2IAlignNetLoader", (40, 500), ["alignnet-qwen2.5-vl-7b.safetensors"], {}, None),
            (5, "X2IMLLMEncode", (420, 320), ["A lighthouse on a rocky coast under a stormy sky, oil painting",
                                              "auto", 0], {"mllm": (3, 0)}, None),
            (6, "X2IAlignNetProject", (820, 320), [3.5], {"hidden": (5, 0), "alignnet": (4, 0)}, None),
            (7, "X2ISampler", (1200, 200), [0, "fixed", 28, 3.5, 1024, 1024, "euler", "simple", 1.0],
             {"model": (1, 0), "vae": (2, 0), "conditioning": (6, 0)}, None),
            (8, "SaveImage", (1600, 200), ["X2I"], {"images": (7, 0)}, None),
        ],
    ),
    "x2i_lora.json": (
        "X2I with a FLUX LoRA trained under X2I conditioning (python -m x2i_core train-lora): the stock "
        "LoraLoaderModelOnly applies it to FLUX; prompts then come from the MLLM + AlignNet as usual.",
        [
            (1, "UNETLoader", (40, 60), ["flux1-dev.safetensors", "default"], {}, None),
            (9, "LoraLoaderModelOnly", (420, -120), ["x2i_lora.safetensors", 1.0], {"model": (1, 0)}, None),
            (2, "VAELoader", (40, 200), ["ae.safetensors"], {}, None),
            (3, "X2IMLLMLoader", (40, 320), ["Qwen2.5-VL-7B-Instruct", "auto", "default"], {}, None),
            (4, "X2IAlignNetLoader", (40, 500), ["alignnet-qwen2.5-vl-7b.safetensors"], {}, None),
            (5, "X2IMLLMEncode", (420, 320), ["A portrait of a woman in the trained style", "auto", 0],
             {"mllm": (3, 0)}, None),
            (6, "X2IAlignNetProject", (820, 320), [3.5], {"hidden": (5, 0), "alignnet": (4, 0)}, None),
            (7, "X2ISampler", (1200, 200), [0, "fixed", 28, 3.5, 1024, 1024, "euler", "simple", 1.0],
             {"model": (9, 0), "vae": (2, 0), "conditioning": (6, 0)}, None),
            (8, "SaveImage", (1600, 200), ["X2I_lora"], {"images": (7, 0)}, None),
        ],
    ),
    "x2i_edit_lightcontrol.json": (
        "Instruction editing: the MLLM reads the source image and the instruction; X2I LightControl, applied "
        "with the stock Apply ControlNet node to the same source image, keeps the edit faithful to it.",
        [
            (1, "UNETLoader", (40, 60), ["flux1-dev.safetensors", "default"], {}, None),
            (2, "VAELoader", (40, 200), ["ae.safetensors"], {}, None),
            (3, "X2IMLLMLoader", (40, 320), ["Qwen2.5-VL-7B-Instruct", "auto", "default"], {}, None),
            (4, "X2IAlignNetLoader", (40, 500), ["alignnet-qwen2.5-vl-7b.safetensors"], {}, None),
            (10, "LoadImage", (40, 640), ["source.png", "image"], {}, None),
            (5, "X2IMLLMEncode", (420, 320), ["Make it a snowy winter evening, keep everything else the same.",
                                              "auto", 0], {"mllm": (3, 0), "image": (10, 0)}, None),
            (6, "X2IAlignNetProject", (820, 320), [3.5], {"hidden": (5, 0), "alignnet": (4, 0)}, None),
            (7, "ConditioningZeroOut", (820, 520), [], {"conditioning": (6, 0)}, None),
            (11, "X2ILightControlLoader", (420, 680), ["lightcontrol-flux-dev.safetensors"], {}, None),
            (12, "ControlNetApplyAdvanced", (820, 640), [1.0, 0.0, 1.0],
             {"positive": (6, 0), "negative": (7, 0), "control_net": (11, 0), "image": (10, 0)}, None),
            (8, "EmptySD3LatentImage", (820, 860), [1024, 1024, 1], {}, None),
            (9, "KSampler", (1200, 200), [0, "fixed", 28, 1.0, "euler", "simple", 1.0],
             {"model": (1, 0), "positive": (12, 0), "negative": (12, 1), "latent_image": (8, 0)}, None),
            (13, "VAEDecode", (1580, 200), [], {"samples": (9, 0), "vae": (2, 0)}, None),
            (14, "SaveImage", (1580, 360), ["X2I_edit"], {"images": (13, 0)}, None),
        ],
    ),
}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def build(nodes, object_info, description):
    by_id = {n[0]: n for n in nodes}
    # topological order for the "order" field
    order, seen = [], set()

    def visit(nid):
        if nid in seen:
            return
        seen.add(nid)
        for src, _ in by_id[nid][4].values():
            visit(src)
        order.append(nid)

    for n in nodes:
        visit(n[0])
    links, out_links = [], {}
    ui_nodes = []
    link_id = 0
    # first pass: inputs and links
    node_inputs = {}
    for nid, ntype, pos, widgets, conns, title in nodes:
        info = object_info[ntype]
        ordered = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
        ins = []
        for name, spec in ordered:
            if _is_widget(spec):
                continue
            entry = {"name": name, "type": spec[0], "link": None}
            if name in info["input"].get("optional", {}):
                entry["shape"] = 7
            if name in conns:
                src, slot = conns[name]
                link_id += 1
                out_type = object_info[by_id[src][1]]["output"][slot]
                links.append([link_id, src, slot, nid, len(ins), out_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
            ins.append(entry)
        missing = set(conns) - {i["name"] for i in ins}
        if missing:
            raise KeyError(f"{ntype}: no socket input(s) {missing}")
        node_inputs[nid] = ins
    for nid, ntype, pos, widgets, conns, title in nodes:
        info = object_info[ntype]
        outs = []
        for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
            outs.append({"name": oname, "type": otype, "links": out_links.get((nid, slot), []), "slot_index": slot})
        node = {
            "id": nid, "type": ntype, "pos": list(pos), "size": [340, 130 if ntype != "X2IMLLMEncode" else 220],
            "flags": {}, "order": order.index(nid), "mode": 0, "inputs": node_inputs[nid], "outputs": outs,
            "properties": {"Node name for S&R": ntype}, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        ui_nodes.append(node)
    note_id = max(by_id) + 1
    ui_nodes.append({
        "id": note_id, "type": "Note", "pos": [420, 40], "size": [380, 220], "flags": {}, "order": len(nodes),
        "mode": 0, "inputs": [], "outputs": [], "properties": {},
        "widgets_values": [description + "\n\nModels: put a Qwen2.5-VL-Instruct folder in models/mllm, the matching "
                           "X2I AlignNet in models/x2i, FLUX in models/diffusion_models and its VAE in models/vae. "
                           "Schnell / shuttle-3: 4 steps."],
    })
    return {
        "last_node_id": note_id, "last_link_id": link_id, "nodes": ui_nodes, "links": links, "groups": [],
        "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 140]}}, "version": 0.4,
    }


def thumbnail(path, title, steps):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 384), (30, 32, 40))
    d = ImageDraw.Draw(img)
    d.text((24, 24), title, fill=(240, 240, 240))
    y = 80
    for i, step in enumerate(steps):
        d.rounded_rectangle([40, y, 472, y + 44], radius=8, fill=(60, 90, 140) if i % 2 == 0 else (90, 60, 140))
        d.text((56, y + 15), step, fill=(255, 255, 255))
        y += 58
    img.save(path)


THUMBS = {
    "x2i_text2image.json": ("X2I text to image (stock FLUX nodes)",
                            ["prompt, any language", "MLLM encode (Qwen2.5-VL)", "AlignNet project",
                             "KSampler + FLUX", "VAE decode -> image"]),
    "x2i_sampler.json": ("X2I with the X2I Sampler node",
                         ["prompt", "MLLM encode", "AlignNet project", "X2I Sampler", "image"]),
    "x2i_edit_lightcontrol.json": ("X2I instruction editing with LightControl",
                                   ["source image + instruction", "MLLM encode", "AlignNet project",
                                    "Apply ControlNet (LightControl)", "KSampler -> image"]),
    "x2i_lora.json": ("X2I + a LoRA trained under X2I conditioning",
                      ["FLUX + LoraLoaderModelOnly", "MLLM encode", "AlignNet project", "X2I Sampler", "image"]),
}


def main(object_info_path: str) -> None:
    with open(object_info_path, encoding="utf-8") as fh:
        object_info = json.load(fh)
    out_dir = os.path.join(ROOT, "workflows")
    os.makedirs(out_dir, exist_ok=True)
    for name, (description, nodes) in WORKFLOWS.items():
        wf = build(nodes, object_info, description)
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as fh:
            json.dump(wf, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        title, steps = THUMBS[name]
        thumbnail(os.path.join(out_dir, name.replace(".json", ".png")), title, steps)
        print("wrote", name)


if __name__ == "__main__":
    main(sys.argv[1])
