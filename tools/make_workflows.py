"""Writes the drag-and-drop workflows in ``workflows/`` (UI format), their API-format copies in
``workflows/api/`` (for ``POST /prompt``, converted from the UI files) and their thumbnails.

The graphs are declared compactly below; input/output sockets and their types
come from a real ComfyUI's ``/object_info`` (saved JSON or a running server),
so the files carry exactly the slots the frontend expects.

    python tools/make_workflows.py OBJECT_INFO.json [--shoot]

``--shoot`` makes the thumbnails screenshots of the graphs in the real frontend (tiny models, headless
Chromium); without it the existing thumbnails' pixels are kept (their embedded graph is rewritten).
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.comfy_workflow import ui_to_api  # noqa: E402
from tools.frontend_check import LOW_QUALITY_ZOOM  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# A node's widgets are a list in the frontend's order (stock nodes), or a dict by input name: the values
# are then ordered from the live schema, and a widget left out gets the schema's default (so a new optional
# input of our nodes lands in every workflow without editing it).
SAMPLER = {"seed": 0, "steps": 28, "guidance": 3.5, "width": 1024, "height": 1024, "sampler_name": "euler",
           "scheduler": "simple", "control_strength": 1.0}
PROMPT = "一只在雪地里奔跑的红狐狸，清晨的阳光 (a red fox running through snow at dawn)"

# name -> (description, nodes); node = (id, type, pos, widgets, {input: (src_id, src_slot)}, title)
VL7B, OMNI7B = "Qwen2.5-VL-7B-Instruct", "Qwen2.5-Omni-7B"
# The released AlignNet as published (read weights-only); Qwen2.5-Omni has no released AlignNet (train one).
ALIGN_VL7B, ALIGN_OMNI7B = "qwen2.5-vl-7b_proj.pt", "alignnet-qwen2.5-omni-7b.safetensors"

# The pack's Registry identity, on every node of ours (properties cnr_id / ver): the frontend then knows the pack
# of each node without asking the Registry, and the Manager can offer to install it.
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _fh:
    import tomllib

    _PROJECT = tomllib.load(_fh)["project"]
PACK_ID, PACK_VERSION = _PROJECT["name"], _PROJECT["version"]

# Download addresses of the released files a shipped workflow names (properties.models: the frontend's "missing
# models" dialog offers them), by file name -> (url, model folder).  Files users train themselves (an Omni
# AlignNet, LightControl, a LoRA) have none; the workflow's note says so.
HF = "https://huggingface.co"
MODEL_SOURCES = {
    "flux1-dev.safetensors": (f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
                              "diffusion_models"),
    "flux1-schnell.safetensors": (f"{HF}/black-forest-labs/FLUX.1-schnell/resolve/main/flux1-schnell.safetensors",
                                  "diffusion_models"),
    "ae.safetensors": (f"{HF}/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors", "vae"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
                                              "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders"),
    "qwen_2.5_vl_7b.safetensors": (f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/"
                                   "qwen_2.5_vl_7b.safetensors", "text_encoders"),
    "qwen2.5-vl-7b_proj.pt": (f"{HF}/OPPOer/X2I/resolve/main/qwen2.5-vl-7b_proj.pt", "x2i"),
    "qwen2.5-vl-3b_proj.pt": (f"{HF}/OPPOer/X2I/resolve/main/qwen2.5-vl-3b_proj.pt", "x2i"),
}
# The model folder each loader's file widget reads (tests/test_publish.py holds its own copy as the expectation).
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "VAELoader": "vae", "CLIPLoader": "text_encoders",
                  "X2IAlignNetLoader": "x2i", "X2ILightControlLoader": "x2i"}


def node_properties(ntype: str, widgets, object_info) -> dict:
    """A node's properties: the frontend's search-and-replace name; ``cnr_id`` / ``ver`` on the pack's nodes;
    ``models`` (name, url, directory) for each released file its widgets name."""
    props = {"Node name for S&R": ntype}
    if str(object_info[ntype].get("python_module", "")).startswith("custom_nodes."):
        props.update(cnr_id=PACK_ID, ver=PACK_VERSION)
    values = widgets.values() if isinstance(widgets, dict) else widgets
    models = [{"name": v, "url": MODEL_SOURCES[v][0], "directory": MODEL_SOURCES[v][1]}
              for v in values if isinstance(v, str) and v in MODEL_SOURCES and ntype in LOADER_FOLDERS]
    if models:
        props["models"] = models
    return props


def _loaders(mllm=VL7B, alignnet=ALIGN_VL7B) -> list:
    """Nodes 1-4: FLUX, VAE, MLLM and AlignNet loaders."""
    return [
        (1, "UNETLoader", (40, 60), ["flux1-dev.safetensors", "default"], {}, None),
        (2, "VAELoader", (40, 200), ["ae.safetensors"], {}, None),
        (3, "X2IMLLMLoader", (40, 320), {"model_name": mllm}, {}, None),
        (4, "X2IAlignNetLoader", (40, 500), {"alignnet_name": alignnet}, {}, None),
    ]


def _project_sample_save(x: int, prefix: str, model=(1, 0)) -> list:
    """Nodes 6-8 after an encode node 5 in column ``x``: AlignNet Project -> X2I Sampler -> Save Image."""
    return [
        (6, "X2IAlignNetProject", (x + 400, 320), {"guidance": 3.5}, {"hidden": (5, 0), "alignnet": (4, 0)}, None),
        (7, "X2ISampler", (x + 780, 200), SAMPLER, {"model": model, "vae": (2, 0), "conditioning": (6, 0)}, None),
        (8, "SaveImage", (x + 1180, 200), [prefix], {"images": (7, 0)}, None),
    ]


def _project_ksample_save(prefix: str) -> list:
    """Nodes 6-11 after an encode node 5: AlignNet Project -> stock KSampler (zeroed negative, cfg 1) -> VAE
    Decode -> Save Image."""
    return [
        (6, "X2IAlignNetProject", (820, 320), {"guidance": 3.5}, {"hidden": (5, 0), "alignnet": (4, 0)}, None),
        (7, "ConditioningZeroOut", (820, 520), [], {"conditioning": (6, 0)}, None),
        (8, "EmptySD3LatentImage", (820, 640), [1024, 1024, 1], {}, None),
        (9, "KSampler", (1200, 200), [0, "fixed", 28, 1.0, "euler", "simple", 1.0],
         {"model": (1, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)}, None),
        (10, "VAEDecode", (1580, 200), [], {"samples": (9, 0), "vae": (2, 0)}, None),
        (11, "SaveImage", (1580, 360), [prefix], {"images": (10, 0)}, None),
    ]


WORKFLOWS = {
    "x2i_text2image.json": (
        "X2I text to image with stock FLUX nodes: the MLLM reads the prompt (any language), the AlignNet turns it "
        "into a FLUX conditioning, stock KSampler/VAE do the rest.",
        [
            *_loaders(),
            (5, "X2IMLLMEncode", (420, 320), {"text": PROMPT}, {"mllm": (3, 0)}, None),
            *_project_ksample_save("X2I"),
        ],
    ),
    "x2i_sampler.json": (
        "X2I with the one-node X2I Sampler (FLUX guidance, cfg 1, empty latent and decode in one node).",
        [*_loaders(),
         (5, "X2IMLLMEncode", (420, 320), {"text": "A lighthouse on a rocky coast under a stormy sky, oil painting"},
          {"mllm": (3, 0)}, None),
         *_project_sample_save(420, "X2I")],
    ),
    "x2i_lora.json": (
        "X2I with a FLUX LoRA trained under X2I conditioning (python -m x2i_core train-lora): the stock "
        "LoraLoaderModelOnly applies it to FLUX; prompts then come from the MLLM + AlignNet as usual.",
        [*_loaders()[:1],
         (9, "LoraLoaderModelOnly", (420, -120), ["x2i_lora.safetensors", 1.0], {"model": (1, 0)}, None),
         *_loaders()[1:],
         (5, "X2IMLLMEncode", (420, 320), {"text": "A portrait of a woman in the trained style"}, {"mllm": (3, 0)}, None),
         *_project_sample_save(420, "X2I_lora", model=(9, 0))],
    ),
    "x2i_edit_lightcontrol.json": (
        "Instruction editing: the MLLM reads the source image and the instruction; X2I LightControl, applied "
        "with the stock Apply ControlNet node to the same source image, keeps the edit faithful to it.",
        [
            *_loaders(),
            (10, "LoadImage", (40, 640), ["source.png", "image"], {}, None),
            (5, "X2IMLLMEncode", (420, 320), {"text": "Make it a snowy winter evening, keep everything else the same."},
             {"mllm": (3, 0), "image": (10, 0)}, None),
            (6, "X2IAlignNetProject", (820, 320), {"guidance": 3.5}, {"hidden": (5, 0), "alignnet": (4, 0)}, None),
            (7, "ConditioningZeroOut", (820, 520), [], {"conditioning": (6, 0)}, None),
            (11, "X2ILightControlLoader", (420, 680), {"lightcontrol_name": "lightcontrol-flux-dev.safetensors"}, {}, None),
            (12, "ControlNetApplyAdvanced", (820, 640), [1.0, 0.0, 1.0],
             {"positive": (6, 0), "negative": (7, 0), "control_net": (11, 0), "image": (10, 0)}, None),
            (8, "EmptySD3LatentImage", (820, 860), [1024, 1024, 1], {}, None),
            (9, "KSampler", (1200, 200), [0, "fixed", 28, 1.0, "euler", "simple", 1.0],
             {"model": (1, 0), "positive": (12, 0), "negative": (12, 1), "latent_image": (8, 0)}, None),
            (13, "VAEDecode", (1580, 200), [], {"samples": (9, 0), "vae": (2, 0)}, None),
            (14, "SaveImage", (1580, 360), ["X2I_edit"], {"images": (13, 0)}, None),
        ],
    ),
    "x2i_text2image_native_qwen.json": (
        "X2I with the Qwen2.5-VL text encoder you already have for Qwen-Image: the stock Load CLIP (type "
        "qwen_image) loads it, X2I CLIP Encode builds the X2I prompt and returns every hidden state (same as X2I "
        "MLLM Encode), the AlignNet turns them into a FLUX conditioning, stock KSampler/VAE do the rest. Models: "
        "qwen_2.5_vl_7b_fp8_scaled.safetensors or qwen_2.5_vl_7b.safetensors in models/text_encoders with the X2I "
        "AlignNet for Qwen2.5-VL-7B in models/x2i (OmniGen2's Qwen2.5-VL-3B, type omnigen2, text only, works with "
        "the 3B AlignNet), FLUX in models/diffusion_models, its VAE (ae.safetensors) in models/vae.",
        [
            (1, "UNETLoader", (40, 60), ["flux1-dev.safetensors", "default"], {}, None),
            (2, "VAELoader", (40, 200), ["ae.safetensors"], {}, None),
            (3, "CLIPLoader", (40, 320), ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"], {}, None),
            (4, "X2IAlignNetLoader", (40, 500), {"alignnet_name": ALIGN_VL7B}, {}, None),
            (5, "X2ICLIPEncode", (420, 320), {"text": PROMPT}, {"clip": (3, 0)}, None),
            *_project_ksample_save("X2I_native_qwen"),
        ],
    ),
}

# -- the task workflows (one per X2I task) -----------------------------------------------------------------
MODELS_VL = ("Models: a Qwen2.5-VL-7B-Instruct folder in models/mllm (huggingface-cli download "
             "Qwen/Qwen2.5-VL-7B-Instruct --local-dir models/mllm/Qwen2.5-VL-7B-Instruct) with its X2I AlignNet "
             "qwen2.5-vl-7b_proj.pt (huggingface.co/OPPOer/X2I) in models/x2i (the 3B pair works the same), FLUX in "
             "models/diffusion_models, its VAE (ae.safetensors) in models/vae; the loaders' files carry their download "
             "addresses.")
MODELS_OMNI = ("Models: a Qwen2.5-Omni folder in models/mllm (huggingface-cli download Qwen/Qwen2.5-Omni-7B "
               "--local-dir models/mllm/Qwen2.5-Omni-7B; only its thinker is loaded) with an AlignNet distilled "
               "for it in models/x2i (python -m x2i_core distill --mllm models/mllm/Qwen2.5-Omni-7B ...; no official "
               "one is published), FLUX in models/diffusion_models, its VAE in models/vae. Or MiniCPM-o-2.6, the "
               "reference's audio model: pick its folder (huggingface-cli download openbmb/MiniCPM-o-2_6 --local-dir "
               "models/mllm/MiniCPM-o-2_6; read from its files, trust_remote_code stays off) and the released "
               "MiniCPM-o AlignNet from huggingface.co/OPPOer/X2I.")


def _task(text, mllm=VL7B, alignnet=ALIGN_VL7B, inputs=(), encode_conns=None, instruction="", preset="auto",
          encode_type="X2IMLLMEncode", extra_nodes=(), encode_widgets=None, prefix="X2I", col=460):
    """Loaders -> (inputs) -> encode -> AlignNet project -> X2I Sampler -> Save; ids 1-8 fixed, inputs from 20.
    ``col``: the encode node's column (860 leaves the second column to several inputs, so a tall graph still fits
    the view at a zoom where the frontend draws text)."""
    nodes = _loaders(mllm, alignnet)
    nodes.extend(inputs)
    conns = {"mllm": (3, 0), **(encode_conns or {})}
    widgets = encode_widgets or {"text": text, "preset": preset, "instruction": instruction}
    nodes.append((5, encode_type, (col, 320), widgets, conns, None))
    nodes.extend(extra_nodes)
    nodes += _project_sample_save(col, prefix)
    return nodes


def _load_image(nid, name, y):
    return (nid, "LoadImage", (40, y), [name, "image"], {}, None)


TASK_WORKFLOWS = {
    "x2i_multilingual.json": (
        "Text in any language: the MLLM reads Chinese, Japanese, Arabic, German ... directly; no translation step. "
        + MODELS_VL,
        _task("東京の夜景、雨に濡れた路地とネオンの看板、映画のワンシーン (Tokyo at night, rain, neon signs)",
              prefix="X2I_multilingual"),
    ),
    "x2i_document.json": (
        "Screenshots and documents: the MLLM reads the text in the image; the prompt asks to render what it says. "
        "Load a screenshot or a photo of a page. " + MODELS_VL,
        _task("Render what this document says as a picture.", inputs=[_load_image(20, "document.png", 660)],
              encode_conns={"image": (20, 0)}, prefix="X2I_document"),
    ),
    "x2i_image2image.json": (
        "Image to image: the MLLM describes the image to FLUX through the AlignNet (no VAE encode of the source); "
        "text may be empty or steer it. " + MODELS_VL,
        _task("", inputs=[_load_image(20, "source.png", 660)], encode_conns={"image": (20, 0)},
              prefix="X2I_image2image"),
    ),
    "x2i_multi_image.json": (
        "Multi-image composition: several images in one prompt, in order (the stock Image Batch node joins them and "
        "resizes the second to the first's size; ComfyUI 0.28+ lists it as deprecated but runs it, and its newer "
        "Batch Images node does the same). The text says how to combine them. " + MODELS_VL,
        _task("Put the animal from picture 1 into the scene of picture 2.",
              inputs=[(20, "LoadImage", (460, 320), ["subject.png", "image"], {}, None),
                      (21, "LoadImage", (460, 700), ["scene.png", "image"], {}, None),
                      (22, "ImageBatch", (460, 1080), [], {"image1": (20, 0), "image2": (21, 0)}, None)],
              encode_conns={"image": (22, 0)}, prefix="X2I_multi_image", col=860),
    ),
    "x2i_edit.json": (
        "Instruction editing: the source image plus an instruction in the reference's 'Instruction editing "
        "description' field. Add X2I LightControl (see x2i_edit_lightcontrol) for closer fidelity to the source. "
        + MODELS_VL,
        _task("A cat sitting on a wooden table.", inputs=[_load_image(20, "source.png", 660)],
              encode_conns={"image": (20, 0)}, instruction="Make it a snowy winter evening.", prefix="X2I_edit"),
    ),
    "x2i_video2image.json": (
        "Video to image: the stock Load Video feeds the MLLM frames sampled at video_fps (reference: 1 fps, "
        "128x128 per frame); longer clips are subsampled to max_frames. " + MODELS_VL,
        _task("The most memorable moment of this video.", inputs=[(20, "LoadVideo", (40, 660), ["clip.mp4", "image"],
                                                                    {}, None)],
              encode_conns={"video": (20, 0)}, prefix="X2I_video2image"),
    ),
    "x2i_audio2image.json": (
        "Audio to image: the stock Load Audio feeds an audio-capable MLLM (Qwen2.5-Omni or MiniCPM-o); any rate or "
        "channel count "
        "is resampled to 16 kHz mono without torchaudio. " + MODELS_OMNI,
        _task("", mllm=OMNI7B, alignnet=ALIGN_OMNI7B, inputs=[(20, "LoadAudio", (40, 660), ["sound.wav", None, None],
                                                                {}, None)],
              encode_conns={"audio": (20, 0)}, prefix="X2I_audio2image"),
    ),
    "x2i_x2image.json": (
        "Anything to image: text, an image, a video and audio in one prompt (media first, then the text). "
        + MODELS_OMNI,
        _task("Combine the picture, the clip and the sound into one scene.", mllm=OMNI7B, alignnet=ALIGN_OMNI7B,
              inputs=[(20, "LoadImage", (460, 320), ["photo.png", "image"], {}, None),
                      (21, "LoadVideo", (460, 700), ["clip.mp4", "image"], {}, None),
                      (22, "LoadAudio", (460, 1080), ["sound.wav", None, None], {}, None)],
              encode_conns={"image": (20, 0), "video": (21, 0), "audio": (22, 0)}, prefix="X2I_x2image", col=860),
    ),
    "x2i_reasoning2image.json": (
        "Reasoning to image: the MLLM answers first (max_new_tokens, temperature, seed), then the answer's hidden "
        "states (reference 'use answer') drive FLUX. The answer is shown by the stock Preview as Text node. "
        + MODELS_VL,
        _task(None, encode_type="X2IMLLMReason",
              encode_widgets={"text": "What animal is the national symbol of Australia? Show it in its habitat."},
              extra_nodes=[(9, "PreviewAny", (860, 560), [], {"source": (5, 1)}, None)],
              prefix="X2I_reasoning2image"),
    ),
    "x2i_multi_turn.json": (
        "Multi-turn: X2I Chat Turn nodes build a conversation (text and media in any turn); the encode node adds "
        "the final user message and the MLLM reads the whole chat. " + MODELS_VL,
        _task("Now the same scene, but at night in the rain.",
              inputs=[_load_image(20, "photo.png", 660),
                      (21, "X2IChatTurn", (460, 320), {"role": "user", "text": "Describe a cosy cabin like this one."},
                       {"image": (20, 0)}, None),
                      (22, "X2IChatTurn", (460, 700), {"role": "assistant", "text": "A small wooden cabin by a lake, "
                                                       "smoke rising from the chimney, pine trees around it."},
                       {"chat": (21, 0)}, None)],
              encode_conns={"chat": (22, 0)}, prefix="X2I_multi_turn", col=860),
    ),
}
TASK_THUMBS = {
    "x2i_multilingual.json": ("X2I: prompts in any language", ["日本語 / 中文 / Deutsch ...", "MLLM encode",
                                                              "AlignNet project", "X2I Sampler", "image"]),
    "x2i_document.json": ("X2I: documents and screenshots", ["screenshot / page", "MLLM reads the text",
                                                             "AlignNet project", "X2I Sampler", "image"]),
    "x2i_image2image.json": ("X2I: image to image", ["image", "MLLM encode", "AlignNet project", "X2I Sampler",
                                                     "new image"]),
    "x2i_multi_image.json": ("X2I: multi-image composition", ["image 1 + image 2 (Image Batch)", "+ how to combine",
                                                               "MLLM encode", "AlignNet -> X2I Sampler", "image"]),
    "x2i_edit.json": ("X2I: instruction editing", ["source image", "+ editing instruction", "MLLM encode",
                                                   "AlignNet -> X2I Sampler", "edited image"]),
    "x2i_video2image.json": ("X2I: video to image", ["Load Video", "frames at 1 fps", "MLLM encode",
                                                     "AlignNet -> X2I Sampler", "image"]),
    "x2i_audio2image.json": ("X2I: audio to image", ["Load Audio", "16 kHz mono", "Omni / MiniCPM-o encode",
                                                     "AlignNet -> X2I Sampler", "image"]),
    "x2i_x2image.json": ("X2I: anything to image", ["image + video + audio + text", "Qwen2.5-Omni encode",
                                                    "AlignNet project", "X2I Sampler", "image"]),
    "x2i_reasoning2image.json": ("X2I: reasoning to image", ["question", "MLLM answers (text out)",
                                                             "answer states", "AlignNet -> X2I Sampler", "image"]),
    "x2i_multi_turn.json": ("X2I: multi-turn chat", ["Chat Turn (user + image)", "Chat Turn (assistant)",
                                                     "encode: final message", "AlignNet -> X2I Sampler", "image"]),
}
WORKFLOWS.update(TASK_WORKFLOWS)


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


SIZES = {"X2IMLLMEncode": 420, "X2IMLLMReason": 440, "X2IChatTurn": 300, "LoadImage": 320, "LoadVideo": 320,
         "LoadAudio": 160, "PreviewAny": 160, "X2ISampler": 360}


NODE_WIDTH = 340
NOTE_BOX = (420, 40, 380, 220)  # x, y, width, height of the workflow's note


def _height(ntype: str, object_info: dict) -> int:
    """About the height the frontend gives a node: title, socket rows, widgets (multiline text taller, a
    seed's control-after-generate widget counts)."""
    info = object_info[ntype]
    ordered = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
    widgets = [spec for _, spec in ordered if _is_widget(spec)]
    sockets = len(ordered) - len(widgets)
    multiline = sum(1 for spec in widgets if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline"))
    extra = sum(1 for spec in widgets if len(spec) > 1 and isinstance(spec[1], dict)
                and spec[1].get("control_after_generate"))
    rows = max(sockets, len(info["output"]))
    return max(SIZES.get(ntype, 130), 30 + 20 * rows + 24 * (len(widgets) + extra) + 66 * multiline)


def _without_overlaps(nodes, object_info) -> dict:
    """Positions with no two nodes (or a node and the note) overlapping: top to bottom, a node that would
    overlap one placed above it in the same column moves below it."""
    placed = [NOTE_BOX]
    positions = {}
    for nid, ntype, pos, *_ in sorted(nodes, key=lambda n: (n[2][1], n[2][0])):
        x, y = pos
        h = _height(ntype, object_info)
        moved = True
        while moved:
            moved = False
            for px, py, pw, ph in placed:
                if x < px + pw and px < x + NODE_WIDTH and y < py + ph + TITLE + 20 and py < y + h + TITLE + 20:
                    y, moved = py + ph + TITLE + 30, True  # its title bar and pack badge clear the node above
        placed.append((x, y, NODE_WIDTH, h))
        positions[nid] = ([x, y], h)
    return positions


TITLE = 30           # the frontend draws a node's title bar (and its pack badge) above its position
VIEW = (1600, 1157)  # the canvas a 1600 x 1300 browser window shows (tests/test_frontend.py's window)
VIEW_MARGIN = (70, 70, 40, 40)  # left (the sidebar), top (the menu bar), right, bottom


def fit_view(boxes, max_scale: float = 0.75) -> dict:
    """The saved view (``extra.ds``) that shows every box ``(x, y, w, h)`` (title bars included) inside
    :data:`VIEW` at the largest scale up to ``max_scale``."""
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes) - TITLE
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    left, top, right, bottom = VIEW_MARGIN
    scale = min(max_scale, (VIEW[0] - left - right) / (x1 - x0), (VIEW[1] - top - bottom) / (y1 - y0))
    scale = int(scale * 100) / 100
    if scale < LOW_QUALITY_ZOOM:
        raise ValueError(f"the graph needs zoom {scale} to fit the view, below {LOW_QUALITY_ZOOM} (where the frontend "
                         "draws nodes without their text): lay it out more compactly")
    return {"scale": scale, "offset": [round(left / scale - x0), round(top / scale - y0)]}


def _default(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list) or spec[0] == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def widget_values(ntype: str, widgets, object_info) -> list:
    """``widgets_values`` in the frontend's order (required, then optional; a seed's control-after-generate
    value after it) from a dict by input name; a list is taken as already ordered."""
    if not isinstance(widgets, dict):
        return list(widgets)
    info = object_info[ntype]["input"]
    given = dict(widgets)
    values = []
    for name, spec in list(info.get("required", {}).items()) + list(info.get("optional", {}).items()):
        if not _is_widget(spec):
            continue
        values.append(given.pop(name) if name in given else _default(spec))
        if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
            values.append(given.pop(f"{name}:control", "fixed"))
    if given:
        raise KeyError(f"{ntype}: no widget(s) {sorted(given)}")
    return values


def _topological_order(nodes, by_id) -> list:
    """Node ids with every node after its inputs (the UI file's ``order`` field)."""
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
    return order


def _sockets_and_links(nodes, by_id, object_info):
    """Each node's socket inputs (schema order, optional ones marked) with the links that feed them ->
    ({id: inputs}, links, {(src, slot): [link ids]})."""
    links, out_links, node_inputs = [], {}, {}
    for nid, ntype, _pos, _widgets, conns, _title in nodes:
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
                link_id = len(links) + 1
                out_type = object_info[by_id[src][1]]["output"][slot]
                links.append([link_id, src, slot, nid, len(ins), out_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
            ins.append(entry)
        missing = set(conns) - {i["name"] for i in ins}
        if missing:
            raise KeyError(f"{ntype}: no socket input(s) {missing}")
        node_inputs[nid] = ins
    return node_inputs, links, out_links


def _note(note_id: int, order: int, description: str) -> dict:
    return {
        "id": note_id, "type": "Note", "pos": list(NOTE_BOX[:2]), "size": list(NOTE_BOX[2:]), "flags": {},
        "order": order,
        "mode": 0, "inputs": [], "outputs": [], "properties": {},
        "widgets_values": [description + ("" if "Models:" in description else
                           "\n\nModels: put a Qwen2.5-VL-Instruct folder in models/mllm (a whole Hugging Face model "
                           "folder: huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir "
                           "models/mllm/Qwen2.5-VL-7B-Instruct), the matching X2I AlignNet in models/x2i "
                           "(qwen2.5-vl-7b_proj.pt from huggingface.co/OPPOer/X2I), FLUX in models/diffusion_models "
                           "and its VAE in models/vae (the loaders' files carry their download addresses).")
                           + " Schnell / shuttle-3: 4 steps."],
    }


def build(nodes, object_info, description):
    """The UI (drag-and-drop) workflow of ``nodes`` against the live schemas, with a note."""
    nodes = [(nid, ntype, pos, widget_values(ntype, widgets, object_info), conns, title)
             for nid, ntype, pos, widgets, conns, title in nodes]
    by_id = {n[0]: n for n in nodes}
    layout = _without_overlaps(nodes, object_info)
    order = _topological_order(nodes, by_id)
    node_inputs, links, out_links = _sockets_and_links(nodes, by_id, object_info)
    ui_nodes = []
    for nid, ntype, _pos, widgets, _conns, title in nodes:
        info = object_info[ntype]
        outs = [{"name": oname, "type": otype, "links": out_links.get((nid, slot), []), "slot_index": slot}
                for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"]))]
        node = {
            "id": nid, "type": ntype, "pos": layout[nid][0], "size": [NODE_WIDTH, layout[nid][1]],
            "flags": {}, "order": order.index(nid), "mode": 0, "inputs": node_inputs[nid], "outputs": outs,
            "properties": node_properties(ntype, widgets, object_info), "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        ui_nodes.append(node)
    note_id = max(by_id) + 1
    ui_nodes.append(_note(note_id, len(nodes), description))
    boxes = [(*layout[nid][0], NODE_WIDTH, layout[nid][1]) for nid in layout] + [NOTE_BOX]
    return {
        "last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
        "config": {}, "extra": {"ds": fit_view(boxes)}, "version": 0.4,
    }


def screenshots(workflows: dict[str, dict]) -> dict[str, str]:
    """Screenshots of the graphs in the real frontend: a ComfyUI server with the pack and the tiny models,
    headless Chromium (tools/frontend_check.py). Returns {name: png path}."""
    import tempfile

    from tools import frontend_check
    from tools.comfy_fetch import cache_root, ensure_comfyui, prepare_base
    from tools.comfy_server import ComfyServer
    from x2i_core.tiny import default_cache_dir, make_tiny_models

    if not frontend_check.available():
        raise SystemExit("--shoot needs chromium, chromium-driver and selenium (apt install chromium "
                         "chromium-driver; pip install selenium)")
    base = os.path.join(cache_root(), "thumbnail-base")
    prepare_base(base, make_tiny_models(default_cache_dir(), comfy=True))
    out = tempfile.mkdtemp(prefix="x2i-thumbs-")
    with ComfyServer(ensure_comfyui(), base) as server:
        results = frontend_check.open_workflows(server.url, workflows, out)
    bad = {n: r["problems"] for n, r in results.items() if r["problems"] or r["loaded"] is not True}
    if bad:
        raise SystemExit(f"the frontend reported problems, no thumbnails written: {bad}")
    return {n: (r["screenshot"], r["state"]) for n, r in results.items()}


def _canvas(shot: str, state: dict, margin: int = 16):
    """The graph part of a frontend screenshot: the box around every node as drawn (title bars and badges
    included; the frontend's own bars and panels differ between versions, the nodes' boxes do not), 800 px wide,
    reduced to 128 colours (small files)."""
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    w, h = img.size
    left, top = state["canvas_at"]
    boxes = state["boxes"]
    x0 = max(0, int(left + min(b["x"] for b in boxes)) - margin)
    y0 = max(0, int(top + min(b["y"] for b in boxes)) - margin)
    x1 = min(w, int(left + max(b["x"] + b["w"] for b in boxes)) + margin)
    y1 = min(h, int(top + max(b["y"] + b["h"] for b in boxes)) + margin)
    img = img.crop((x0, y0, x1, y1))
    img = img.resize((800, round(800 * img.size[1] / img.size[0])), Image.LANCZOS)
    return img.quantize(colors=128)


def thumbnail(path, title, steps, workflow=None, api=None, shot=None):
    """The template thumbnail: the graph as the frontend shows it (``shot`` = (screenshot, graph state), from
    ``--shoot``), else the pixels already there, else a diagram of ``steps``. It also carries the graph as
    ComfyUI's SaveImage writes it (PNG text chunks ``workflow`` = UI JSON, ``prompt`` = API JSON), so dropping
    the picture on the canvas loads the workflow."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if api is not None:
        info.add_text("prompt", json.dumps(api))
    if workflow is not None:
        info.add_text("workflow", json.dumps(workflow))
    if shot or os.path.exists(path):
        img = _canvas(*shot) if shot else Image.open(path)
        img.save(path, pnginfo=info)
        return
    img = Image.new("RGB", (512, 384), (30, 32, 40))
    d = ImageDraw.Draw(img)
    d.text((24, 24), title, fill=(240, 240, 240))
    y = 80
    for i, step in enumerate(steps):
        d.rounded_rectangle([40, y, 472, y + 44], radius=8, fill=(60, 90, 140) if i % 2 == 0 else (90, 60, 140))
        d.text((56, y + 15), step, fill=(255, 255, 255))
        y += 58
    img.save(path, pnginfo=info)


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
    "x2i_text2image_native_qwen.json": ("X2I with ComfyUI's own Qwen2.5-VL text encoder",
                                        ["Load CLIP (type qwen_image)", "X2I CLIP Encode (all layers)",
                                         "AlignNet project", "KSampler + FLUX", "VAE decode -> image"]),
}


def main(object_info_path: str, shoot: bool = False) -> None:
    with open(object_info_path, encoding="utf-8") as fh:
        object_info = json.load(fh)
    out_dir = os.path.join(ROOT, "workflows")
    os.makedirs(out_dir, exist_ok=True)
    api_dir = os.path.join(out_dir, "api")
    os.makedirs(api_dir, exist_ok=True)
    built = {name: build(nodes, object_info, description) for name, (description, nodes) in WORKFLOWS.items()}
    shots = screenshots(built) if shoot else {}
    for name, wf in built.items():
        # the UI file (drag onto the canvas) and its API-format copy (POST /prompt), converted from it
        api = ui_to_api(wf, object_info)
        for path, data in ((os.path.join(out_dir, name), wf), (os.path.join(api_dir, name), api)):
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, ensure_ascii=False)
                fh.write("\n")
        title, steps = {**THUMBS, **TASK_THUMBS}[name]
        thumbnail(os.path.join(out_dir, name.replace(".json", ".png")), title, steps, wf, api, shots.get(name))
        print("wrote", name)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write workflows/*.json, workflows/api/*.json and the thumbnails.")
    ap.add_argument("object_info", help="a saved /object_info (python tools/comfy_host.py object-info OUT.json)")
    ap.add_argument("--shoot", action="store_true",
                    help="thumbnails = screenshots of each graph in the real frontend (needs chromium)")
    args = ap.parse_args()
    main(args.object_info, args.shoot)
