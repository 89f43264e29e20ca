"""Running an MLLM's text decoder with attention we choose, through transformers' attention interface.

* :func:`text_configs` - the config objects the text decoder's attention reads ``_attn_implementation``
  from (switching them switches only the text decoder, never the vision or audio towers);
* :func:`original_attention` - the attention function a name stands for (``sdpa``, ``eager``, ...);
* :func:`given_mask` - inside the ``with`` block, every text-decoder attention call uses an explicit
  additive mask ``[B, 1, S, S]`` instead of the one transformers would build.  The encoder uses it for
  the pad rows the released AlignNets were trained on (see ``ChatEncoder.forward_left_padded``).

Registration with transformers happens on first use, not at import.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

import torch

from ..errors import X2IInputError

NAME = "x2i_given_mask"
_ACTIVE: dict[int, tuple[torch.Tensor, str]] = {}   # id(text config) -> (mask, the implementation it replaces)
_REGISTERED = False


def text_configs(encoder, purpose: str) -> list:
    """The distinct configs of the text decoder's attention modules (and of the decoder itself)."""
    layers = getattr(encoder, "decoder_layers", None)
    model = getattr(encoder, "model", encoder)
    lm = getattr(model, "language_model", None)
    if layers is None and lm is not None:
        layers = getattr(lm, "layers", None)
    if layers is None:
        raise X2IInputError(f"{getattr(encoder, 'name', type(encoder).__name__)}: no text decoder layers found; "
                            f"{purpose} needs a transformers decoder that uses the attention interface")
    seen: dict[int, Any] = {}
    for obj in [lm, *[getattr(layer, "self_attn", None) for layer in layers]]:
        cfg = getattr(obj, "config", None)
        if cfg is not None:
            seen.setdefault(id(cfg), cfg)
    if not seen:
        raise X2IInputError(f"{purpose}: the text decoder has no config to switch")
    return list(seen.values())


def original_attention(module, name: str):
    """The attention function registered under ``name`` (``eager`` = the module's own eager function)."""
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping[name]


def _no_mask(*args, **kwargs):
    return None  # the layers use the given mask; transformers need not build one


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _ACTIVE.get(id(getattr(module, "config", None)))
    if state is None:
        raise RuntimeError(f"{NAME} attention called outside given_mask()")
    mask, original = state
    if mask.shape[-1] != key.shape[-2] or mask.shape[-2] != query.shape[-2]:
        raise RuntimeError(f"{NAME}: mask {tuple(mask.shape)} does not fit {query.shape[-2]} queries x "
                           f"{key.shape[-2]} keys")
    return original_attention(module, original)(module, query, key, value, mask.to(query.dtype), scaling=scaling,
                                                dropout=dropout, **kwargs)


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _no_mask)
        _REGISTERED = True


@contextlib.contextmanager
def switched(configs: list, name: str, registry: dict[int, Any], state_of: Callable[[str, Any], Any]) -> Iterator[None]:
    """Inside the block each config's ``_attn_implementation`` is ``name`` and ``registry[id(config)]`` holds
    ``state_of(previous implementation, previous state)``; both are restored afterwards (nesting works)."""
    saved = []
    for cfg in configs:
        prev, prev_state = cfg._attn_implementation, registry.get(id(cfg))
        saved.append((cfg, prev, prev_state))
        registry[id(cfg)] = state_of(prev, prev_state)
        cfg._attn_implementation = name
    try:
        yield
    finally:
        for cfg, prev, prev_state in reversed(saved):
            cfg._attn_implementation = prev
            if prev_state is None:
                registry.pop(id(cfg), None)
            else:
                registry[id(cfg)] = prev_state


@contextlib.contextmanager
def given_mask(encoder, mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, the text decoder attends with the additive float ``mask`` ``[B, 1, S, S]``
    (0 = attend, a large negative = not, other values = a logit bias)."""
    _register()
    # Under another x2i implementation (e.g. sparse prefill) this runs dense SDPA.
    with switched(text_configs(encoder, "an explicit attention mask"), NAME, _ACTIVE,
                  lambda prev, _: (mask, prev if prev in ("sdpa", "eager") else "sdpa")):
        yield


__all__ = ["NAME", "given_mask", "original_attention", "switched", "text_configs"]
