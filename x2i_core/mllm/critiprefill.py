"""CritiPrefill sparse prefill wired into transformers: the settings and the switch for a text decoder.

The attention itself (block selection by criticality, log-sum-exp merging) lives in
:mod:`x2i_core.ops.sparse_prefill`; this module owns

* :class:`CritiPrefillConfig` - the settings, parsed from a config, a dict or a string such as
  ``"auto,budget=2048"``, and their cache tag;
* the transformers hooks, registered as ``"x2i_critiprefill"`` in ``AttentionInterface`` and
  ``AttentionMaskInterface`` on first use (never at import): the mask hook hands the layers the 2-D key padding
  mask instead of a ``[B, 1, S, S]`` one, the attention hook runs :func:`sparse_attention` on it;
* :func:`sparse_prefill` - a ``with`` block that points the *text decoder's* ``config._attn_implementation``
  at these hooks and restores it afterwards.  Vision / audio towers keep their attention.  Whatever the sparse
  path does not cover (a KV cache with new tokens, sliding-window or packed masks, short inputs) goes to the
  model's original attention unchanged.  Layers ``< dense_layers`` and inputs under ``min_length`` (mode
  ``auto``) run dense.

Usage::

    from x2i_core.mllm.critiprefill import CritiPrefillConfig, sparse_prefill

    with sparse_prefill(encoder, CritiPrefillConfig(budget=4096)) as stats:
        hidden = encoder.forward_hidden(batch)      # or encoder.encode(requests)
    print(stats.summary())

The switch is per model object, not per thread: do not run a dense forward of the same encoder from another
thread while the block is open.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from ..errors import X2IInputError
from ..ops.sparse_prefill import PrefillStats, attention_lse, first_masked_key, merge_lse, sparse_attention
from .attention import original_attention, switched, text_configs

NAME = "x2i_critiprefill"
MODES = ("auto", "on", "off")


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


class _KeyMask:
    """What our mask function hands the layers: the 2-D key padding mask (True = real) or None (no padding)."""

    __slots__ = ("valid", "_first_pad")

    def __init__(self, valid: torch.Tensor | None):
        self.valid = valid
        self._first_pad: int | None = None

    def first_pad(self, length: int) -> int:
        """Smallest position of a masked key over the batch (``length`` when none), computed once."""
        if self._first_pad is None:
            self._first_pad = first_masked_key(self.valid)
        return min(self._first_pad, length)


@dataclasses.dataclass
class _State:
    config: CritiPrefillConfig
    original: str
    stats: PrefillStats


_ACTIVE: dict[int, _State] = {}


# -- transformers hooks --------------------------------------------------------------------------------------------
def _mask_fn(batch_size: int, cache_position: torch.Tensor | None = None, kv_length: int = 0, kv_offset: int = 0,
             mask_function=None, attention_mask: torch.Tensor | None = None, config=None, **kwargs):
    """transformers' mask hook: 4.5x passes the queries' ``cache_position``, 5.x their ``q_length`` / ``q_offset``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    state = _ACTIVE.get(id(config))
    q_len = int(cache_position.shape[0]) if cache_position is not None else int(kwargs.get("q_length", 0))
    ours = (state is not None and mask_function is causal_mask_function and kv_offset == 0
            and int(kwargs.get("q_offset", 0)) == 0 and q_len == kv_length and state.config.applies(kv_length))
    if not ours:
        original = state.original if state is not None else "sdpa"
        if original not in ALL_MASK_ATTENTION_FUNCTIONS:
            original = "sdpa" if original != "eager" else "eager"
        if cache_position is not None:
            kwargs["cache_position"] = cache_position
        return ALL_MASK_ATTENTION_FUNCTIONS[original](
            batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
            attention_mask=attention_mask, config=config, **kwargs)
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
