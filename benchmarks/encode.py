"""Encoding speed: the reference recipe vs ours, side by side in one run, as ratios.

* reference: ``generate(max_new_tokens=1, output_hidden_states=True)`` over the
  padded prompt (what the published scripts call), prefill states kept;
* padded forward: one backbone forward over the padded prompt, no LM head, no
  KV cache (``exact_fill=False``);
* ours: the same with exact savings (left padding: real tokens + one pad query per prompt, giving the pad
  rows the released AlignNets were trained on (``pad_rows="reference"``, the default); right padding: real
  tokens + one pad, its row repeated);
* ours, constant rows (``training`` only): left padding with ``pad_rows="constant"`` (real tokens only + the
  cached per-model constant: what this environment's transformers computes, so it is compared with the
  reference recipe run here; the default rows are compared with the padded forward of the same semantics).

The model is a random-weight Qwen2.5-VL with the text-decoder shapes of a real
family member (default: Qwen2-0.5B's, the LM of InternVL2.5-1B: width 896, 24
layers, 14 heads / 2 KV heads, MLP 4864 - small enough for a CPU; ``--shape
3b`` uses Qwen2.5-VL-3B's for a GPU) and a tiny vision tower (text prompts).
Outputs are compared too (max abs difference to the reference).

    python benchmarks/encode.py [--shape 0.5b|3b] [--device cpu] [--repeat 3] [--long 512,4096] [--json out.json]

``--long N,M`` adds prompts of about N, M real tokens (a repeated document passage): the fixed-length
presets cut them to 512 (nothing left to save), ``comfyui`` pads them to 1.3x and shows what the exact
right-padding saving gives on long inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_critiprefill import SHAPES  # noqa: E402  (real text-decoder shapes, shared by the benchmarks)

PROMPTS = {
    "short (~16 real tokens)": "a red fox in the snow",
    "medium (~64 real tokens)": ("An oil painting of a lighthouse on a rocky coast under a stormy sky, waves crashing, "
                                 "seagulls, dramatic light breaking through the clouds, in the style of Turner"),
}


REAL_VOCAB = 151936  # Qwen2.5-VL-3B/7B embedding rows (config.json vocab_size)


def real_tokenizer(folder: str):
    """Qwen2.5's real tokenizer (the copy ComfyUI ships in comfy/text_encoders/qwen25_tokenizer), saved to
    ``folder``: prompts then have the released models' token counts (the tiny BPE splits the template into
    more tokens)."""
    from transformers import Qwen2TokenizerFast

    from tools.comfy_fetch import ensure_comfyui

    src = os.path.join(ensure_comfyui(), "comfy", "text_encoders", "qwen25_tokenizer")
    tok = Qwen2TokenizerFast.from_pretrained(src)
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    return tok


def build(folder: str, shape: str, layers: int | None = None, tokenizer: str = "tiny") -> str:
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from x2i_core.prompt import QWEN25VL_CHAT_TEMPLATE
    from x2i_core.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer
    from x2i_core.tiny.parts import shaped_qwen25vl_config

    tok = real_tokenizer(folder) if tokenizer == "real" else build_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    s = dict(SHAPES[shape])
    if layers:
        s["num_hidden_layers"] = layers
    cfg = shaped_qwen25vl_config(ids, REAL_VOCAB if tokenizer == "real" else len(tok), s, max_positions=32768)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN25VL_CHAT_TEMPLATE
                        ).save_pretrained(folder)
    return folder


def long_text(enc, n_tokens: int) -> str:
    """A document-like text of about ``n_tokens`` tokens (the prompt's own template included)."""
    from x2i_core.mllm import EncodeRequest

    passage = ("The committee reviewed the quarterly report on coastal erosion, noting that the northern dunes "
               "retreated faster than forecast while the harbour wall held. ")
    text = passage
    while enc.prepare([EncodeRequest(text=text)], "comfyui")[2][0] < n_tokens:
        text += passage
    return text


def user_text(enc, n_tokens: int) -> str:
    """A caption of exactly ``n_tokens`` tokens of the model's tokenizer (words of a fixed caption, cycled)."""
    words = ("a red fox jumps over a lazy dog in the snowy forest at dawn while soft golden light breaks through "
             "the pine trees and a river winds past old stone walls under a pale winter sky").split()
    tok = enc.processor.tokenizer
    text, i = "", 0
    while len(tok(text)["input_ids"]) < n_tokens:
        text = (text + " " + words[i % len(words)]).strip()
        i += 1
    ids = tok(text)["input_ids"][:n_tokens]
    return tok.decode(ids)


def interleaved(fns, repeat, sync):
    """Run the functions round-robin (one warm-up each), so load on a noisy machine hits all alike;
    returns each one's last output and median time."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            outs[i] = fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    return outs, [statistics.median(t) for t in times]


def reference_recipe(full, inputs):
    """What the published scripts call: generate(max_new_tokens=1) over the padded prompt, prefill states kept."""
    def run():
        with torch.inference_mode():
            out = full.generate(**inputs, max_new_tokens=1, output_hidden_states=True,
                                return_dict_in_generate=True, do_sample=False)
        return torch.stack(out.hidden_states[0], dim=1)

    return run


def full_logits(full, n_positions: int, dtype, device):
    """What 4.49's generate() adds to this stack's: its Qwen2.5-VL forward has no ``logits_to_keep``, so the
    prefill computes the LM head over every position (``lm_head(hidden_states)``, 4.49
    modeling_qwen2_5_vl.py), where this stack's computes the last position only. Timed alone, in the same
    round-robin; added to the reference time for the "vs 4.49" figures."""
    hidden = torch.randn(1, n_positions - 1, full.lm_head.in_features, dtype=dtype, device=device)

    def run():
        with torch.inference_mode():
            return full.lm_head(hidden)

    return run


def gemm_section(args, results) -> None:
    """Why short prompts cannot reach the token ratio on a CPU: throughput of one MLP projection of the shape
    (width x MLP width) at M tokens, per dtype - small M runs at a fraction of the 512-token throughput."""
    s = SHAPES[args.shape]
    results["gemm"] = []
    from x2i_core.mllm.packed import PackedLinear, onednn_available

    for dtype in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(s["hidden_size"], s["intermediate_size"], bias=False).to(dtype=dtype, device=args.device)
        w = lin.weight.detach()
        packed = PackedLinear(lin) if args.device == "cpu" and onednn_available(dtype) else None
        for m in (1, 8, 32, 40, 64, 128, 512):
            x = torch.randn(m, s["hidden_size"], dtype=dtype, device=args.device)
            fns = [lambda x=x: torch.nn.functional.linear(x, w)]
            if packed is not None:  # cpu_matmul='onednn', timed in the same round-robin
                fns.append(lambda x=x: packed(x))
            with torch.inference_mode():
                outs, times = interleaved(fns, max(args.repeat, 5), lambda: None)
            t = times[0]
            row = {"dtype": str(dtype).split(".")[-1], "tokens": m, "ms": t * 1e3,
                   "gflops": 2 * m * w.numel() / t / 1e9, "weight_gb_per_s": w.numel() * w.element_size() / t / 1e9}
            extra = ""
            if packed is not None:
                row["onednn_ms"] = times[1] * 1e3
                row["onednn_gflops"] = 2 * m * w.numel() / times[1] / 1e9
                row["onednn_max_abs_diff"] = (outs[1].float() - outs[0].float()).abs().max().item()
                extra = (f"   onednn {row['onednn_ms']:7.2f} ms {row['onednn_gflops']:7.1f} GFLOP/s "
                         f"(x{t / times[1]:.2f}, max|diff| {row['onednn_max_abs_diff']:.1e})")
            results["gemm"].append(row)
            print(f"gemm {row['dtype']:9s} M={m:4d} {row['ms']:7.2f} ms {row['gflops']:7.1f} GFLOP/s "
                  f"{row['weight_gb_per_s']:6.1f} GB/s of weights{extra}", flush=True)


def roundoff_section(args, folder, prompts, results) -> None:
    """Is the packed path's difference fp32 round-off? Both fp32 kernels (torch's nn.Linear, oneDNN packed) against
    the same encode in float64 (torch kernels), every preset and prompt of the run: the error of each to the fp64
    result, max abs and relative to the largest |value|."""
    from x2i_core.mllm import EncodeRequest, load_mllm

    truth_enc = load_mllm(folder, dtype=torch.float64, device=args.device, cpu_matmul="torch")
    encs = {k: load_mllm(folder, dtype=torch.float32, device=args.device, cpu_matmul=k) for k in ("torch", "onednn")}
    results["roundoff"] = []
    for preset in args.presets.split(","):
        for label, text in prompts.items():
            req = EncodeRequest(text=text)
            truth = truth_enc.encode(req, preset).hidden
            row = {"preset": preset, "prompt": label, "max_abs": truth.abs().max().item()}
            for k, e in encs.items():
                row[f"{k}_max_abs_err"] = (e.encode(req, preset).hidden.double() - truth).abs().max().item()
            results["roundoff"].append(row)
            print(f"fp64 check {preset:9s} {label:24s} |h|max {row['max_abs']:.2f}  fp32 torch err "
                  f"{row['torch_max_abs_err']:.1e}  fp32 onednn err {row['onednn_max_abs_err']:.1e}", flush=True)
    del truth_enc, encs


def batch_section(args, enc, full, results, sync) -> None:
    """Many short captions in one call: the reference's padded [N, 512] batch (as its trainer feeds it) vs
    our encode of the same list (opening cache, one pad query per prompt, fillers to the batch's longest)."""
    from x2i_core.mllm import EncodeRequest

    lengths = [8 + (args.batch_max - 8) * i // max(1, args.batch - 1) for i in range(args.batch)]
    texts = [user_text(enc, n) for n in lengths]
    reqs = [EncodeRequest(text=t) for t in texts]
    results["batch"] = []
    for preset in args.presets.split(","):
        batch, _, real = enc.prepare(reqs, preset)
        inputs = {k: v.to(args.device) for k, v in batch.items()}

        reference = reference_recipe(full, inputs)
        (ref, ours), (t_ref, t_ours) = interleaved([reference, lambda: enc.encode(reqs, preset).hidden],
                                                   args.repeat, sync)
        diff = (ours.float() - ref.float()).abs().max().item() if preset != "training" else None
        row = {"preset": preset, "prompts": args.batch, "user_tokens": f"{min(lengths)}..{max(lengths)}",
               "real_tokens": f"{min(real)}..{max(real)}", "padded_tokens": ref.shape[2], "reference_s": t_ref,
               "ours_s": t_ours, "speedup_vs_reference": t_ref / t_ours, "max_abs_diff_vs_reference": diff}
        if preset == "training":  # this stack's generate() has the constant pad rows: compare what both share
            padded = enc.encode(reqs, preset, exact_fill=False).hidden
            row["max_abs_diff_vs_padded"] = (ours.float() - padded.float()).abs().max().item()
            row["real_rows_max_abs_diff_vs_reference"] = max(
                (ours[i, :, -n:].float() - ref[i, :, -n:].float()).abs().max().item() for i, n in enumerate(real))
        results["batch"].append(row)
        print(f"batch {preset:9s} {args.batch} prompts, user tokens {row['user_tokens']}: ref {t_ref:.2f}s  ours "
              f"{t_ours:.2f}s  x{row['speedup_vs_reference']:.2f}", flush=True)


def rows_section(args, enc, full, full_same, prompts, results, sync, dtype) -> None:
    """Each preset x prompt: the reference recipe, the padded forward and ours (with and without the opening
    cache), round-robin; the 4.49 logits and (packed kernels) the reference on our kernels."""
    from x2i_core.mllm import EncodeRequest

    depth_k = results["full_depth"] / results["layers"]
    for preset in args.presets.split(","):
        for label, text in prompts.items():
            req = EncodeRequest(text=text)
            batch, _, lengths = enc.prepare([req], preset)
            inputs = {k: v.to(args.device) for k, v in batch.items()}

            reference = reference_recipe(full, inputs)
            def without_opening_cache():
                enc.prefix_cache = False
                try:
                    return enc.encode(req, preset).hidden
                finally:
                    enc.prefix_cache = True

            fns = [reference, lambda: enc.encode(req, preset, exact_fill=False).hidden,
                   lambda: enc.encode(req, preset).hidden, without_opening_cache]
            if preset == "training":
                fns.append(lambda: enc.encode(req, preset, pad_rows="constant").hidden)
            if full_same is not None:
                fns.append(reference_recipe(full_same, inputs))
            fns.append(full_logits(full, inputs["input_ids"].shape[1], dtype, args.device))
            outs, times = interleaved(fns, args.repeat, sync)
            t_logits = times[-1]
            (ref, padded, ours), (t_ref, t_pad, t_ours) = outs[:3], times[:3]
            row = {"preset": preset, "prompt": label, "real_tokens": lengths[0], "padded_tokens": ref.shape[2],
                   "reference_s": t_ref, "padded_forward_s": t_pad, "ours_s": t_ours,
                   "speedup_vs_reference": t_ref / t_ours, "padded_forward_vs_reference": t_ref / t_pad,
                   "max_abs_diff_vs_padded": (ours.float() - padded.float()).abs().max().item(),
                   "no_opening_cache_s": times[3], "no_opening_cache_speedup_vs_reference": t_ref / times[3],
                   "opening_tokens": len(enc.prompt_prefix(preset)[0]) if enc.prompt_prefix(preset) else 0,
                   "logits_449_s": t_logits, "speedup_vs_reference_449": (t_ref + t_logits) / t_ours,
                   "full_depth_speedup_vs_reference_449": (depth_k * t_ref + t_logits) / (depth_k * t_ours)}
            if full_same is not None:
                t_same = times[-2]
                row["reference_same_kernels_s"] = t_same
                row["speedup_vs_reference_same_kernels"] = t_same / t_ours
                row["full_depth_speedup_vs_reference_449_same_kernels"] = (
                    (depth_k * t_same + t_logits) / (depth_k * t_ours))
                row["reference_same_kernels_max_abs_diff"] = (outs[-2].float() - ref.float()).abs().max().item()
            if preset == "training":  # this stack's generate() has the constant rows
                row["constant_speedup_vs_reference"] = t_ref / times[4]
                row["max_abs_diff_vs_reference"] = (outs[4].float() - ref.float()).abs().max().item()
            else:
                row["max_abs_diff_vs_reference"] = (ours.float() - ref.float()).abs().max().item()
            results["rows"].append(row)
            _print_row(row, preset, label, lengths[0], ref.shape[2], full_same is not None)


def _print_row(row: dict, preset: str, label: str, real: int, padded: int, same_kernels: bool) -> None:
    extra = f"  constant rows x{row['constant_speedup_vs_reference']:.2f}" if preset == "training" else ""
    extra += (f"  vs 4.49 (+{row['logits_449_s']:.3f}s full logits) x{row['speedup_vs_reference_449']:.2f}, full "
              f"depth x{row['full_depth_speedup_vs_reference_449']:.2f}")
    if same_kernels:
        extra += (f"  [reference on the same kernels {row['reference_same_kernels_s']:.3f}s: "
                  f"x{row['speedup_vs_reference_same_kernels']:.2f}, full depth vs 4.49 "
                  f"x{row['full_depth_speedup_vs_reference_449_same_kernels']:.2f}]")
    print(f"{preset:9s} {label:26s} tokens {real:4d}/{padded:4d}  ref {row['reference_s']:7.3f}s  "
          f"padded fwd x{row['padded_forward_vs_reference']:.2f}  ours x{row['speedup_vs_reference']:.2f}"
          f" (without the opening cache x{row['no_opening_cache_speedup_vs_reference']:.2f})"
          f"{extra}  max|diff| vs ref {row['max_abs_diff_vs_reference']:.1e}, vs padded "
          f"{row['max_abs_diff_vs_padded']:.1e}", flush=True)


def quant_section(args, folder, enc, results, sync) -> None:
    """Quantisation: weight memory, time and agreement with fp32 (hidden states and a random AlignNet)."""
    from x2i_core.mllm import EncodeRequest, load_mllm
    from x2i_core.mllm.quant import Int8Linear
    from x2i_core.tiny import build_alignnet

    req = EncodeRequest(text=PROMPTS["medium (~64 real tokens)"])
    base = enc.encode(req, "training").hidden.float()
    net = build_alignnet(channels=enc.channels, hidden=enc.hidden_size, seed=1).to(args.device)
    with torch.no_grad():
        p0, s0 = net(base)
    variants = [("fp32", "fp32", "none"), ("bf16", "bf16", "none"), ("int8 (fp32 compute)", "fp32", "int8"),
                ("int8 (bf16 compute)", "bf16", "int8")]
    if args.device.startswith("cuda"):
        variants += [("bnb8", "bf16", "bnb8"), ("bnb4", "bf16", "bnb4")]
    encs = {}
    for label, dt, q in variants:
        try:
            encs[label] = load_mllm(folder, dtype=dt, device=args.device, quant=q)
        except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes missing: report, go on
            print(f"{label}: not run ({exc})")
    (outs, times) = interleaved([lambda e=e: e.encode(req, "training").hidden for e in encs.values()],
                                args.repeat, sync)
    results["quant"] = []
    for (label, e), h, t in zip(encs.items(), outs, times):
        layers = e.decoder_layers
        nbytes = sum(b.numel() * b.element_size() for b in list(layers.parameters()) + list(layers.buffers()))
        with torch.no_grad():
            p1, s1 = net(h.float())
        cos = torch.nn.functional.cosine_similarity
        row = {"variant": label, "decoder_weight_bytes": nbytes, "time_s": t,
               "rel_err_vs_fp32": ((h.float() - base).norm() / base.norm()).item(),
               "alignnet_seq_cos": cos(s1.flatten(), s0.flatten(), dim=0).item(),
               "alignnet_pooled_cos": cos(p1.flatten(), p0.flatten(), dim=0).item(),
               "int8_layers": sum(isinstance(m, Int8Linear) for m in layers.modules())}
        results["quant"].append(row)
        print(f"{label:22s} decoder weights {nbytes / 2**20:8.1f} MiB  time {t:6.3f}s  "
              f"rel err {row['rel_err_vs_fp32']:.2e}"
              f"  AlignNet cos seq {row['alignnet_seq_cos']:.6f} pooled {row['alignnet_pooled_cos']:.6f}", flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--long", default="", help="extra prompts of about these many real tokens, comma separated")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder depth override (every layer has the shape's widths: per-layer work is the same, "
                         "so the ratios are those of the full depth up to the embedding)")
    ap.add_argument("--user-tokens", default="",
                    help="instead of the short/medium captions: captions of exactly these many user tokens")
    ap.add_argument("--presets", default="training,comfyui,scripts")
    ap.add_argument("--tokenizer", choices=["tiny", "real"], default="tiny",
                    help="real: Qwen2.5's own tokenizer (from ComfyUI's copy) and the released 151936-row "
                         "embedding, so prompts have the real token counts")
    ap.add_argument("--no-quant", action="store_true", help="skip the quantisation section")
    ap.add_argument("--batch", type=int, default=0,
                    help="also encode this many captions of 8..--batch-max user tokens in one call (dataset "
                         "pre-encoding, distillation) against the reference recipe's padded batch")
    ap.add_argument("--batch-max", type=int, default=40)
    ap.add_argument("--gemm", action="store_true", help="only the MLP-projection throughput table (per dtype, M)")
    ap.add_argument("--cpu-matmul", default="auto", choices=["auto", "torch", "onednn"],
                    help="our encoder's decoder products (x2i_core.mllm.packed); when that is onednn the reference "
                         "recipe is also timed with the same packed kernels (the 'same kernels' columns)")
    ap.add_argument("--fp64-check", action="store_true",
                    help="also compare the fp32 encodes (torch and onednn kernels) with a float64 encode")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from transformers import Qwen2_5_VLForConditionalGeneration

    from x2i_core.mllm import load_mllm
    from x2i_core.mllm.chat import resolve_dtype

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    results = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype, "rows": [],
               "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
               "full_depth": SHAPES[args.shape]["num_hidden_layers"], "tokenizer": args.tokenizer}
    import transformers

    results["transformers"] = transformers.__version__
    if args.gemm:
        gemm_section(args, results)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=2)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(os.path.join(tmp, "model"), args.shape, args.layers, args.tokenizer)
        enc = load_mllm(folder, dtype=dtype, device=args.device, cpu_matmul=args.cpu_matmul)
        results["cpu_matmul"] = enc.cpu_matmul
        full = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        full_same = None
        if enc.cpu_matmul == "onednn":  # the reference recipe on our kernels: what the kernel alone gives it
            from x2i_core.mllm.packed import pack_linears

            full_same = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
            pack_linears(full_same.model.language_model.layers)
        prompts = dict(PROMPTS)
        if args.user_tokens:
            prompts = {f"{n} user tokens": user_text(enc, int(n)) for n in args.user_tokens.split(",")}
        for n in [int(x) for x in args.long.split(",") if x.strip()]:
            prompts[f"long (~{n} real tokens)"] = long_text(enc, n)
        rows_section(args, enc, full, full_same, prompts, results, sync, dtype)
        if args.fp64_check:
            roundoff_section(args, folder, prompts, results)
        if args.batch:
            batch_section(args, enc, full, results, sync)
        if not args.no_quant:
            quant_section(args, folder, enc, results, sync)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
