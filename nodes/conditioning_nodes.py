"""Conditioning helpers: blending X2I conditioning with other FLUX conditioning (stock T5 + CLIP, another
X2I prompt) of the same FLUX model."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from .common import CATEGORY, NodeError, check_finite, search_aliases

BLEND = "X2I Blend Conditioning"


def _entries(name: str, conditioning) -> list:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise NodeError(f"{BLEND}: '{name}' is empty; expected a FLUX CONDITIONING (X2I AlignNet Project, "
                        "CLIP Text Encode Flux, ...)")
    for i, item in enumerate(conditioning):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], torch.Tensor)
                and item[0].dim() == 3 and isinstance(item[1], dict)):
            raise NodeError(f"{BLEND}: '{name}' entry {i + 1} is not a [tokens, options] pair with tokens "
                            "[batch, length, width]; expected a FLUX CONDITIONING")
    return list(conditioning)


def _widths(entries: list) -> tuple[int, int | None]:
    seq, extra = entries[0]
    pooled = extra.get("pooled_output")
    return seq.shape[-1], (pooled.shape[-1] if isinstance(pooled, torch.Tensor) else None)


def blend(x2i, other, x2i_weight: float) -> list:
    """The weighted blend of two conditionings' predictions: every entry keeps its own tokens (any length),
    with its ``strength`` scaled by ``x2i_weight`` (X2I) or ``1 - x2i_weight`` (other). ComfyUI's sampler
    averages the conditionings' model outputs weighted by strength, so the step's prediction is
    ``w * pred(x2i) + (1 - w) * pred(other)``. A side with weight 0 is dropped (nothing to evaluate)."""
    a, b = _entries("x2i", x2i), _entries("other", other)
    (wa, pa), (wb, pb) = _widths(a), _widths(b)
    if wa != wb or (pa is not None and pb is not None and pa != pb):
        raise NodeError(f"{BLEND}: 'x2i' has token width {wa} and pooled width {pa}, 'other' has {wb} and {pb}; "
                        "both must be conditioning for the same FLUX model (tokens 4096, pooled 768)")
    w = float(x2i_weight)
    if not 0.0 <= w <= 1.0:
        raise NodeError(f"{BLEND}: x2i_weight must be between 0 and 1, got {w}")
    out = []
    for entries, weight in ((a, w), (b, 1.0 - w)):
        if weight == 0.0:
            continue
        for seq, extra in entries:
            opts = dict(extra)
            opts["strength"] = float(extra.get("strength", 1.0)) * weight
            out.append([seq, opts])
    return out


class X2IBlendConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IBlendConditioning", **search_aliases("X2IBlendConditioning"),
            display_name=BLEND,
            category=CATEGORY,
            description="Blend X2I conditioning with other conditioning of the same FLUX (stock CLIP Text Encode "
                        "Flux, another X2I prompt): each keeps its own tokens, any length, and the sampler mixes "
                        "their predictions by weight. Costs one FLUX evaluation per side and step (ComfyUI "
                        "batches them when the lengths allow). To let FLUX attend to both token sets at once "
                        "instead, use the stock Conditioning (Concat).",
            inputs=[
                io.Conditioning.Input("x2i", tooltip="X2I conditioning (X2I AlignNet Project)."),
                io.Conditioning.Input("other", tooltip="Conditioning for the same FLUX, e.g. CLIP Text Encode Flux "
                                                       "(T5-XXL + CLIP-L); its length may differ from X2I's."),
                io.Float.Input("x2i_weight", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the X2I prediction: 1 = X2I only, 0 = the other only."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, x2i, other, x2i_weight=0.5) -> io.NodeOutput:
        check_finite(BLEND, x2i_weight=x2i_weight)
        return io.NodeOutput(blend(x2i, other, x2i_weight))


NODES = [X2IBlendConditioning]
