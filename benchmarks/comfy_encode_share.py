"""One FLUX graph in ComfyUI's own executor, conditioned two ways: X2I (MLLM encode + AlignNet project) vs
FLUX's stock text encoders (CLIP-L + T5-XXL through the stock ``CLIPTextEncodeFlux`` node). Same FLUX,
sampler, size, steps and VAE; the executor's per-node times give each run's encode share.

Encoders at real widths and a fraction of their depth, random weights (a 2-core CPU cannot hold or run
the full ones in a test-sized time): X2I = the Qwen2.5-VL-3B text-decoder shape with Qwen2.5's tokenizer
at ``--layers`` of 36 layers + an AlignNet of the 3B widths; stock = CLIP-L at 1/6 of 12 layers and T5-XXL
at 1/6 of 24 (``tools/comfy_test_nodes.py``: ComfyUI's own ``flux_clip`` classes; the stock
``DualCLIPLoader`` always builds the full 4.8 B T5). FLUX is the tiny one of the tests (one double block),
so the sampler share here is far below a real FLUX's; the encode times and their ratio are the figure.

    python benchmarks/comfy_encode_share.py [--layers 6] [--steps 4] [--size 256] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

CAPTIONS = ["a red fox jumps over a lazy dog in the snowy forest at dawn",
            "an oil painting of a lighthouse on a rocky coast under a stormy sky"]


def _n(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def graphs(names: dict, caption: str, seed: int, args) -> dict[str, dict]:
    tail = {
        "unet": _n("UNETLoader", unet_name=names["unet"], weight_dtype="default"),
        "vae": _n("VAELoader", vae_name=names["vae"]),
        "empty": _n("EmptySD3LatentImage", width=args.size, height=args.size, batch_size=1),
        "neg": _n("ConditioningZeroOut", conditioning=["pos", 0]),
        "ks": _n("KSampler", model=["unet", 0], seed=seed, steps=args.steps, cfg=1.0, sampler_name="euler",
                 scheduler="simple", positive=["pos", 0], negative=["neg", 0], latent_image=["empty", 0], denoise=1.0),
        "decode": _n("VAEDecode", samples=["ks", 0], vae=["vae", 0]),
        "save": _n("PreviewImage", images=["decode", 0]),
    }
    stock = {**tail,
             "clip": _n("X2ITestTinyFluxTextEncoders", seed=0, t5_width=4096, real_widths=True, t5_layers=args.t5_layers,
                        clip_layers=args.clip_layers),
             "pos": _n("CLIPTextEncodeFlux", clip=["clip", 0], clip_l=caption, t5xxl=caption, guidance=3.5)}
    x2i = {**tail,
           "mllm": _n("X2IMLLMLoader", model_name=names["mllm_3b"], dtype="fp32", device="default"),
           "encode": _n("X2IMLLMEncode", mllm=["mllm", 0], text=caption, preset="auto", image_resolution=0),
           "align": _n("X2IAlignNetLoader", alignnet_name=names["alignnet_3b"]),
           "pos": _n("X2IAlignNetProject", hidden=["encode", 0], alignnet=["align", 0], guidance=3.5)}
    return {"stock": stock, "x2i": x2i}


ENCODE_NODES = {"stock": ("clip", "pos"), "x2i": ("mllm", "encode", "align", "pos")}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="MLLM decoder layers (of 36)")
    ap.add_argument("--t5-layers", type=int, default=4, help="T5-XXL layers (of 24)")
    ap.add_argument("--clip-layers", type=int, default=2, help="CLIP-L layers (of 12)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def run_graphs(args):
    """Build the 3B-shape MLLM and its AlignNet into a fresh ComfyUI base, run the warm-up and measured rounds
    in one executor -> (facts, captured shapes)."""
    import torch
    from encode import build

    from tools.comfy_fetch import ensure_comfyui, prepare_base
    from x2i_core.tiny import build_alignnet, default_cache_dir, make_tiny_models

    tiny = make_tiny_models(default_cache_dir(), comfy=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        names = prepare_base(base, tiny)
        names["mllm_3b"] = "qwen2.5-vl-3b-shape"
        build(os.path.join(base, "models", "mllm", names["mllm_3b"]), "3b", args.layers, "real")
        names["alignnet_3b"] = "alignnet-3b-shape.safetensors"
        torch.manual_seed(0)
        build_alignnet(channels=args.layers + 1, hidden=2048, seed=0).save(
            os.path.join(base, "models", "x2i", names["alignnet_3b"]))
        # warm-up runs (loading, first calls), then measured rounds alternating the two graphs, each round
        # with a new caption and seed so the encoders and the sampler run again (the loaders stay cached)
        prompts = {}
        for r in range(args.repeat + 1):
            g = graphs(names, CAPTIONS[r % 2] + ("" if r < 2 else f", take {r}"), r, args)
            for side in ("stock", "x2i"):
                prompts[f"{side}:{r}"] = g[side]
        spec = os.path.join(tmp, "spec.json")
        out = os.path.join(tmp, "facts.safetensors")
        with open(spec, "w", encoding="utf-8") as fh:
            json.dump({"comfy_dir": ensure_comfyui(), "base": base, "prompts": prompts,
                       "capture": {f"{s}:0": ["pos"] for s in ("stock", "x2i")}, "out": out, "test_nodes": True}, fh)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", spec], check=True)
        with open(out + ".json", encoding="utf-8") as fh:
            facts = json.load(fh)
        from safetensors.torch import load_file

        shapes = {k: list(v.shape) for k, v in load_file(out).items()}
    return facts, shapes


def median_rows(args, facts, shapes) -> dict:
    """Per side: median total / encode / sampler / decode seconds of the measured rounds, encode share, tokens."""
    rows = {}
    for side in ("stock", "x2i"):
        runs = []
        for r in range(1, args.repeat + 1):
            label = f"{side}:{r}"
            ns = facts["node_seconds"][label]
            enc = sum(ns.get(n, 0.0) for n in ENCODE_NODES[side])
            runs.append({"total_s": facts["seconds"][label], "encode_s": enc, "sampler_s": ns.get("ks", 0.0),
                         "decode_s": ns.get("decode", 0.0)})
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        med["encode_nodes_s"] = {n: statistics.median(facts["node_seconds"][f"{side}:{r}"].get(n, 0.0)
                                                       for r in range(1, args.repeat + 1)) for n in ENCODE_NODES[side]}
        med["encode_share"] = med["encode_s"] / med["total_s"]
        med["tokens"] = shapes.get(f"{side}:0:pos.0.seq", [None, None])[1]
        rows[side] = med
        print(f"{side:5s} total {med['total_s']:6.2f} s  encode {med['encode_s']:6.2f} s ({100 * med['encode_share']:.0f} %)"
              f"  sampler {med['sampler_s']:5.2f} s  decode {med['decode_s']:5.2f} s  tokens to FLUX {med['tokens']}"
              f"  encode nodes {', '.join(f'{n} {t:.2f} s' for n, t in med['encode_nodes_s'].items())}",
              flush=True)
    return rows


def main() -> None:
    import torch

    args = parse_args()
    facts, shapes = run_graphs(args)
    if not facts["success"]:
        raise SystemExit(f"a graph failed: {facts['errors']}")
    rows = median_rows(args, facts, shapes)
    x, s = rows["x2i"], rows["stock"]
    k_x, k_t = 36 / args.layers, 24 / args.t5_layers
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
              "encode_ratio_x2i_over_stock": x["encode_s"] / s["encode_s"],
              "total_ratio_x2i_over_stock": x["total_s"] / s["total_s"],
              # every decoder layer has the same work: scale the encode by depth (the small CLIP-L / AlignNet
              # parts are scaled too, which favours neither side much)
              "encode_ratio_full_depth_estimate": (x["encode_s"] * k_x) / (s["encode_s"] * k_t)}
    print(f"X2I / stock: encode x{result['encode_ratio_x2i_over_stock']:.3f}, whole run "
          f"x{result['total_ratio_x2i_over_stock']:.3f}; encode at full depth (per-layer estimate) "
          f"x{result['encode_ratio_full_depth_estimate']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
