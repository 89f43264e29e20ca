"""The prepared GPU check: every figure a lent GPU should produce, in one run, as dated rows.

    bash benchmarks/gpu_check.sh             # on the lent machine (≤ 8 min on one H200); appends to RESULTS.md
    bash benchmarks/gpu_check.sh --dry-run   # every step on this CPU with tiny shapes (part of `make test`)

Steps (each isolated: one that fails is reported as failed with its reason, the others still run):

* ``loss``     - distillation loss forward+backward at the real capture size (4608 x 3072, bf16): eager
                 reference vs row-wise vs fused Triton (time, peak memory); Liger-Kernel's KL if installed;
* ``encode``   - ``benchmarks/encode.py --shape 3b`` (bf16): the reference recipe vs our exact path;
* ``quant``    - a Qwen2.5-VL-3B-shaped decoder at none / bnb8 / bnb4 (bitsandbytes, if installed): peak
                 memory and cosine of the last hidden state to the unquantised one (dry run: int8 on CPU);
* ``critiprefill`` - ``benchmarks/bench_critiprefill.py`` at 16K / 32K, 3B shape: dense vs exact vs sparse;
* ``oracle``   - the reference stack (transformers 4.49) run on real CUDA (its own unmask path) vs our CPU
                 emulation of it, and our encoder on CUDA vs both (fp32);
* ``distill``  - one distillation step's maths (AlignNet on 7B-shaped states [1, 29, 512, 3584], full-size
                 random FLUX.1-dev, 1024² latents, attention captures and the pair losses, backward): time
                 and peak memory;
* ``flux``     - one 1024² image from a full-size random FLUX in bf16 (28 steps) with X2I conditioning
                 (3B-shaped AlignNet, 512 tokens) vs T5-XXL + CLIP-L conditioning (random, real shapes),
                 encode included: the whole-run ratio (target ≤ 1.05x).

Everything the lent machine lacks is carried by ``make gpu-wheels`` (``.gpu-wheels/``), which the shell
wrapper installs into ``.gpu-deps/`` (no registry there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

STEPS = ("loss", "encode", "quant", "critiprefill", "oracle", "distill", "flux")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


class Ctx:
    def __init__(self, dry: bool, work: str):
        self.dry = dry
        self.work = work
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak(self, base=0):
        return (torch.cuda.max_memory_allocated() - base) if self.cuda else None


def _run(cmd, timeout):
    env = dict(os.environ)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} … exited {r.returncode}: {r.stderr[-1500:]}")
    return r


def _script_json(ctx: Ctx, script: str, args: list, timeout: int) -> dict:
    """Run one of the benchmark scripts with ``--json`` on this device and read what it wrote."""
    out = os.path.join(ctx.work, os.path.basename(script) + ".json")
    _run([sys.executable, script, *args, "--device", str(ctx.device), "--json", out], timeout)
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def _gb(n):
    return "—" if n is None else f"{n / 2 ** 30:.2f} GiB"


# -- steps -----------------------------------------------------------------------------------------------
def _liger_loss(ctx: Ctx, rows: int, width: int) -> dict:
    """Liger-Kernel's KL (it takes log-probabilities and probabilities) at the same shape, when installed."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return {"note": "not installed"}
    kl = LigerKLDIVLoss(reduction="sum", log_target=False)
    g = torch.Generator(device="cpu").manual_seed(0)
    s0 = torch.randn(rows, width, generator=g).to(ctx.device, ctx.dtype)
    t0 = torch.softmax(torch.randn(rows, width, generator=g).float(), -1).to(ctx.device)
    times = []
    for i in range(3):
        x = s0.clone().requires_grad_()
        m0 = ctx.reset_peak()
        start = time.perf_counter()
        kl(torch.log_softmax(x.float(), -1), t0).backward()
        ctx.sync()
        if i:
            times.append(time.perf_counter() - start)
    return {"seconds": min(times), "bytes": ctx.peak(m0) or 0}


def step_loss(ctx: Ctx) -> dict:
    """The loss backends on 4608 rows (a 1024² capture: 4096 image + 512 text tokens) at FLUX's width 3072,
    which fits one kernel block (the whole-row kernels), and at 4608, wider than one block (the chunked
    kernels, for models wider than FLUX)."""
    from bench_distill import bench_loss

    rows = 64 if ctx.dry else 4608
    data, rows_md = {}, []
    for width in ((32, 48) if ctx.dry else (3072, 4608)):
        res = bench_loss(rows, width, ctx.dtype, ctx.device, 1 if ctx.dry else 5)
        res["liger"] = _liger_loss(ctx, rows, width)
        data[str(width)] = res
        e = res["eager"]
        rows_md += [f"| loss {rows}x{width} | {name} | {e['seconds'] / r['seconds']:.2f}x faster | "
                    f"{r['bytes'] / max(1, e['bytes']):.2f}x memory |" for name, r in res.items() if "seconds" in r]
    return {"data": data, "rows": rows_md}


def step_encode(ctx: Ctx) -> dict:
    args = ["--shape", "cpu", "--repeat", "1"] if ctx.dry else ["--shape", "3b", "--dtype", "bf16", "--repeat", "3"]
    data = _script_json(ctx, "benchmarks/encode.py", args, 1200)
    rows = [f"| encode {r['preset']} {r['prompt']} | {r['real_tokens']}/{r['padded_tokens']} tokens | ours "
            f"×{r['speedup_vs_reference']:.2f} vs reference | max diff vs padded forward "
            f"{r['max_abs_diff_vs_padded']:.1e} |" for r in data.get("rows", [])]
    return {"data": data, "rows": rows}


def _decoder(ctx: Ctx, folder: str, quant: str):
    from x2i_core.mllm import load_mllm

    return load_mllm(folder, dtype="fp32" if ctx.dry else "bf16", device=str(ctx.device), quant=quant)


def step_quant(ctx: Ctx) -> dict:
    from encode import build

    folder = os.path.join(ctx.work, "quant-model")
    os.makedirs(folder, exist_ok=True)
    build(folder, "cpu" if ctx.dry else "3b")
    modes = ["none", "int8"] if ctx.dry else ["none", "bnb8", "bnb4"]
    text = "A red fox jumps over a lazy dog in the snowy forest at dawn."
    base, out, rows = None, {}, []
    for q in modes:
        try:
            m0 = ctx.reset_peak()
            enc = _decoder(ctx, folder, q)
            h = enc.encode_text([text]).hidden[:, -1].float()
            peak = ctx.peak(m0)
        except Exception as exc:  # bitsandbytes missing on the lent machine, …
            out[q] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(f"| quant {q} | not measured | {out[q]['error'][:80]} | |")
            continue
        base = h if base is None else base
        cos = torch.nn.functional.cosine_similarity(h.flatten(1), base.flatten(1)).item()
        out[q] = {"peak_bytes": peak, "cosine_last_layer": cos}
        rows.append(f"| quant {q} | peak {_gb(peak)} | cosine {cos:.4f} | |")
        del enc
    return {"data": out, "rows": rows}


def step_critiprefill(ctx: Ctx) -> dict:
    args = (["--shape", "cpu", "--layers", "2", "--lengths", "1024", "--budgets", "384", "--segment", "128",
             "--local", "128", "--block", "64", "--repeat", "1", "--no-alignnet"] if ctx.dry else
            ["--shape", "3b", "--lengths", "16384,32768", "--budgets", "2048,4096"])
    data = _script_json(ctx, "benchmarks/bench_critiprefill.py", args, 1800)
    rows = [f"| critiprefill {r['length']} tokens, budget {r['budget']} | sparse ×{r['speedup_vs_dense']:.2f} vs dense "
            f"(exact path ×{r['dense_s'] / r['exact_s']:.2f}) | last-layer cosine mean {r['hidden_last_cos_mean']:.4f} | "
            f"kept {r['kept_fraction']:.2f} |" for r in data.get("rows", [])]
    return {"data": data, "rows": rows}


def step_oracle(ctx: Ctx) -> dict:
    """The reference stack on CUDA (mask 'native': 4.49 unmasks by itself there) vs its CPU emulation."""
    from safetensors import safe_open

    from x2i_core.mllm import EncodeRequest, load_mllm

    refstack = os.environ.get("X2I_REFSTACK", os.path.join(ROOT, ".refstack"))
    vocab = os.environ.get("X2I_QWEN25_TOKENIZER") or _comfy_vocab()
    helper = os.path.join(ROOT, "tests", "helpers", "reference_stack.py")
    template = os.path.join(ROOT, "tests", "data", "qwen2.5-vl-chat-template.jinja")
    rest = os.environ.get("PYTHONPATH")  # on the lent machine: .gpu-deps (a huggingface_hub 4.49 can use)
    env = dict(os.environ, PYTHONPATH=refstack + (os.pathsep + rest if rest else ""), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    model = os.path.join(ctx.work, "oracle-model")

    def ref(*args):
        r = subprocess.run([sys.executable, helper, *args], capture_output=True, text=True, env=env, timeout=900)
        if r.returncode:
            raise RuntimeError(f"reference stack: {r.stderr[-1500:]}")

    ref("build", model, vocab, template)
    texts = ["A red fox jumps over a lazy dog in the snowy forest at dawn.", "一只可爱的小猫坐在窗台上"]
    cases = [{"id": f"training-{i}", "recipe": "training", "text": t} for i, t in enumerate(texts)]
    cases.append({"id": "comfyui-text", "recipe": "comfyui", "text": texts[0]})
    results = {}
    runs = [("cpu", "cuda")] + ([] if ctx.dry else [("cuda", "native")])
    for device, mask in runs:
        out = os.path.join(ctx.work, f"oracle-{device}.safetensors")
        job = os.path.join(ctx.work, f"oracle-{device}.json")
        with open(job, "w", encoding="utf-8") as fh:
            json.dump({"model": model, "cases": cases, "out": out, "mask": mask, "device": device}, fh)
        ref("run", job)
        with safe_open(out, "pt") as fh:
            results[device] = {k: fh.get_tensor(k) for k in fh.keys() if k.endswith(".hidden")}
    ours = load_mllm(model, dtype="fp32", device=str(ctx.device))
    data, rows = {}, []
    for c in cases:
        h = ours.encode(EncodeRequest(text=c["text"]), preset=c["recipe"]).hidden.cpu()
        key = f"{c['id']}.hidden"
        d = {"ours_vs_" + dev: (h - t[key]).abs().max().item() for dev, t in results.items()}
        if "cuda" in results:
            d["cuda_native_vs_cpu_emulation"] = (results["cuda"][key] - results["cpu"][key]).abs().max().item()
        data[c["id"]] = d
        rows.append(f"| oracle {c['id']} | " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) + " | | |")
    return {"data": data, "rows": rows}


def _comfy_vocab() -> str:
    from tools.comfy_fetch import ensure_comfyui

    return os.path.join(ensure_comfyui(), "comfy", "text_encoders", "qwen25_tokenizer")


def _random_flux(ctx: Ctx, cfg: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device(ctx.device):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**cfg).to(ctx.dtype)
    return model.eval().requires_grad_(False)


def step_distill(ctx: Ctx) -> dict:
    from x2i_core.alignnet import AlignNet, AlignNetConfig
    from x2i_core.flux.capture import AttentionCapture, collect
    from x2i_core.ops.kl import distill_loss

    cfg = FLUX_TINY if ctx.dry else FLUX_DEV
    c, s, h = (3, 16, 32) if ctx.dry else (29, 512, 3584)
    side = 4 if ctx.dry else 64  # 1024² -> 64 x 64 latent tokens
    dev, dt = ctx.device, ctx.dtype
    flux = _random_flux(ctx, cfg)
    net = AlignNet(AlignNetConfig(in_channels=c, input_dim=h, output_dim0=cfg["pooled_projection_dim"],
                                  output_dim1=cfg["joint_attention_dim"])).to(dev).train()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, c, s, h, generator=g).to(dev, dt)
    t_seq = torch.randn(1, s, cfg["joint_attention_dim"], generator=g).to(dev, dt)
    t_pool = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(dev, dt)
    lat = torch.randn(1, side * side, 64, generator=g).to(dev, dt)
    img_ids = torch.zeros(side * side, 3, device=dev, dtype=dt)
    txt_ids = torch.zeros(s, 3, device=dev, dtype=dt)
    sig = torch.ones(1, device=dev, dtype=dt)
    guid = torch.full((1,), 3.5, device=dev, dtype=dt)
    cap = AttentionCapture(flux)

    def run(seq, pooled):
        return flux(hidden_states=lat, timestep=sig, guidance=guid, pooled_projections=pooled,
                    encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def one_step():
        with torch.no_grad():
            teacher = collect(cap, lambda: run(t_seq, t_pool))
        terms = []
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            pooled, seq = net(hidden)
            cap.run(lambda k, o: terms.append(distill_loss(o, teacher.pop(k), 1.0, "auto")),
                    lambda: run(seq.to(dt), pooled.to(dt)))
        loss = torch.stack([t.float() for t in terms]).sum()
        loss.backward()
        net.zero_grad(set_to_none=True)
        return len(terms), loss.item()

    one_step()  # warm-up
    m0 = ctx.reset_peak()
    t0 = time.perf_counter()
    pairs, loss = one_step()
    ctx.sync()
    dt_s = time.perf_counter() - t0
    data = {"seconds": dt_s, "peak_bytes": ctx.peak(m0), "pairs": pairs, "loss": loss,
            "flux_params": sum(p.numel() for p in flux.parameters())}
    return {"data": data, "rows": [f"| distill step {side * 16}², states [1,{c},{s},{h}] | {dt_s:.2f} s | "
                                   f"peak {_gb(data['peak_bytes'])} | {pairs} pairs |"]}


def _flux_text_encoders(ctx: Ctx, cfg: dict):
    """Random T5-XXL and CLIP-L text encoders (tiny in a dry run) and an AlignNet of the 3B shape."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from x2i_core.alignnet import AlignNet, AlignNetConfig

    dt, dry = ctx.dtype, ctx.dry
    with torch.device(ctx.device):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=cfg["joint_attention_dim"], d_kv=16 if dry else 64,
                                     d_ff=64 if dry else 10240, num_layers=1 if dry else 24,
                                     num_heads=2 if dry else 64, feed_forward_proj="gated-gelu")).to(dt).eval()
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=cfg["pooled_projection_dim"],
                                            intermediate_size=64 if dry else 3072, num_hidden_layers=1 if dry else 12,
                                            num_attention_heads=2 if dry else 12, projection_dim=768)).to(dt).eval()
        c, h = (3, 32) if dry else (37, 2048)
        net = AlignNet(AlignNetConfig(in_channels=c, input_dim=h, output_dim0=cfg["pooled_projection_dim"],
                                      output_dim1=cfg["joint_attention_dim"])).to(dt).eval()
    return t5, clip, net, (c, h)


def step_flux(ctx: Ctx) -> dict:
    cfg = FLUX_TINY if ctx.dry else FLUX_DEV
    steps, side = (2, 4) if ctx.dry else (28, 64)
    dev, dt = ctx.device, ctx.dtype
    flux = _random_flux(ctx, cfg)
    t5, clip, net, (c, h) = _flux_text_encoders(ctx, cfg)
    g = torch.Generator().manual_seed(1)
    ids_t5 = torch.randint(0, 32000, (1, 512), generator=g).to(dev)
    ids_clip = torch.randint(0, 49000, (1, 77), generator=g).to(dev)
    hidden = torch.randn(1, c, 512, h, generator=g).to(dev, dt)
    lat0 = torch.randn(1, side * side, 64, generator=g).to(dev, dt)
    img_ids = torch.zeros(side * side, 3, device=dev, dtype=dt)
    txt_ids = torch.zeros(512, 3, device=dev, dtype=dt)
    guid = torch.full((1,), 3.5, device=dev, dtype=dt)

    @torch.inference_mode()
    def image(encode):
        seq, pooled = encode()
        lat = lat0.clone()
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=dev)
        for i in range(steps):
            v = flux(hidden_states=lat, timestep=sigmas[i:i + 1].to(dt), guidance=guid, pooled_projections=pooled,
                     encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            lat = lat + (sigmas[i + 1] - sigmas[i]).to(dt) * v
        return lat

    def x2i():
        pooled, seq = net(hidden)
        return seq, pooled

    def t5clip():
        return t5(ids_t5).last_hidden_state, clip(ids_clip).pooler_output

    times = {}
    for enc in (x2i, t5clip):
        image(enc)  # warm-up
    for _ in range(1 if ctx.dry else 2):
        for name, enc in (("x2i", x2i), ("t5clip", t5clip)):
            ctx.sync()
            t0 = time.perf_counter()
            image(enc)
            ctx.sync()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    t = {k: min(v) for k, v in times.items()}
    ratio = t["x2i"] / t["t5clip"]
    return {"data": {"seconds": t, "ratio_x2i_over_t5clip": ratio, "steps": steps},
            "rows": [f"| FLUX {side * 16}², {steps} steps, whole run | X2I {t['x2i']:.2f} s vs T5+CLIP "
                     f"{t['t5clip']:.2f} s | ×{ratio:.3f} | target ≤ 1.05 |"]}


# -- driver --------------------------------------------------------------------------------------------
def environment(ctx: Ctx) -> dict:
    import transformers

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if ctx.cuda else f"cpu x{os.cpu_count()}", "dry_run": ctx.dry}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


def report(env: dict, results: dict) -> str:
    lines = [f"## GPU check {env['date']} ({env['device']}{', dry run on CPU with tiny shapes' if env['dry_run'] else ''})",
             "", f"torch {env['torch']}, transformers {env['transformers']}, diffusers {env['diffusers']}, "
             f"python {env['python']}. `bash benchmarks/gpu_check.sh`; every row from this one run.", "",
             "| step | figure | figure | note |", "|---|---|---|---|"]
    for name in STEPS:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | not run | | |")
        elif r["status"] != "ok":
            lines.append(f"| {name} | **failed** | {r['error'][:120]} | |")
        else:
            lines.extend(r["rows"] or [f"| {name} | ok | | |"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny shapes")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)}")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json / gpu_check.md (default: $OUT or a temp)")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"),
                    help="RESULTS.md to append to (not in a dry run)")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown step(s) {unknown}; expected some of {list(STEPS)}")
    out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as work:
        ctx = Ctx(args.dry_run, work)
        if not ctx.dry and not ctx.cuda:
            print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        env = environment(ctx)
        results = {}
        for name in steps:
            t0 = time.perf_counter()
            try:
                r = globals()[f"step_{name}"](ctx)
                results[name] = {"status": "ok", **r}
            except Exception as exc:
                results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name}: {results[name]['status']} in {results[name]['seconds']} s", flush=True)
            if ctx.cuda:
                torch.cuda.empty_cache()
    md = report(env, results)
    with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as fh:
        json.dump({"env": env, "results": results}, fh, indent=2, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w", encoding="utf-8") as fh:
        fh.write(md)
    print(md)
    if not args.dry_run:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write("\n" + md)
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    if failed:
        for n in failed:
            print(f"[gpu_check] {n} failed:\n{results[n]['traceback']}", file=sys.stderr)
    return 1 if (failed and args.dry_run) else 0


if __name__ == "__main__":
    sys.exit(main())
