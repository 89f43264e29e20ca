"""Writes the help page of every X2I node, ``web/docs/<NodeId>.md`` (the host's embedded-docs convention for custom
nodes: the frontend's node help panel reads ``/extensions/<pack folder>/docs/<NodeId>.md``).

Each page = a short hand-written part below (what the node is for, which MLLM and AlignNet fit, a one-line recipe)
+ its inputs and outputs as the live schema declares them (``/object_info``: types, defaults, ranges, tooltips), so
a page cannot drift from the node: ``tests/test_publish.py`` rebuilds the pages from the running server's schema
and compares.

    python tools/make_node_docs.py OBJECT_INFO.json
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "web", "docs")

FITS = ("MLLMs: Qwen2.5-VL-3B/7B-Instruct (released AlignNets `qwen2.5-vl-3b_proj.pt` / `qwen2.5-vl-7b_proj.pt` from "
        "Hugging Face `OPPOer/X2I`), Qwen2.5-Omni-3B/7B (audio), InternVL2.5/3 in the transformers `-hf` format "
        "(`python -m x2i_core convert-internvl` for the original folders), MiniCPM-o-2.6 (audio; read from its "
        "files, no remote code). An AlignNet fits exactly one MLLM size (its C layers+1 and width H).")
MLLM_FOLDERS = ("MLLM folders are whole Hugging Face model folders (config.json, *.safetensors, tokenizer and "
                "processor files) in `models/mllm/<name>/`, e.g. `huggingface-cli download "
                "Qwen/Qwen2.5-VL-7B-Instruct --local-dir models/mllm/Qwen2.5-VL-7B-Instruct`.")

NOTES = {
    "X2IMLLMLoader": ("Loads a multimodal LLM from `models/mllm` for the X2I encode nodes (managed by ComfyUI: "
                      "offloaded when VRAM is needed).", f"{MLLM_FOLDERS} {FITS}",
                      "X2I MLLM Loader -> X2I MLLM Encode -> X2I AlignNet Project -> X2I Sampler."),
    "X2IMLLMEncode": ("Encodes any prompt - text in any language, images, a video, audio, a chat - with the MLLM "
                      "into the hidden states an AlignNet turns into FLUX conditioning.", FITS,
                      "Connect an image and type an instruction to edit; connect audio with Qwen2.5-Omni or MiniCPM-o."),
    "X2IAlignNetLoader": ("Loads an AlignNet from `models/x2i`; only AlignNet files are listed (each file's own "
                          "header says what it is).", FITS,
                          "Put `qwen2.5-vl-7b_proj.pt` from `OPPOer/X2I` in `models/x2i` for Qwen2.5-VL-7B."),
    "X2IAlignNetProject": ("Turns MLLM hidden states into a stock FLUX CONDITIONING (sequence + pooled vector + "
                           "guidance) that every FLUX sampler and conditioning node takes.", FITS,
                           "X2I MLLM Encode -> this -> KSampler / X2I Sampler / FluxGuidance / ControlNet apply."),
    "X2ISampler": ("Samples FLUX from an X2I conditioning in one node (latent, noise, the FLUX schedule, decode); "
                   "with a source image it edits it, optionally with LightControl.",
                   "Any FLUX.1-dev / schnell model from UNETLoader, its VAE (`ae.safetensors`).",
                   "dev: 28 steps, guidance 3.5; schnell / shuttle-3: 4 steps."),
    "X2ILightControlLoader": ("Loads X2I LightControl as a CONTROL_NET for the stock Apply ControlNet node: it "
                              "keeps instruction edits faithful to the source image. Only LightControl files are "
                              "listed.", "FLUX.1-dev with an X2I AlignNet conditioning.",
                              "Load Image (source) -> Apply ControlNet (this) -> X2I Sampler."),
    "X2IChatTurn": ("One turn of a conversation (user or assistant, with its text and media) for a multi-turn "
                    "prompt; chain turns and connect the chat to X2I MLLM Encode or Reason.", FITS,
                    "Turn 1 (user: image + 'make it winter') -> Turn 2 (assistant) -> Encode with the next ask."),
    "X2IMLLMReason": ("The MLLM first answers the question (a riddle, a question about an image), then the answer "
                      "is encoded for the AlignNet; the answer is also output as text.",
                      "Qwen2.5-VL, Qwen2.5-Omni, InternVL (not MiniCPM-o).",
                      "'What animal is the symbol of Australia?' -> a kangaroo."),
    "X2ICLIPEncode": ("Uses the Qwen2.5-VL text encoder you load with the stock Load CLIP node (type qwen_image) as "
                      "X2I's MLLM, run by ComfyUI itself.",
                      "ComfyUI's Qwen2.5-VL-7B text-encoder file (`qwen_2.5_vl_7b_fp8_scaled.safetensors` or "
                      "`qwen_2.5_vl_7b.safetensors` in `models/text_encoders`) with the 7B AlignNet.",
                      "Load CLIP (qwen_image) -> this -> X2I AlignNet Project."),
    "X2IBlendConditioning": ("Blends an X2I conditioning with a stock T5/CLIP one (weighted sequence and pooled "
                             "vector), e.g. to keep FLUX's own prompt following.",
                             "Both conditionings for the same FLUX model (tokens 4096 wide, pooled 768).",
                             "X2I AlignNet Project + CLIPTextEncodeFlux -> this -> sampler."),
}


def _kind(spec) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(kind, list) or kind == "COMBO":
        return "choice"
    return str(kind)


def _range(opts: dict) -> str:
    parts = []
    if "default" in opts and not isinstance(opts["default"], (list, dict)):
        default = opts["default"]
        parts.append(f"default {default!r}" if isinstance(default, str) else f"default {default}")
    if "min" in opts and "max" in opts:
        parts.append(f"{opts['min']}..{opts['max']}")
    return ", ".join(parts)


def page(node_id: str, info: dict) -> str:
    """The help page of one node from its ``/object_info`` entry."""
    what, fits, recipe = NOTES[node_id]
    lines = [f"# {info.get('display_name') or node_id}", "", what, "", f"**Fits:** {fits}", "",
             f"**Recipe:** {recipe}", "", "## Inputs", ""]
    for group in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(group) or {}).items():
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            extra = _range(opts)
            tip = " ".join(str(opts.get("tooltip", "")).split())
            lines.append(f"- **{name}** ({_kind(spec)}{', optional' if group == 'optional' else ''}"
                         f"{'; ' + extra if extra else ''}): {tip}".rstrip(": "))
    lines += ["", "## Outputs", ""]
    tips = info.get("output_tooltips") or []
    for i, (otype, oname) in enumerate(zip(info.get("output", []), info.get("output_name", []))):
        tip = " ".join(str(tips[i]).split()) if i < len(tips) and tips[i] else ""
        lines.append(f"- **{oname}** ({otype}){': ' + tip if tip else ''}")
    lines += ["", "More: the pack's README (models, workflows) and `docs/bad-inputs.md` (what each error means).", ""]
    return "\n".join(lines)


def pages(object_info: dict) -> dict[str, str]:
    """``{NodeId: markdown}`` for every X2I node in ``object_info``."""
    ours = sorted(k for k in object_info if k in NOTES)
    missing = sorted(set(k for k in object_info if k.startswith("X2I")) - set(NOTES))
    if missing:
        raise KeyError(f"no help text for {missing}: add them to tools/make_node_docs.py NOTES")
    return {k: page(k, object_info[k]) for k in ours}


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        info = json.load(fh)
    os.makedirs(DOCS, exist_ok=True)
    for node_id, text in pages(info).items():
        with open(os.path.join(DOCS, f"{node_id}.md"), "w", encoding="utf-8") as fh:
            fh.write(text)
        print(os.path.join("web", "docs", f"{node_id}.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
