"""Block-sparse causal prefill attention (the CritiPrefill idea, arXiv 2409.12490), as plain tensor ops.

An X2I encode is a prefill that keeps the hidden state of every token in every layer, so
:func:`sparse_attention` returns the whole ``[B, S, H, D]`` attention output of a layer, not only the last
token's.  Per call (causal self-attention):

* queries are grouped in segments of ``segment`` tokens, keys / values in blocks of ``block`` tokens
  (``segment`` a multiple of ``block``);
* a segment sees ``budget`` key tokens: its own (diagonal) blocks, ``local`` tokens of the blocks right before
  it, ``sink`` block(s) starting at the row's first real key, and the rest of the budget filled, per batch row
  and KV head, with the earlier blocks of highest criticality; every other block of that segment is skipped;
* criticality: ``probes`` evenly spaced queries of the segment (its last one included) are scored against every
  key of the segment's causal range; per probe the logits are max-pooled per block and soft-maxed over the
  blocks, and a block scores the largest of these over the probes and the query heads of its KV group (GQA).
  The probes cost ``probes / (2 * segment)`` of the dense FLOPs (1.6 % at 16 / 512);
* the kept attention is two fused-kernel calls, the gathered earlier blocks (no causal mask) and the
  segment's own keys (square, causal), merged by log-sum-exp (:func:`attention_lse`, :func:`merge_lse`);
* causality and padding are exact: a masked key never gets weight, a query with no real key gets 0 as dense
  SDPA gives; segments whose causal range fits in the budget (and ``dense=True``) run plain causal attention.

The settings come as any object with the :class:`SparseLayout` fields (``CritiPrefillConfig`` in
:mod:`x2i_core.mllm.critiprefill`, which also plugs this into transformers).  Only torch is imported here.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F

_ELEMS = 1 << 26  # rough cap on the elements of one group's score / mask tensors
_NO_PAD = 1 << 62  # "no masked key" for first_masked_key


class SparseLayout(Protocol):
    """The settings :func:`sparse_attention` reads (see ``CritiPrefillConfig`` for their meaning)."""

    @property
    def segment(self) -> int: ...
    @property
    def block(self) -> int: ...
    @property
    def budget(self) -> int | None: ...
    @property
    def local_blocks(self) -> int: ...
    @property
    def sink(self) -> int: ...
    @property
    def probes(self) -> int: ...
    @property
    def gather_all(self) -> bool: ...


class KeyPadding(Protocol):
    """Something that knows (and may cache) the first masked key position, capped at ``length``."""

    def first_pad(self, length: int) -> int: ...


def first_masked_key(valid: torch.Tensor | None) -> int:
    """Smallest position of a masked key over the batch of ``valid [B, S]`` (a huge number when none)."""
    if valid is None:
        return _NO_PAD
    bad = (~valid).any(0).nonzero()
    return int(bad[0]) if bad.numel() else _NO_PAD


@dataclasses.dataclass
class PrefillStats:
    """What sparse attention did, counted per decoder-layer call (filled by :func:`sparse_attention` and
    by the transformers hook that calls it)."""

    sparse_layers: int = 0      # layer calls that skipped blocks
    dense_layers: int = 0       # layer calls on the sparse path's input that ran dense (early layers / fits budget)
    delegated: int = 0          # layer calls handed to the original attention (short input, cache, ...)
    pairs_kept: int = 0         # query x key pairs computed by the sparse layer calls ...
    pairs_dense: int = 0        # ... and what dense causal attention computes for them

    @property
    def kept_fraction(self) -> float:
        return self.pairs_kept / self.pairs_dense if self.pairs_dense else 1.0

    def summary(self) -> str:
        return (f"sparse prefill: {self.sparse_layers} sparse / {self.dense_layers} dense / {self.delegated} original "
                f"layer calls; sparse layers computed {100 * self.kept_fraction:.1f}% of the causal attention pairs")


def _first_sparse_segment(cfg: SparseLayout, nseg: int, dense: bool) -> int:
    """The first segment that skips blocks: segments whose causal range holds more blocks than the budget."""
    if dense or (cfg.budget is None and not cfg.gather_all):
        return nseg
    if cfg.gather_all:
        return min(1, nseg)
    m = cfg.segment // cfg.block
    return min(nseg, max(0, cfg.budget // cfg.block // m))  # (i + 1) * m > budget blocks <=> i >= budget_blocks // m


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                     scale: float, cfg: SparseLayout, *, dense: bool = False, stats: PrefillStats | None = None,
                     key_mask: KeyPadding | None = None) -> torch.Tensor:
    """Causal prefill attention with CritiPrefill block skipping.

    ``query`` ``[B, H, S, D]``, ``key`` / ``value`` ``[B, Hkv, S, D]`` (``H`` a multiple of ``Hkv``), ``valid``
    ``[B, S]`` bool (True = real key) or None.  Returns ``[B, S, H, D]`` (the layout attention interfaces
    return).  ``dense=True`` or ``budget=None`` (without ``gather_all``) computes plain causal attention.
    ``key_mask``: gives the first masked key position (cached across layers); else it is read off ``valid``.
    """
    B, H, S, D = query.shape
    if H % key.shape[1]:
        raise ValueError(f"{H} query heads do not group over {key.shape[1]} key/value heads")
    Sq = cfg.segment
    nseg = -(-S // Sq)
    first_pad = key_mask.first_pad(S) if key_mask is not None else min(first_masked_key(valid), S)
    i0 = _first_sparse_segment(cfg, nseg, dense)
    Qd = min(S, i0 * Sq)
    out = query.new_empty(B, nseg * Sq if i0 < nseg else S, H, D)
    if Qd:  # dense part: rows [0, Qd) against keys [0, Qd)
        _dense_rows(query, key, value, valid, scale, out, Qd, first_pad, Sq)
    if i0 >= nseg:
        if stats is not None:
            stats.dense_layers += 1
        return out
    if stats is not None:
        stats.sparse_layers += 1
        stats.pairs_dense += S * (S + 1) // 2 * B * H
        stats.pairs_kept += Qd * (Qd + 1) // 2 * B * H
    sp = _SparseSegments(query, key, value, valid, scale, cfg, first_pad)
    for ia in range(i0, nseg, sp.group_size(nseg - i0)):
        sp.run_group(ia, min(nseg, ia + sp.group_size(nseg - i0)), out, stats)
    return out[:, :S]


class _SparseSegments:
    """The sparse part of :func:`sparse_attention`: segments ``i0 .. nseg-1`` on a sequence padded to
    ``nseg * Sq`` (tail keys are in every real query's future, so causality alone keeps them out), run in
    groups of segments: criticality of the earlier blocks, then attention over the picked + local blocks and
    the segment's own keys, merged by log-sum-exp."""

    def __init__(self, query, key, value, valid, scale, cfg: SparseLayout, first_pad: int):
        B, H, S, D = query.shape
        Hkv = key.shape[1]
        Sq, Bk = cfg.segment, cfg.block
        self.B, self.H, self.Hkv, self.G, self.S, self.D = B, H, Hkv, H // Hkv, S, D
        self.Sq, self.Bk, self.m = Sq, Bk, Sq // Bk
        self.scale, self.valid, self.first_pad, self.dev = scale, valid, first_pad, query.device
        self.Sp = -(-S // Sq) * Sq
        q, k, v = query, key, value
        if self.Sp != S:
            pad = (0, 0, 0, self.Sp - S)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        self.q, self.k, self.v = q, k, v
        self.nblk, self.BH = self.Sp // Bk, B * Hkv
        kc = k.contiguous()
        self.k_blocks = kc.view(self.BH * self.nblk, Bk, D)
        self.v_blocks = v.contiguous().view(self.BH * self.nblk, Bk, D)
        self.kt = kc.view(self.BH, self.Sp, D)  # for the probes
        self.nl, self.ns = cfg.local_blocks, cfg.sink
        nb = self.nblk if cfg.budget is None else cfg.budget // Bk
        self.nf = max(0, nb - self.nl - self.m)   # far picks per segment (sink included)
        self.valid_p = self.valid_blocks = None
        if valid is not None:
            self.valid_p = valid if self.Sp == S else F.pad(valid, (0, self.Sp - S), value=True)
            self.sink_blk = ((valid.to(torch.int8).argmax(-1)) // Bk).repeat_interleave(Hkv)  # [BH]
            self.valid_blocks = self.valid_p.repeat_interleave(Hkv, 0).reshape(self.BH * self.nblk, Bk)
        else:
            self.sink_blk = torch.zeros(self.BH, dtype=torch.long, device=self.dev)
        self.r = min(cfg.probes, Sq)
        self.tpos = (torch.arange(1, self.r + 1, device=self.dev) * Sq) // self.r - 1  # probe offsets, last included
        self.blk_ids = torch.arange(self.nblk, device=self.dev)
        self.causal_sq = torch.ones(Sq, Sq, dtype=torch.bool, device=self.dev).tril_()

    def group_size(self, nsparse: int) -> int:
        per_seg = self.B * self.H * max(self.r * self.Sp, self.Sq * (self.nf + self.nl + self.m) * self.Bk)
        return max(1, min(nsparse, 8, _ELEMS // max(per_seg, 1)))

    def run_group(self, ia: int, ib: int, out: torch.Tensor, stats: PrefillStats | None) -> None:
        segs = torch.arange(ia, ib, device=self.dev)
        fe = segs * self.m - self.nl                     # far candidates are blocks [0, fe)
        fe_last = int((ib - 1) * self.m - self.nl)
        kf = max(0, min(self.nf, fe_last))               # far picks this group (nf unless gather_all)
        qe = min(ib * self.Sq, self.Sp)
        picks = pick_ok = None
        if kf:
            picks, pick_ok = self.critical_blocks(segs, fe, fe_last, kf, qe)
        o = self.attend(ia, ib, fe, picks, pick_ok, qe)
        out[:, ia * self.Sq: ib * self.Sq] = o.reshape(self.B, (ib - ia) * self.Sq, self.H, self.D)
        if stats is not None:
            self.count_kept(stats, ia, ib, fe, kf)

    def critical_blocks(self, segs, fe, fe_last: int, kf: int, qe: int):
        """Each probe's max logit per block, softmax over the blocks of its causal range, max over the probes
        and the query heads of the KV group; the sink blocks forced in; the top ``kf`` -> (indices, usable)."""
        BH, Hkv, G, r, Bk, n = self.BH, self.Hkv, self.G, self.r, self.Bk, len(segs)
        ppos = (segs[:, None] * self.Sq + self.tpos[None]).clamp_max(self.S - 1)       # [n, r]
        qp = self.q[:, :, ppos.reshape(-1)].reshape(self.B, Hkv, G, n, r, self.D)
        qp = qp.permute(0, 1, 3, 2, 4, 5).reshape(BH, n * G * r, self.D)
        logits = torch.bmm(qp, self.kt[:, :qe].transpose(-1, -2)).view(BH, n, G * r, qe)
        if self.valid is not None and qe > self.first_pad:
            vk = self.valid_p[:, :qe].repeat_interleave(Hkv, 0)                        # [BH, qe]
            logits.masked_fill_(~vk[:, None, None, :], float("-inf"))
        nbq = qe // Bk
        blk = logits.view(BH, n, G * r, nbq, Bk).amax(-1).float().mul_(self.scale)     # [BH, n, G*r, nbq]
        del logits
        # blocks that start after the probe are its future (its own block counts whole: a proxy)
        future = self.blk_ids[None, None, :nbq] * Bk > ppos.repeat(1, G)[:, :, None]   # [n, G*r, nbq]
        blk.masked_fill_(future[None], float("-inf"))
        prob = torch.softmax(blk, dim=-1).nan_to_num_(0.0)
        nfb = max(fe_last, 1)
        crit = prob[..., :nfb].amax(dim=2)                                              # [BH, n, nfb]
        del blk, prob
        cand = self.blk_ids[None, :nfb] < fe[:, None]                                   # [n, nfb]
        crit = crit.masked_fill(~cand[None], float("-inf"))
        for j in range(self.ns):
            sb = (self.sink_blk + j)[:, None].expand(BH, n)                              # [BH, n]
            ok = sb < fe[None, :]
            idx = sb.clamp_max(nfb - 1)[..., None]
            crit.scatter_(2, idx, torch.where(ok, float("inf"), crit.gather(2, idx).squeeze(-1))[..., None])
        top = torch.topk(crit, kf, dim=-1)
        return top.indices, top.values > float("-inf")                                  # [BH, n, kf]

    def attend(self, ia: int, ib: int, fe, picks, pick_ok, qe: int) -> torch.Tensor:
        """The blocks before the segments (critical picks + local) without causal mask, the segments' own keys
        as square causal problems, merged by log-sum-exp -> ``[B, n, Sq, H, D]``."""
        BH, n, nl = self.BH, ib - ia, self.nl
        far_idx = fe[:, None] + torch.arange(nl, device=self.dev)[None]                 # [n, nl] local blocks
        far_ok = (far_idx >= 0)[None].expand(BH, n, nl)
        far_idx = far_idx.clamp_min(0)[None].expand(BH, n, nl)
        if picks is not None:
            far_idx = torch.cat([picks, far_idx], dim=-1)                               # [BH, n, kf + nl]
            far_ok = torch.cat([pick_ok, far_ok], dim=-1)
        padded = self.valid is not None and qe > self.first_pad
        qs = self.q[:, :, ia * self.Sq: ib * self.Sq]
        o = lse1 = None
        if far_idx.shape[-1]:
            o, lse1 = self._attend_far(qs, n, far_idx, far_ok, padded)
        o2, lse2 = self._attend_own(qs, ia, ib, padded)
        return o2 if o is None else merge_lse(o, lse1, o2, lse2)

    def _attend_far(self, qs, n: int, far_idx, far_ok, padded: bool):
        B, BH, Hkv, G, Sq, D, Bk = self.B, self.BH, self.Hkv, self.G, self.Sq, self.D, self.Bk
        nfar = far_idx.shape[-1]
        Lf = nfar * Bk
        flat = (torch.arange(BH, device=self.dev)[:, None, None] * self.nblk + far_idx).reshape(-1)
        ks = self.k_blocks.index_select(0, flat).view(BH, n, Lf, D)
        vs = self.v_blocks.index_select(0, flat).view(BH, n, Lf, D)
        kok = None
        if padded or not bool(far_ok.all()):
            kok = far_ok[..., None].expand(BH, n, nfar, Bk)
            if padded:
                kok = kok & self.valid_blocks.index_select(0, flat).view(BH, n, nfar, Bk)
            kok = kok.reshape(BH, n, 1, Lf)
        qf = qs.reshape(B, Hkv, G, n, Sq, D).permute(0, 1, 3, 2, 4, 5).reshape(BH, n, G * Sq, D)
        o1, l1 = attention_lse(qf, ks, vs, self.scale, mask=kok)                          # [BH, n, G*Sq, (D)]
        o = o1.reshape(B, Hkv, n, G, Sq, D).permute(0, 2, 4, 1, 3, 5).reshape(B, n, Sq, self.H, D)
        return o, l1.reshape(B, Hkv, n, G, Sq).permute(0, 2, 4, 1, 3).reshape(B, n, Sq, self.H)

    def _attend_own(self, qs, ia: int, ib: int, padded: bool):
        B, H, Hkv, G, Sq, D, n = self.B, self.H, self.Hkv, self.G, self.Sq, self.D, ib - ia
        qd = qs.reshape(B, H, n, Sq, D).transpose(1, 2).reshape(B * n, H, Sq, D)
        kd = self.k[:, :, ia * Sq: ib * Sq].reshape(B, Hkv, n, Sq, D).transpose(1, 2).reshape(B * n, Hkv, Sq, D)
        vd = self.v[:, :, ia * Sq: ib * Sq].reshape(B, Hkv, n, Sq, D).transpose(1, 2).reshape(B * n, Hkv, Sq, D)
        dmask = None
        if padded:
            dvalid = self.valid_p[:, ia * Sq: ib * Sq].reshape(B * n, 1, 1, Sq)
            dmask = self.causal_sq[None, None] & dvalid                                   # [B*n, 1, Sq, Sq]
        if G > 1:
            kd, vd = kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1)
        o2, l2 = attention_lse(qd, kd, vd, self.scale, causal=dmask is None, mask=dmask)  # [B*n, H, Sq, (D)]
        return o2.reshape(B, n, H, Sq, D).transpose(2, 3), l2.reshape(B, n, H, Sq).transpose(2, 3)

    def count_kept(self, stats: PrefillStats, ia: int, ib: int, fe, kf: int) -> None:
        Sq, S, Bk = self.Sq, self.S, self.Bk
        for i in range(ia, ib):
            lo, hi = i * Sq, min(S, (i + 1) * Sq)
            rows_i = hi - lo
            if rows_i <= 0:
                continue
            near = rows_i * (lo - max(0, int(fe[i - ia]) * Bk)) + rows_i * (rows_i + 1) // 2
            dense_i = rows_i * (lo + hi + 1) // 2
            stats.pairs_kept += min(dense_i, rows_i * kf * Bk + near) * self.B * self.H


_LSE_OK: dict[tuple, str] = {}


def _lse_math(q, k, v, scale, causal=False, mask=None):
    """Reference attention with log-sum-exp, in row chunks (any device / dtype)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    outs, lses = [], []
    step = max(1, _ELEMS // max(q.shape[:-2].numel() * Lk, 1))
    for a in range(0, Lq, step):
        b = min(Lq, a + step)
        s = torch.matmul(q[..., a:b, :].float(), k.float().transpose(-1, -2)).mul_(scale)
        if causal:
            s.masked_fill_(torch.arange(Lk, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None],
                           float("-inf"))
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., a:b, :]
            s = s.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
        outs.append(torch.matmul(p, v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _lse_kernel(q, k, v, scale, causal=False, mask=None):
    dev = q.device.type
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    if dev == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                            scale=scale)
        return o, lse
    if dev == "cuda" and bias is None and q.dtype in (torch.float16, torch.bfloat16):
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return r[0], r[1]
    if dev == "cuda":
        if bias is not None:
            bias = bias.expand(*q.shape[:-1], k.shape[-2])
        r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
        return r[0], r[1][..., : q.shape[-2]]
    raise NotImplementedError(dev)


def _lse_check(device, dtype, masked: bool) -> str:
    """'kernel' when the fused op agrees with :func:`_lse_math` on this device/dtype (checked once)."""
    key = (device.type, dtype, masked)
    if key not in _LSE_OK:
        mode = "math"
        try:
            g = torch.Generator(device=device).manual_seed(0)
            tq, tk, tv = (torch.randn(2, 3, 48, 64, generator=g, device=device, dtype=dtype) for _ in range(3))
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            cases = [(False, None), (True, None)]
            if masked:
                m = torch.rand(2, 3, 1, 48, generator=g, device=device) > 0.3
                m[0, 0] = False  # a fully masked row
                m2 = torch.ones(48, 48, dtype=torch.bool, device=device).tril() & m[:, :1]
                cases = [(False, m), (False, m2)]
            for causal, mask in cases:
                o1, l1 = _lse_kernel(tq, tk, tv, 0.2, causal, mask)
                o2, l2 = _lse_math(tq, tk, tv, 0.2, causal, mask)
                if mask is not None:
                    l1 = _fix_masked_lse(l1.float(), mask)
                fin = torch.isfinite(l2)
                if not (torch.allclose(o1.float(), o2.float(), atol=tol, rtol=tol)
                        and torch.equal(fin, torch.isfinite(l1))
                        and torch.allclose(l1[fin].float(), l2[fin].float(), atol=tol, rtol=tol)):
                    raise ValueError("mismatch")
            mode = "kernel"
        except Exception:  # noqa: BLE001 - a private op missing or different: use the maths
            mode = "math"
        _LSE_OK[key] = mode
    return _LSE_OK[key]


def _fix_masked_lse(lse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows without any unmasked key: log-sum-exp -inf (fused kernels report 0 there)."""
    empty = ~mask.any(-1)                                    # broadcastable to lse
    return lse.masked_fill(empty, float("-inf"))


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False,
                  mask: torch.Tensor | None = None):
    """Attention of ``q [N, h, Lq, D]`` over ``k, v [N, h, Lk, D]`` and its log-sum-exp ``[N, h, Lq]`` (fp32).

    ``causal``: square, upper-left; ``mask``: bool, True = attend, broadcastable to ``[N, h, Lq, Lk]`` (keep
    it small: ``[N, h, 1, Lk]`` or ``[N, 1, Lq, Lk]``).  A row with no key gets output 0 and log-sum-exp -inf.
    Uses PyTorch's fused kernels where they return the log-sum-exp (checked once per device/dtype against
    the reference maths), else :func:`_lse_math`."""
    if _lse_check(q.device, q.dtype, mask is not None) == "kernel":
        try:
            o, lse = _lse_kernel(q.contiguous(), k.contiguous(), v.contiguous(), scale, causal, mask)
            lse = lse.float()
            if mask is not None:
                lse = _fix_masked_lse(lse, mask)
            return o, lse
        except Exception:  # noqa: BLE001 - e.g. a head size the fused kernel refuses
            pass
    return _lse_math(q, k, v, scale, causal, mask)


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two attention results over disjoint key sets (``o [..., D]``, ``lse [...]``)."""
    mx = torch.maximum(lse1, lse2)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w1 = (lse1 - mx).exp_()
    w2 = (lse2 - mx).exp_()
    den = (w1 + w2).clamp_min_(1e-30)
    o = o1.float() * (w1 / den)[..., None] + o2.float() * (w2 / den)[..., None]
    return o.to(o1.dtype)


def _dense_rows(query, key, value, valid, scale, out, Qd, first_pad, Sq):
    """Rows [0, Qd) of causal attention into ``out[:, :Qd]``.

    Rows before the first masked key: one causal SDPA call.  Later rows: the keys before the first masked
    key (all real: no mask, GQA folded into the rows) merged by log-sum-exp with the rest of their causal
    range (masked, in row chunks; skipped where it holds no real key)."""
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    clean = Qd if valid is None else min(first_pad, Qd)
    if clean:
        o = F.scaled_dot_product_attention(query[:, :, :clean], key[:, :, :clean], value[:, :, :clean],
                                           is_causal=True, scale=scale, enable_gqa=G > 1)
        out[:, :clean] = o.transpose(1, 2)
    if clean == Qd:
        return
    step = max(Sq, (_ELEMS // max(B * H * Qd, 1)) // Sq * Sq)
    for a in range(clean, Qd, step):
        b = min(Qd, a + step)
        R = b - a
        qa = query[:, :, a:b]
        o = lse = None
        if clean:  # keys [0, clean): all real, all in every row's past
            qf = qa.reshape(B, Hkv, G * R, D)
            o1, l1 = attention_lse(qf, key[:, :, :clean], value[:, :, :clean], scale)
            o = o1.reshape(B, H, R, D)
            lse = l1.reshape(B, H, R)
        vb = valid[:, clean:b]
        if bool(vb.any()):  # keys [clean, b): causal and padding
            kpos = torch.arange(clean, b, device=query.device)
            cm = kpos[None, :] <= torch.arange(a, b, device=query.device)[:, None]
            mask = cm[None, None] & vb[:, None, None, :]                              # [B, 1, R, b - clean]
            k2, v2 = key[:, :, clean:b], value[:, :, clean:b]
            if G > 1:
                k2, v2 = k2.repeat_interleave(G, 1), v2.repeat_interleave(G, 1)
            o2, l2 = attention_lse(qa, k2, v2, scale, mask=mask)
            o = o2 if o is None else merge_lse(o, lse, o2, l2)
        elif o is None:
            o = qa.new_zeros(B, H, R, D)
        out[:, a:b] = o.transpose(1, 2)


__all__ = ["KeyPadding", "PrefillStats", "SparseLayout", "attention_lse", "first_masked_key", "merge_lse",
           "sparse_attention"]
