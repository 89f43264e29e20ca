"""CritiPrefill-style sparse prefill for the MLLM's text decoder (idea of arXiv 2409.12490).

X2I encoding is a pure prefill whose output is *every* token's hidden state in
*every* layer, so the sparse attention here produces the full ``[B, S, H, D]``
attention output of each layer (not just the last token's).

How it works, per decoder layer (self-attention, causal):

* Queries are cut into **segments** of ``segment`` tokens, keys/values into
  **blocks** of ``block`` tokens (``segment`` is a multiple of ``block``).
* Each segment attends to ``budget`` key tokens (``budget // block`` blocks):
  always the segment's own (diagonal) blocks, ``local`` tokens of blocks just
  before it, the ``sink`` block(s) holding the first real (unmasked) token of
  the row, and as many of the remaining earlier blocks as the budget allows,
  chosen per (batch row, KV head) by **criticality**.  Everything else of that
  segment x block pair is skipped.
* **Criticality proxy** (segment-wise, max-pooled): ``probes`` representative
  queries of the segment (evenly spaced, its last query included) are scored
  against every key of the segment's causal range; each probe's logits are
  max-pooled per block and soft-maxed over the blocks (so a block scores high
  when it holds the probe's strongest keys *relative to everything else the
  probe sees*, its own local blocks included); a block's criticality is the
  largest of these over the probes and over the query heads that share the KV
  head (GQA).  Selection is per (batch row, KV head).  The probe logits cost
  ``probes / (2 * segment)`` of dense attention's FLOPs (1.6 % at 16 / 512).
  (Measured on the benchmark model, this ranks blocks as well as the probes'
  exact attention mass, and clearly better than block-mean keys.)
* The kept attention is computed as two fused-kernel calls merged by
  log-sum-exp: the gathered earlier blocks (no causal mask needed) and the
  segment's own keys (a square causal problem); masks appear only where padding
  does.
* Causality and padding are exact: a key masked in ``attention_mask`` stays
  masked (it gets no mass in the estimate and no weight in the attention), a
  query whose every key is masked (a left-pad row) gets 0 as dense SDPA does.
* Layers ``< dense_layers`` and inputs shorter than ``min_length`` run dense;
  segments whose causal range already fits in the budget (the first
  ``budget // segment``) also run dense (one causal SDPA call).

It plugs in through transformers' attention interface: the function is
registered as ``"x2i_critiprefill"`` in ``AttentionInterface`` (and a matching
entry in ``AttentionMaskInterface`` that hands the attention the 2-D key
padding mask instead of a ``[B, 1, S, S]`` mask); :func:`sparse_prefill`
switches the *text decoder's* ``config._attn_implementation`` to it for the
duration of a ``with`` block and restores it afterwards.  The vision / audio
towers keep their own attention.  Anything this path does not cover (a KV
cache with new tokens, sliding-window or packed masks, short inputs) is handed
to the model's original attention implementation unchanged.

Usage::

    from x2i_core.mllm.critiprefill import CritiPrefillConfig, sparse_prefill

    with sparse_prefill(encoder, CritiPrefillConfig(budget=4096)) as stats:
        hidden = encoder.forward_hidden(batch)      # or encoder.encode(requests)
    print(stats.summary())

The switch is per model object (not per thread): do not run a dense forward
of the same encoder from another thread while the block is open.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..errors import X2IInputError
from .attention import original_attention, switched, text_configs

NAME = "x2i_critiprefill"
MODES = ("auto", "on", "off")
_ELEMS = 1 << 26  # rough cap on the elements of one group's score / mask tensors


@dataclasses.dataclass(frozen=True)
class CritiPrefillConfig:
    """Sparse-prefill settings.

    mode:         "auto" = sparse only for inputs of at least ``min_length`` tokens; "on" = at any length
                  (still dense in the first ``dense_layers`` layers and where the budget covers everything);
                  "off" = :func:`sparse_prefill` does nothing.
    segment:      query segment, tokens (a multiple of ``block``).
    block:        key/value block, tokens.
    budget:       key tokens each query segment attends to, sink + local + diagonal blocks included (rounded
                  down to whole blocks); ``None`` = every block (equals dense to round-off).
    dense_layers: the first this-many decoder layers always run dense.
    min_length:   "auto" threshold, tokens (padded sequence length).
    local:        tokens of blocks just before a segment that are always kept (besides its own blocks).
    sink:         blocks from the first real token of each row that are always kept (attention sink).
    probes:       representative queries per segment (and query head) for the criticality estimate.
    gather_all:   testing aid - send every segment after the first through the block-gather path even where
                  the budget would keep all of it (with ``budget=None`` it must then equal dense).
    """

    mode: str = "auto"
    segment: int = 512
    block: int = 128
    budget: int | None = 4096
    dense_layers: int = 2
    min_length: int = 4096
    local: int = 512
    sink: int = 1
    probes: int = 16
    gather_all: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise X2IInputError(f"sparse prefill mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name in ("segment", "block", "probes"):
            if int(getattr(self, name)) < 1:
                raise X2IInputError(f"sparse prefill {name} is {getattr(self, name)}; expected at least 1")
        for name in ("dense_layers", "min_length", "local", "sink"):
            if int(getattr(self, name)) < 0:
                raise X2IInputError(f"sparse prefill {name} is {getattr(self, name)}; expected 0 or more")
        if self.segment % self.block:
            raise X2IInputError(f"sparse prefill segment {self.segment} is not a multiple of block {self.block}")
        if self.budget is not None and self.budget // self.block < self.forced_blocks:
            raise X2IInputError(
                f"sparse prefill budget {self.budget} tokens is below what is always kept: sink {self.sink} + local "
                f"{self.local_blocks} + own {self.segment // self.block} blocks of {self.block} = "
                f"{self.forced_blocks * self.block} tokens")

    @property
    def local_blocks(self) -> int:
        return -(-self.local // self.block)

    @property
    def forced_blocks(self) -> int:
        return self.sink + self.local_blocks + self.segment // self.block

    def applies(self, length: int) -> bool:
        """Whether an input of ``length`` tokens takes the sparse path."""
        return self.mode == "on" or (self.mode == "auto" and length >= self.min_length)

    def tag(self) -> tuple:
        """What makes two settings give different encodings (for encode caches)."""
        return (NAME, self.mode, self.segment, self.block, self.budget, self.dense_layers, self.min_length,
                self.local, self.sink, self.probes)

    @classmethod
    def parse(cls, spec: "CritiPrefillConfig | str | dict | None") -> "CritiPrefillConfig":
        """From a config, a dict of fields, or ``"auto"`` / ``"on"`` / ``"off"`` / ``"dense"`` / ``None`` (= off);
        a string may carry fields: ``"auto,budget=2048,segment=256"``."""
        if isinstance(spec, cls):
            return spec
        if spec is None:
            return cls(mode="off")
        if isinstance(spec, dict):
            return cls(**spec)
        if not isinstance(spec, str):
            raise X2IInputError(f"sparse prefill setting {spec!r}; expected a CritiPrefillConfig, dict or string")
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        kwargs: dict[str, Any] = {}
        if parts and "=" not in parts[0]:
            head = parts.pop(0).lower()
            kwargs["mode"] = {"dense": "off", "none": "off", "critiprefill": "auto", "sparse": "on"}.get(head, head)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for p in parts:
            key, _, value = p.partition("=")
            key = key.strip()
            if key not in fields:
                raise X2IInputError(f"sparse prefill option {key!r}; expected one of {', '.join(fields)}")
            value = value.strip()
            if key == "mode":
                kwargs[key] = value
            elif key == "gather_all":
                kwargs[key] = value.lower() in ("1", "true", "yes", "on")
            elif key == "budget" and value.lower() in ("none", "all"):
                kwargs[key] = None
            else:
                try:
                    kwargs[key] = int(value)
                except ValueError:
                    raise X2IInputError(f"sparse prefill option {key}={value!r}; expected an integer") from None
        return cls(**kwargs)


@dataclasses.dataclass
class PrefillStats:
    """What the last ``with sparse_prefill(...)`` block did (counted per decoder-layer call)."""

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


class _KeyMask:
    """What our mask function hands the layers: the 2-D key padding mask (True = real) or None (no padding)."""

    __slots__ = ("valid", "_first_pad")

    def __init__(self, valid: torch.Tensor | None):
        self.valid = valid
        self._first_pad: int | None = None

    def first_pad(self, length: int) -> int:
        """Smallest position of a masked key over the batch (``length`` when none)."""
        if self._first_pad is None:
            if self.valid is None:
                self._first_pad = 1 << 62
            else:
                bad = (~self.valid).any(0).nonzero()
                self._first_pad = int(bad[0]) if bad.numel() else 1 << 62
        return min(self._first_pad, length)


@dataclasses.dataclass
class _State:
    config: CritiPrefillConfig
    original: str
    stats: PrefillStats


_ACTIVE: dict[int, _State] = {}


# -- transformers hooks --------------------------------------------------------------------------------------------
def _mask_fn(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0,
             mask_function=None, attention_mask: torch.Tensor | None = None, config=None, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    state = _ACTIVE.get(id(config))
    q_len = int(cache_position.shape[0])
    ours = (state is not None and mask_function is causal_mask_function and kv_offset == 0 and q_len == kv_length
            and state.config.applies(kv_length))
    if not ours:
        original = state.original if state is not None else "sdpa"
        if original not in ALL_MASK_ATTENTION_FUNCTIONS:
            original = "sdpa" if original != "eager" else "eager"
        return ALL_MASK_ATTENTION_FUNCTIONS[original](
            batch_size=batch_size, cache_position=cache_position, kv_length=kv_length, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, config=config, **kwargs)
    valid = None
    if attention_mask is not None:
        valid = attention_mask[:, :kv_length].to(torch.bool)
        if bool(valid.all()):
            valid = None
    return _KeyMask(valid)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _ACTIVE.get(id(getattr(module, "config", None)))
    if not isinstance(attention_mask, _KeyMask):
        original = state.original if state is not None else "sdpa"
        if state is not None:
            state.stats.delegated += 1
        return original_attention(module, original)(module, query, key, value, attention_mask, scaling=scaling,
                                                     dropout=dropout, **kwargs)
    if state is None:  # our mask but no active context: cannot happen through sparse_prefill
        raise RuntimeError("x2i_critiprefill attention called outside sparse_prefill()")
    if kwargs.get("sliding_window") or not getattr(module, "is_causal", True) or dropout:
        raise RuntimeError("x2i_critiprefill covers causal self-attention without sliding window or dropout")
    cfg = state.config
    layer = getattr(module, "layer_idx", None)
    dense = layer is not None and layer < cfg.dense_layers
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = sparse_attention(query, key, value, attention_mask.valid, scale, cfg, dense=dense, stats=state.stats,
                           key_mask=attention_mask)
    return out, None


def register() -> None:
    """Register the attention and mask functions under ``NAME`` with transformers (idempotent). Done on first
    use (:func:`sparse_prefill`), not at import: importing this module changes nothing in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask_fn)


# -- the attention itself -------------------------------------------------------------------------------------------
def _first_sparse_segment(cfg: CritiPrefillConfig, nseg: int, dense: bool) -> int:
    """The first segment that skips blocks: segments whose causal range holds more blocks than the budget."""
    if dense or (cfg.budget is None and not cfg.gather_all):
        return nseg
    if cfg.gather_all:
        return min(1, nseg)
    m = cfg.segment // cfg.block
    return min(nseg, max(0, cfg.budget // cfg.block // m))  # (i + 1) * m > budget blocks <=> i >= budget_blocks // m


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                     scale: float, cfg: CritiPrefillConfig, *, dense: bool = False, stats: PrefillStats | None = None,
                     key_mask: _KeyMask | None = None) -> torch.Tensor:
    """Causal prefill attention with CritiPrefill block skipping.

    ``query`` ``[B, H, S, D]``, ``key`` / ``value`` ``[B, Hkv, S, D]`` (``H`` a multiple of ``Hkv``), ``valid``
    ``[B, S]`` bool (True = real key) or None.  Returns ``[B, S, H, D]`` (the layout attention interfaces
    return).  ``dense=True`` or ``budget=None`` (without ``gather_all``) computes plain causal attention.
    """
    B, H, S, D = query.shape
    if H % key.shape[1]:
        raise ValueError(f"{H} query heads do not group over {key.shape[1]} key/value heads")
    Sq = cfg.segment
    nseg = -(-S // Sq)
    first_pad = (key_mask if key_mask is not None else _KeyMask(valid)).first_pad(S)
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

    def __init__(self, query, key, value, valid, scale, cfg: CritiPrefillConfig, first_pad: int):
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


# -- the switch -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sparse_prefill(encoder, config: CritiPrefillConfig | str | dict | None = None,
                   **overrides) -> Iterator[PrefillStats]:
    """Run the encoder's text decoder with CritiPrefill sparse attention inside the ``with`` block.

    ``encoder``: a :class:`~x2i_core.mllm.chat.ChatEncoder` (or anything with ``decoder_layers`` /
    ``model.language_model``).  ``config``: a :class:`CritiPrefillConfig`, a dict of its fields, a string
    (``"auto"``, ``"on"``, ``"off"``, ``"auto,budget=2048"``) or None (= default ``CritiPrefillConfig()``, i.e.
    ``auto``); keyword ``overrides`` replace fields.  Yields a :class:`PrefillStats` that the forward passes
    fill in.  While open, the encoder's ``cache_tag`` carries the setting so encode caches keep dense and
    sparse results apart.
    """
    cfg = CritiPrefillConfig() if config is None else CritiPrefillConfig.parse(config)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    stats = PrefillStats()
    if cfg.mode == "off":
        yield stats
        return
    register()
    configs = text_configs(encoder, "sparse prefill")
    text_cfg = getattr(encoder, "text_config", None)
    if callable(text_cfg):
        tc = text_cfg()
        if getattr(tc, "use_sliding_window", False) and "sliding_attention" in (getattr(tc, "layer_types", None) or ()):
            raise X2IInputError("sparse prefill does not cover sliding-window attention; run this model dense")

    def state_of(prev_impl, prev_state):
        original = prev_state.original if prev_impl == NAME and prev_state is not None else (prev_impl or "eager")
        return _State(cfg, original, stats)

    had_tag = "cache_tag" in getattr(encoder, "__dict__", {})
    old_tag = getattr(encoder, "cache_tag", None)
    try:
        with switched(configs, NAME, _ACTIVE, state_of):
            try:
                encoder.cache_tag = (old_tag, cfg.tag())
            except AttributeError:
                pass
            yield stats
    finally:
        try:
            if had_tag:
                encoder.cache_tag = old_tag
            elif "cache_tag" in getattr(encoder, "__dict__", {}):
                del encoder.cache_tag
        except AttributeError:
            pass


__all__ = ["NAME", "CritiPrefillConfig", "PrefillStats", "sparse_prefill", "sparse_attention", "attention_lse",
           "merge_lse", "register"]
