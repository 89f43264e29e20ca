"""Dense prefill vs CritiPrefill sparse prefill on long inputs, measured side by side in one run.

For each length the same encoder runs three forwards over the same batch:

* ``dense``  - the encoder as it ships (transformers' SDPA attention, ``ChatEncoder.forward_hidden``);
* ``exact``  - our attention path with ``budget=None`` (keeps every block: equals dense to round-off; shows
               what the blocked code gains or loses *without* skipping anything);
* ``sparse`` - CritiPrefill (``x2i_core.mllm.critiprefill``) with the given budget.

Quality: cosine similarity of the sparse hidden states to dense (last layer, per token; and of the
attention-dependent part ``h_L - h_0``), and of an AlignNet's outputs (``x2i_core.tiny.build_alignnet`` for the
model's channels/width: sequence output per token, pooled output).

The model is a random-weight Qwen2.5-VL text decoder (tiny vision tower, text input).  Random weights give
near-uniform attention, which no sparse method can approximate and which no trained LLM has, so by default
(``--attention peaked``) the weights are *structured* as documented in :func:`structure_weights`:
unit-gain init, and in every layer each query head's projection tied to its KV head's key projection (plus
noise) and scaled so that attention is peaked on matching contexts (self, nearby tokens, earlier copies of the
same passage).  The input is a *document of repeated passages*: 16 random-token passages of 64-512 tokens
drawn with replacement until the real length, right-padded 1.3x as the 'comfyui' preset pads long prompts.
``--attention random`` keeps the unit-gain init with independent random q / k projections (diffuse attention,
the case no sparse method handles) for contrast.

CPU default: a small decoder (width 256, 4 x 64-dim heads / 2 KV heads, 6 layers, MLP 512) at 8K/16K/32K with
one dense layer; attention is a larger share of this shape's work than of a real 3B's (measured: ~3/4 of the
dense forward at 16K on CPU), so its whole-forward ratios overstate a 3B's.  Times are wall-clock minima over
interleaved rounds, plus process CPU time (steadier when other processes share the CPU).  ``--kernel`` also
times one attention layer with a real model's head layout on random q/k/v (timing does not depend on values)
and projects the whole-prefill gain of that model with Amdahl's law from its FLOP split.
GPU: ``--device cuda --shape 3b`` (bf16).

    python benchmarks/bench_critiprefill.py [--device cpu|cuda] [--shape cpu|0.5b|3b|7b] [--lengths 8192,16384,32768]
        [--budgets 2048,4096] [--segment 512] [--block 128] [--dense-layers 1] [--attention peaked|random]
        [--pad-ratio 1.3] [--repeat 2] [--kernel] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    # attention-heavy small decoder for 2-core CPUs
    "cpu": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
}


def build_encoder(shape: str, attention: str, device: str, dtype: torch.dtype, seed: int = 0, layers: int | None = None,
                  peak: float = 1.5, far: float = 2.0, noise: float = 0.5):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from x2i_core.mllm import Qwen25VLEncoder
    from x2i_core.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer
    from x2i_core.tiny.parts import shaped_qwen25vl_config

    tok = build_tokenizer("")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    s = dict(SHAPES[shape])
    if layers:
        s["num_hidden_layers"] = layers
    cfg = shaped_qwen25vl_config(ids, len(tok), s, max_positions=65536)
    torch.manual_seed(seed)
    with torch.device(device):
        full = Qwen2_5_VLForConditionalGeneration(cfg)
    full = full.to(dtype).eval().requires_grad_(False)
    structure_weights(full.model.language_model, seed, peak=peak, far=far, noise=noise, tie=attention == "peaked")
    enc = Qwen25VLEncoder(full, full.model, None, f"Qwen2.5-VL random '{shape}' ({attention})")
    return enc, tok, ids["<|endoftext|>"]


@torch.no_grad()
def structure_weights(lm, seed: int, peak: float = 1.5, noise: float = 0.5, far: float = 2.0,
                      tie: bool = True) -> None:
    """Make the random decoder's attention peaked and content-driven, like a trained LM's.

    * unit-gain init: embeddings N(0, 1), every linear weight N(0, 1/fan_in), biases 0, the residual
      branches' output projections (o_proj, down_proj) scaled by 1/sqrt(2 * layers) so the stream stays O(1)
      and every layer's attention visibly moves the hidden states;
    * ``tie=False`` stops here (independent random q / k: diffuse attention, the contrast case); else
    * per layer, each query head's projection = its KV head's key projection + ``noise`` x an independent one,
      both x ``peak``: q.k is then largest for keys whose (contextual) content matches the query's, RoPE adds
      locality, and logits have a spread of ~``peak**2 * sqrt(head_dim)`` (peaked softmax);
    * the rows of the low-frequency RoPE pairs (the last quarter of each half of a head, nearly
      position-independent over long ranges) x ``far``, so matches far back (an earlier copy of a passage) still
      score - without it attention is almost purely local.
    """
    g = torch.Generator().manual_seed(seed + 1)
    n_layers = len(lm.layers)

    def randn(shape, std):
        return (torch.randn(shape, generator=g) * std)

    emb = lm.embed_tokens.weight
    emb.copy_(randn(emb.shape, 1.0).to(emb))
    for layer in lm.layers:
        at = layer.self_attn
        for lin in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                    layer.mlp.down_proj):
            w = randn(lin.weight.shape, lin.weight.shape[1] ** -0.5)
            if lin is at.o_proj or lin is layer.mlp.down_proj:
                w /= (2 * n_layers) ** 0.5
            lin.weight.copy_(w.to(lin.weight))
            if lin.bias is not None:
                lin.bias.zero_()
        if not tie:
            continue
        d = at.head_dim
        groups = at.num_key_value_groups
        wk = at.k_proj.weight.float().cpu().view(-1, d, at.hidden_size)          # [Hkv, D, hidden]
        wq = wk.repeat_interleave(groups, 0)                                     # [H, D, hidden]
        wq = wq + noise * randn(wq.shape, at.hidden_size ** -0.5)
        # rows of the low-frequency RoPE pairs (position-insensitive over long ranges) x far
        gain = torch.ones(d)
        gain[d // 4: d // 2] = far
        gain[3 * d // 4:] = far
        at.q_proj.weight.copy_((peak * wq * gain[None, :, None]).reshape(-1, at.hidden_size).to(at.q_proj.weight))
        at.k_proj.weight.copy_((peak * wk * gain[None, :, None]).reshape(-1, at.hidden_size).to(at.k_proj.weight))


def make_document(n_real: int, total: int, vocab: int, pad_id: int, n_special: int, seed: int = 0,
                  passages: int = 16):
    """Repeated-passage document: ``n_real`` tokens of ``passages`` random-token passages (64-512 tokens each)
    drawn with replacement, right-padded to ``total`` with the pad token (the 'comfyui' preset's padding)."""
    g = torch.Generator().manual_seed(seed)
    low, high = 0, vocab - n_special
    pool = [torch.randint(low, high, (int(torch.randint(64, 513, (1,), generator=g)),), generator=g)
            for _ in range(passages)]
    parts, n = [], 0
    while n < n_real:
        p = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
        parts.append(p)
        n += len(p)
    ids = torch.cat(parts)[:n_real]
    full = torch.full((total,), pad_id, dtype=torch.long)
    full[:n_real] = ids
    mask = torch.zeros(total, dtype=torch.long)
    mask[:n_real] = 1
    return {"input_ids": full[None], "attention_mask": mask[None]}


def cosines(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=dim, eps=1e-12)


def timed(fn, repeat: int, sync):
    times = []
    out = None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def kernel_rows(args, lengths, dtype, sync):
    """One attention layer with a real model's head layout on random q/k/v: dense SDPA vs sparse."""
    from x2i_core.mllm.critiprefill import CritiPrefillConfig
    from x2i_core.ops.sparse_prefill import PrefillStats, sparse_attention

    s = SHAPES[args.kernel_shape]
    H, Hkv = s["num_attention_heads"], s["num_key_value_heads"]
    D = s["hidden_size"] // H
    cfg = CritiPrefillConfig(mode="on", segment=args.segment, block=args.block, budget=args.budget,
                             local=args.local, probes=args.probes, dense_layers=0)
    rows = []
    for S in lengths:
        g = torch.Generator(device=args.device).manual_seed(0)
        q = torch.randn(1, H, S, D, generator=g, device=args.device, dtype=dtype)
        k = torch.randn(1, Hkv, S, D, generator=g, device=args.device, dtype=dtype)
        v = torch.randn(1, Hkv, S, D, generator=g, device=args.device, dtype=dtype)

        def dense(q=q, k=k, v=v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        dense()
        sparse_attention(q, k, v, None, D ** -0.5, cfg)  # warm-up
        st = PrefillStats()
        t_d = t_s = float("inf")
        c_d = c_s = float("inf")
        for _ in range(max(1, args.repeat)):  # interleaved; the minimum counts
            c0 = time.process_time()
            t_d = min(t_d, timed(dense, 1, sync)[1])
            c_d = min(c_d, time.process_time() - c0)
            st = PrefillStats()
            c0 = time.process_time()
            t_s = min(t_s, timed(lambda q=q, k=k, v=v, st=st: sparse_attention(q, k, v, None, D ** -0.5, cfg, stats=st),
                                 1, sync)[1])
            c_s = min(c_s, time.process_time() - c0)
        # FLOP split of that model's prefill per layer: linear 2*S*params, attention 2*S^2*H*D (causal)
        hid, ffn = s["hidden_size"], s["intermediate_size"]
        params = 2 * hid * hid + 2 * hid * Hkv * D + 3 * hid * ffn
        attn_fl = 2.0 * S * S * H * D
        frac = attn_fl / (attn_fl + 2.0 * S * params)
        ratio = t_d / t_s
        projected = 1.0 / ((1 - frac) + frac / ratio)
        row = {"length": S, "heads": f"{H}/{Hkv}x{D}", "dense_attn_s": t_d, "sparse_attn_s": t_s,
               "cpu_speedup": c_d / c_s,
               "attn_speedup": ratio, "attn_flop_share": frac, "projected_prefill_speedup": projected,
               "kept_fraction": st.kept_fraction}
        rows.append(row)
        print(f"  kernel {args.kernel_shape} heads {H}/{Hkv}x{D}  S={S:6d}  dense {t_d:7.3f}s  sparse {t_s:7.3f}s  "
              f"x{ratio:.2f} (CPU-time x{c_d / c_s:.2f})  (attention = {100 * frac:.0f}% of {args.kernel_shape} "
              f"prefill FLOPs -> projected "
              f"whole-prefill x{projected:.2f})", flush=True)
        del q, k, v
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the shape's decoder depth")
    ap.add_argument("--lengths", default="8192,16384,32768", help="padded token counts, comma separated")
    ap.add_argument("--pad-ratio", type=float, default=1.3, help="padded / real tokens (1 = no padding)")
    ap.add_argument("--attention", default="peaked", choices=["peaked", "random"])
    ap.add_argument("--peak", type=float, default=1.5, help="peaked: q/k scale")
    ap.add_argument("--far", type=float, default=2.0, help="peaked: gain of the low-frequency RoPE rows")
    ap.add_argument("--noise", type=float, default=0.5, help="peaked: q = k + noise x random")
    ap.add_argument("--passages", type=int, default=16, help="distinct passages in the document")
    ap.add_argument("--budgets", default="2048,4096", help="sparse budgets (tokens), comma separated")
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--local", type=int, default=512)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--dense-layers", type=int, default=None, help="default: 1 for --shape cpu, else 2")
    ap.add_argument("--repeat", type=int, default=2,
                    help="interleaved rounds (dense, exact, sparse...) per length; the minimum time counts")
    ap.add_argument("--repeat-long", type=int, default=1, help="rounds for lengths of 32K and more")
    ap.add_argument("--no-exact", action="store_true", help="skip the budget=None run")
    ap.add_argument("--no-alignnet", action="store_true")
    ap.add_argument("--kernel", action="store_true", help="also time one attention layer with --kernel-shape heads")
    ap.add_argument("--kernel-shape", default="3b", choices=sorted(SHAPES))
    ap.add_argument("--kernel-lengths", default=None, help="default: --lengths on cuda, 8192,16384 on cpu")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def _timed(paths, run, rounds: int, sync):
    """Every path ``rounds`` times, interleaved (a load change hits every path alike) -> wall times, CPU times,
    last outputs and sparse stats per path name."""
    times = {name: [] for name, _ in paths}
    cpu_times = {name: [] for name, _ in paths}
    outs, stats = {}, {}
    for _ in range(max(1, rounds)):
        for name, cfg in paths:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            h, st = run(cfg)
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            outs[name] = h
            stats[name] = st
    return times, cpu_times, outs, stats


def _budget_row(S, n_real, b, times, cpu_times, sparse, dense, st, exact_diff, mask, net_out) -> dict:
    """One result row: a sparse budget against dense (and exact) at length ``S``; ``net_out`` = (align, pooled
    and sequence of the dense states) or None."""
    name = f"sparse{b}"
    t_dense, t_sparse = min(times["dense"]), min(times[name])
    t_exact = min(times["exact"]) if "exact" in times else None
    last = cosines(sparse[0, -1], dense[0, -1])
    upd = cosines((sparse[0, -1] - sparse[0, 0]).flatten(), (dense[0, -1] - dense[0, 0]).flatten(), dim=0)
    cpu = {k: min(cpu_times[k]) for k in ("dense", "exact", name) if k in cpu_times}
    row = {"length": S, "real_tokens": n_real, "budget": b, "dense_s": t_dense, "exact_s": t_exact,
           "sparse_s": t_sparse, "times": {k: times[k] for k in ("dense", "exact", name) if k in times},
           "cpu_times": {k: cpu_times[k] for k in ("dense", "exact", name) if k in cpu_times},
           "cpu_speedup_vs_dense": cpu["dense"] / cpu[name],
           "cpu_speedup_vs_exact": (cpu["exact"] / cpu[name]) if "exact" in cpu else None,
           "speedup_vs_dense": t_dense / t_sparse,
           "speedup_vs_exact": (t_exact / t_sparse) if t_exact else None,
           "exact_max_abs_diff": exact_diff, "kept_fraction": st.kept_fraction,
           "hidden_last_cos_mean": last.mean().item(), "hidden_last_cos_min": last.min().item(),
           "hidden_last_cos_real_mean": last[mask].mean().item(),
           "hidden_last_cos_pad_mean": last[~mask].mean().item() if (~mask).any() else None,
           "hidden_update_cos": upd.item(), "loadavg": os.getloadavg()[0]}
    if net_out is not None:
        align, pd, sd = net_out
        ps, ss = align(sparse)
        tok_cos = cosines(ss[0], sd[0])
        row.update(alignnet_seq_cos_mean=tok_cos.mean().item(), alignnet_seq_cos_min=tok_cos.min().item(),
                   alignnet_seq_cos_global=cosines(ss.flatten(), sd.flatten(), dim=0).item(),
                   alignnet_pooled_cos=cosines(ps[0], pd[0], dim=0).item())
    return row


def _print_row(row: dict, cuda: bool, with_net: bool) -> None:
    t_exact = row["exact_s"]
    print(f"S={row['length']:6d} (real {row['real_tokens']:6d}) budget {row['budget']:5d}  dense {row['dense_s']:7.2f}s  "
          + (f"exact {t_exact:7.2f}s (max|diff| {row['exact_max_abs_diff']:.1e})  " if t_exact else "")
          + f"sparse {row['sparse_s']:7.2f}s  x{row['speedup_vs_dense']:.2f} vs dense"
          + (f" (x{row['speedup_vs_exact']:.2f} vs exact)" if t_exact else "")
          + (f" | CPU-time x{row['cpu_speedup_vs_dense']:.2f} vs dense"
             + (f" x{row['cpu_speedup_vs_exact']:.2f} vs exact" if t_exact else "") if not cuda else "")
          + f"  kept {100 * row['kept_fraction']:.1f}%  cos last-layer {row['hidden_last_cos_mean']:.5f} "
            f"(real {row['hidden_last_cos_real_mean']:.5f}, min {row['hidden_last_cos_min']:.4f}) "
            f"update {row['hidden_update_cos']:.5f}"
          + (f"  AlignNet seq {row['alignnet_seq_cos_mean']:.5f} (min {row['alignnet_seq_cos_min']:.4f}) "
             f"pooled {row['alignnet_pooled_cos']:.6f}" if with_net else ""), flush=True)


def _setup(args):
    """Resolved settings and the results header (printed)."""
    import transformers

    cuda = args.device.startswith("cuda")
    shape = args.shape or ("3b" if cuda else "cpu")
    from x2i_core.mllm.chat import resolve_dtype

    dtype = resolve_dtype(args.dtype or ("bf16" if cuda else "fp32"), torch.device(args.device))
    dense_layers = args.dense_layers if args.dense_layers is not None else (1 if shape == "cpu" else 2)
    budgets = [int(x) for x in args.budgets.split(",") if x]
    args.budget = budgets[0]  # for the kernel rows
    results = {"device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__, "shape": shape,
               "shape_dims": SHAPES[shape], "layers": args.layers or SHAPES[shape]["num_hidden_layers"],
               "dtype": str(dtype), "attention": args.attention, "pad_ratio": args.pad_ratio,
               "structure": dict(peak=args.peak, far=args.far, noise=args.noise, passages=args.passages),
               "config": dict(budgets=budgets, segment=args.segment, block=args.block, local=args.local,
                              probes=args.probes, dense_layers=dense_layers),
               "loadavg_start": os.getloadavg()[0], "rows": []}
    print(f"device {args.device} ({results['gpu'] or results['cpu']}, {results['threads']} threads), {dtype}, "
          f"shape '{shape}' {SHAPES[shape]} layers {results['layers']}, attention '{args.attention}', "
          f"budgets {budgets} segment {args.segment} block {args.block} local {args.local} probes {args.probes} "
          f"dense_layers {dense_layers}, right padding x{args.pad_ratio}, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    return cuda, shape, dtype, dense_layers, budgets, results


def main() -> None:
    args = parse_args()
    from x2i_core.mllm.critiprefill import CritiPrefillConfig, sparse_prefill
    from x2i_core.tiny import QWEN_SPECIAL_TOKENS, build_alignnet

    cuda, shape, dtype, dense_layers, budgets, results = _setup(args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    enc, tok, pad_id = build_encoder(shape, args.attention, args.device, dtype, layers=args.layers, peak=args.peak,
                                     far=args.far, noise=args.noise)
    net = None
    if not args.no_alignnet:
        net = build_alignnet(channels=enc.channels, hidden=enc.hidden_size).to(args.device, dtype)
    sparse_cfgs = {b: CritiPrefillConfig(mode="on", segment=args.segment, block=args.block, budget=b, local=args.local,
                                         probes=args.probes, dense_layers=dense_layers) for b in budgets}
    exact_cfg = CritiPrefillConfig(mode="on", segment=args.segment, block=args.block, budget=None,
                                   dense_layers=dense_layers)
    n_special = len(QWEN_SPECIAL_TOKENS)
    state = {}

    def run(cfg):
        if cfg is None:
            return enc.forward_hidden(state["batch"]), None
        with sparse_prefill(enc, cfg) as st:
            return enc.forward_hidden(state["batch"]), st

    def align(h):
        with torch.inference_mode():
            pooled, seq = net(h.to(next(net.parameters()).dtype))
        return pooled.float(), seq.float()

    def batch_for(S):
        return make_document(int(S / args.pad_ratio), S, len(tok), pad_id, n_special, passages=args.passages)

    state["batch"] = batch_for(1024)  # warm-up (allocator, kernels) on a short input through every path
    for cfg in [None, exact_cfg, *sparse_cfgs.values()]:
        run(cfg)
    for S in [int(x) for x in args.lengths.split(",") if x]:
        state["batch"] = batch = batch_for(S)
        paths = [("dense", None)] + ([] if args.no_exact else [("exact", exact_cfg)])
        paths += [(f"sparse{b}", c) for b, c in sparse_cfgs.items()]
        times, cpu_times, outs, stats = _timed(paths, run, args.repeat_long if S >= 32768 else args.repeat, sync)
        dense = outs.pop("dense")
        exact_diff = (outs.pop("exact").float() - dense.float()).abs().max().item() if "exact" in outs else None
        net_out = (align, *align(dense)) if net is not None else None
        mask = batch["attention_mask"][0].bool().to(dense.device)
        for b in budgets:
            row = _budget_row(S, int(batch["attention_mask"].sum()), b, times, cpu_times, outs.pop(f"sparse{b}"),
                              dense, stats[f"sparse{b}"], exact_diff, mask, net_out)
            results["rows"].append(row)
            _print_row(row, cuda, net is not None)
        del dense, net_out
    if args.kernel:
        kl = args.kernel_lengths or (args.lengths if cuda else "8192,16384")
        results["kernel"] = kernel_rows(args, [int(x) for x in kl.split(",") if x], dtype, sync)
    results["loadavg_end"] = os.getloadavg()[0]
    print(f"load average at the end {results['loadavg_end']:.2f} (other processes on the machine skew CPU timings)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
