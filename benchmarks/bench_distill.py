"""Distillation benchmarks, as ratios measured side by side in one run.

1. Loss: eager reference (the published expression) vs the row-wise PyTorch
   path vs the fused Triton kernel (CUDA only; under the CPU interpreter it is
   a correctness tool, not a speed one).  Forward + backward time, and memory:
   on CUDA the peak allocation, on CPU the bytes autograd keeps for backward.
2. One shared FLUX vs two copies (teacher + student): weight memory and step
   time on the tiny diffusers FLUX.
3. Gradient checkpointing in the real distillation trainer step (a small
   random diffusers FLUX with several blocks): the activation bytes the student
   pass keeps for backward with and without it, the step time, and the loss /
   gradient agreement.  Bytes = unique storages autograd saves outside
   checkpointed regions + the inputs each checkpointed block keeps, not
   counting FLUX's weights or the teacher captures (both runs hold those
   alike); on CUDA also the peak allocation of the step.

    python benchmarks/bench_distill.py [--rows 4608] [--width 3072] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2i_core.ops.kl import kl_fused, kl_reference, kl_rowwise  # noqa: E402


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def bench_loss(rows, width, dtype, device, repeat):
    g = torch.Generator(device="cpu").manual_seed(0)
    s0 = torch.randn(1, rows, width, generator=g).to(device, dtype)
    t0 = torch.randn(1, rows, width, generator=g).to(device, dtype)
    paths = {"eager": kl_reference, "rowwise": kl_rowwise}
    if device.type == "cuda":
        paths["fused"] = kl_fused
    results = {}
    for name, fn in paths.items():
        times, mem = [], 0
        for i in range(repeat + 1):
            s = s0.clone().requires_grad_()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            if name == "eager":
                loss, saved = saved_bytes(lambda: fn(s.float() if dtype != torch.float32 else s, t0.float()))
            else:
                loss, saved = saved_bytes(lambda: fn(s, t0))
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
                mem = torch.cuda.max_memory_allocated() - base
            else:
                mem = saved
            if i:  # first iteration warms up
                times.append(time.perf_counter() - start)
        results[name] = {"seconds": statistics.median(times), "bytes": mem}
    return results


def bench_flux(repeat):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                                  pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 12, 12)).eval()
    flux.requires_grad_(False)
    second = copy.deepcopy(flux)
    b, img, txt = 2, 256, 128
    lat = torch.randn(b, img, 64)
    img_ids = torch.zeros(img, 3)
    txt_ids = torch.zeros(txt, 3)
    t_ctx, t_pool = torch.randn(b, txt, 256), torch.randn(b, 64)
    s_ctx = torch.randn(b, txt, 256, requires_grad=True)
    s_pool = torch.randn(b, 64, requires_grad=True)

    def run(model):
        return model(hidden_states=lat, timestep=torch.ones(b), guidance=torch.full((b,), 3.5),
                     pooled_projections=t_pool, encoder_hidden_states=t_ctx, txt_ids=txt_ids, img_ids=img_ids,
                     return_dict=False)[0]

    def step(teacher, student):
        with torch.no_grad():
            ref = run(teacher)
        out = student(hidden_states=lat, timestep=torch.ones(b), guidance=torch.full((b,), 3.5),
                      pooled_projections=s_pool, encoder_hidden_states=s_ctx, txt_ids=txt_ids, img_ids=img_ids,
                      return_dict=False)[0]
        (out - ref).pow(2).mean().backward()

    res = {}
    for name, pair in (("one_flux", (flux, flux)), ("two_flux", (flux, second))):
        times = []
        for i in range(repeat + 1):
            t = time.perf_counter()
            step(*pair)
            if i:
                times.append(time.perf_counter() - t)
        res[name] = statistics.median(times)
    weights = sum(p.numel() * p.element_size() for p in flux.parameters())
    res["weight_bytes_one"] = weights
    res["weight_bytes_two"] = 2 * weights
    return res


def _storages(tensors) -> dict:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def held_for_backward(trainer, fn):
    """Run ``fn()`` (one trainer step); the activation bytes its student pass kept for backward."""
    from x2i_core.train import distill as distill_trainer

    held, teacher = {}, {}
    collect = distill_trainer.collect

    def recording_collect(capture, f, dtype=None):
        store = collect(capture, f, dtype)
        teacher.update(_storages(store.values()))
        return store

    def pack(t):
        held.update(_storages([t]))
        return t

    flux = trainer.flux
    inner = flux._gradient_checkpointing_func

    def checkpointed(block, *args):
        held.update(_storages(args))
        return inner(block, *args)

    distill_trainer.collect = recording_collect
    flux._gradient_checkpointing_func = checkpointed if inner is not None else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            info = fn()
    finally:
        distill_trainer.collect = collect
        flux._gradient_checkpointing_func = inner
    weights = _storages(list(flux.parameters()) + list(flux.buffers()))
    return info, sum(n for ptr, n in held.items() if ptr not in weights and ptr not in teacher)


def bench_checkpointing(resolution, repeat, work):
    from x2i_core.tiny import build_flux_diffusers, build_qwen25vl
    from x2i_core.train.distill import DistillTrainer, DistillTrainingConfig
    from x2i_core.train.runtime import load_config

    mllm = build_qwen25vl(os.path.join(work, "mllm"), seed=0)
    flux = build_flux_diffusers(os.path.join(work, "flux"), seed=1, joint_dim=64, pooled_dim=32, double_blocks=4,
                                single_blocks=8, heads=4)
    caps = os.path.join(work, "caps.txt")
    with open(caps, "w", encoding="utf-8") as fh:
        fh.write("a red fox in the snow\na lighthouse at night\n")
    captions = ["a red fox in the snow", "a lighthouse at night"]
    res = {"resolution": resolution, "flux_blocks": "4 double + 8 single, width 64"}
    trainers = {}
    for ckpt in (False, True):
        cfg = load_config(DistillTrainingConfig, None, [f"mllm={mllm}", f"flux={flux}", f"output_dir={work}/out-{ckpt}",
                                           f"data.paths=[{caps}]", f"distill.resolution={resolution}",
                                           "train.batch_size=2", "train.max_grad_norm=1e9",
                                           f"train.gradient_checkpointing={ckpt}"])
        trainers[ckpt] = DistillTrainer(cfg)
    try:
        for ckpt, trainer in trainers.items():  # first step: bytes, loss and gradients (same weights in both)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            info, held = held_for_backward(trainer, lambda: trainer.step(0, captions))
            grads = torch.cat([p.grad.flatten() for p in trainer.net.parameters()])
            res[f"ckpt_{ckpt}"] = {"held_bytes": held, "loss": info["loss"], "grads": grads}
            if trainer.device.type == "cuda":
                res[f"ckpt_{ckpt}"]["peak_bytes"] = torch.cuda.max_memory_allocated()
        times = {False: [], True: []}
        for i in range(repeat):  # round-robin timing
            for ckpt, trainer in trainers.items():
                t = time.perf_counter()
                trainer.step(1 + i, captions)
                times[ckpt].append(time.perf_counter() - t)
    finally:
        for trainer in trainers.values():
            trainer.close()
    off, on = res.pop("ckpt_False"), res.pop("ckpt_True")
    res["held_bytes_off"], res["held_bytes_on"] = off["held_bytes"], on["held_bytes"]
    res["held_ratio_on_vs_off"] = on["held_bytes"] / max(1, off["held_bytes"])
    if "peak_bytes" in off:
        res["peak_ratio_on_vs_off"] = on["peak_bytes"] / max(1, off["peak_bytes"])
    res["time_ratio_on_vs_off"] = statistics.median(times[True]) / statistics.median(times[False])
    res["loss_rel_diff"] = abs(on["loss"] - off["loss"]) / abs(off["loss"])
    res["grad_rel_diff"] = float((on["grads"] - off["grads"]).norm() / off["grads"].norm())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4608, help="tokens of one capture (1024^2 image + 512 text)")
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--distill-resolution", type=int, default=256,
                    help="image side of the gradient-checkpointing trainer step")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{os.cpu_count()}",
              "torch": torch.__version__, "rows": args.rows, "width": args.width, "dtype": str(dtype)}
    loss = bench_loss(args.rows, args.width, dtype, device, args.repeat)
    report["loss"] = loss
    e = loss["eager"]
    for name, r in loss.items():
        if name != "eager":
            report[f"{name}_speedup_vs_eager"] = e["seconds"] / r["seconds"]
            report[f"{name}_memory_ratio_vs_eager"] = r["bytes"] / max(1, e["bytes"])
    flux = bench_flux(args.repeat)
    report["flux"] = flux
    report["two_vs_one_flux_time_ratio"] = flux["two_flux"] / flux["one_flux"]
    report["two_vs_one_flux_weight_ratio"] = flux["weight_bytes_two"] / flux["weight_bytes_one"]
    with tempfile.TemporaryDirectory() as work:
        report["checkpointing"] = bench_checkpointing(args.distill_resolution, args.repeat, work)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
