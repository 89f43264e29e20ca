"""X2I encoding against what FLUX users run today (T5-XXL + CLIP-L), same captions, one run, as ratios.

* ``x2i``    - our exact encode path (``training`` preset, opening cache, pad rows) on a random Qwen2.5-VL with
               the 3B text-decoder widths, then the 3B AlignNet (conv fusion, 4096 / 768 outputs);
* ``t5clip`` - FLUX's own encoders with their real widths: T5-XXL (d_model 4096, 64 heads, FF 10240, 512
               tokens, padded as FLUX pads) + CLIP-L (12 layers, 77 tokens), random weights.

Each side runs in its own process (its peak RSS is its own).  A 2-core / 24 GB CPU cannot hold the full
depths in fp32 (T5-XXL's encoder alone is 19 GB), so both decoders run at the same fraction of their depth
(``--fraction``, default 1/6: 6 of 36 Qwen layers, 4 of 24 T5 layers; CLIP-L, the AlignNet and the
embeddings at full size) and the full-depth times are extrapolated per layer from two depths measured in
the same process.  The full-depth weight bytes come from the real configs built on the meta device.

    python benchmarks/encode_vs_t5.py [--captions 4] [--fraction 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

CAPTIONS = ["a red fox in the snow at dawn", "An oil painting of a lighthouse on a rocky coast under a stormy sky",
            "一只可爱的小猫坐在窗台上，阳光洒在它的毛上", "a bowl of ramen, steam rising, top view, studio light"]
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)


def _timed(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def side_x2i(layers_list, captions, repeat):
    from encode import build

    from x2i_core.mllm import load_mllm
    from x2i_core.tiny import build_alignnet

    out = {}
    for layers in layers_list:
        with tempfile.TemporaryDirectory() as tmp:
            enc = load_mllm(build(os.path.join(tmp, "m"), "3b", layers), dtype="fp32")
            net = build_alignnet(channels=enc.channels, hidden=enc.hidden_size, seed=0)

            def run():
                with torch.inference_mode():
                    return net(enc.encode_text(captions, preset="training").hidden)

            out[layers] = _timed(run, repeat)
    return out


def side_t5clip(layers_list, captions, repeat):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    g = torch.Generator().manual_seed(0)
    ids_clip = torch.randint(0, 49000, (len(captions), 77), generator=g)
    # FLUX pads T5 to 512 tokens; caption length does not change the work
    ids_t5 = torch.randint(0, 32000, (len(captions), 512), generator=g)
    out = {}
    for layers in layers_list:
        t5 = T5EncoderModel(T5Config(**dict(T5_XXL, num_layers=layers))).eval()

        def run():
            with torch.inference_mode():
                return t5(ids_t5).last_hidden_state, clip(ids_clip).pooler_output

        out[layers] = _timed(run, repeat)
    return out


def weight_bytes() -> dict:
    """Full-depth parameter bytes (fp32 and bf16) of each model, built on the meta device from real configs."""
    from bench_critiprefill import SHAPES
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2Config, Qwen2Model, T5Config, T5EncoderModel

    from x2i_core.alignnet import AlignNet, AlignNetConfig

    def count(m):
        return sum(p.numel() for p in m.parameters())

    out = {}
    for name, shape, c in (("qwen2.5-vl-3b text decoder", "3b", 37), ("qwen2.5-vl-7b text decoder", "7b", 29)):
        with torch.device("meta"):
            m = Qwen2Model(Qwen2Config(vocab_size=151936, max_position_embeddings=128000, **SHAPES[shape]))
        out[name] = count(m)
        assert m.config.num_hidden_layers + 1 == c, (name, c)
        net = AlignNet(AlignNetConfig(in_channels=c, input_dim=SHAPES[shape]["hidden_size"]))  # small: real weights
        out[f"alignnet {shape} (C={c}, H={SHAPES[shape]['hidden_size']})"] = count(net)
        with torch.inference_mode():
            pooled, seq = net(torch.randn(1, c, 8, SHAPES[shape]["hidden_size"]))
        assert tuple(pooled.shape) == (1, 768) and tuple(seq.shape) == (1, 8, 4096), (pooled.shape, seq.shape)
    with torch.device("meta"):
        out["t5-xxl encoder"] = count(T5EncoderModel(T5Config(**T5_XXL)))
        out["clip-l text"] = count(CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        out["flux.1-dev transformer"] = count(flux)
    return out


def child(argv) -> None:
    side, layers, n_captions, repeat, out = argv
    layers_list = [int(x) for x in layers.split(",")]
    captions = (CAPTIONS * 8)[:int(n_captions)]
    torch.manual_seed(0)
    fn = side_x2i if side == "x2i" else side_t5clip
    times = fn(layers_list, captions, int(repeat))
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"times": {str(k): v for k, v in times.items()},
                   "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=4)
    ap.add_argument("--fraction", type=int, default=6, help="run 1/N of each decoder's depth (and 1/(2N))")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    full = {"x2i": 36, "t5clip": 24}
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "captions": args.captions,
              "fraction": args.fraction, "sides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for side, depth in full.items():
            hi = depth // args.fraction
            lo = max(1, hi // 2)
            out = os.path.join(tmp, f"{side}.json")
            r = subprocess.run([sys.executable, __file__, "--child", side, f"{lo},{hi}", str(args.captions),
                                str(args.repeat), out], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            with open(out, encoding="utf-8") as fh:
                d = json.load(fh)
            t_lo, t_hi = d["times"][str(lo)], d["times"][str(hi)]
            per_layer = (t_hi - t_lo) / (hi - lo)
            d.update(depths=[lo, hi], per_layer_s=per_layer, fixed_s=t_hi - per_layer * hi,
                     full_depth=depth, full_depth_s=t_hi + per_layer * (depth - hi))
            report["sides"][side] = d
            print(f"{side}: {lo} layers {t_lo:.2f}s, {hi} layers {t_hi:.2f}s -> {depth} layers ~{d['full_depth_s']:.2f}s "
                  f"for {args.captions} captions; peak RSS {d['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    s = report["sides"]
    report["ratio_measured_depth"] = s["x2i"]["times"][str(s["x2i"]["depths"][1])] / \
        s["t5clip"]["times"][str(s["t5clip"]["depths"][1])]
    report["ratio_full_depth"] = s["x2i"]["full_depth_s"] / s["t5clip"]["full_depth_s"]
    report["weights"] = weight_bytes()
    print(f"X2I / (T5-XXL + CLIP-L) encode time: {report['ratio_measured_depth']:.3f} at 1/{args.fraction} depth, "
          f"{report['ratio_full_depth']:.3f} extrapolated to full depth")
    for k, v in report["weights"].items():
        print(f"{k:40s} {v / 1e9:6.3f} B params  {v * 4 / 2**30:6.2f} GiB fp32  {v * 2 / 2**30:6.2f} GiB bf16")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
