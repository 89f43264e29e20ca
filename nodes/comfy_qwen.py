"""Host adapter for X2I CLIP Encode: the Qwen2.5-VL text encoders ComfyUI already loads, run as the X2I MLLM.

Many users keep Qwen2.5-VL-7B in ``models/text_encoders`` for Qwen-Image (stock
Load CLIP, type ``qwen_image``: ``qwen_2.5_vl_7b.safetensors``, fp8-scaled
variants) and Qwen2.5-VL-3B's language model for OmniGen2 (type
``omnigen2``).  ComfyUI runs both natively.  This node takes such a ``CLIP``
and returns exactly what X2I MLLM Encode returns for the same model: the
prompt is built by ``x2i_core`` (presets, chat template, padding - the very
code of the transformers path, fed with the tokenizer the CLIP carries) and
the hidden-state stack ``[B, layers + 1, S, H]`` comes from ComfyUI's own
modules, loaded and offloaded by ComfyUI's model management.

Where ComfyUI's stock forward differs from what transformers computes, this
module computes the difference itself:

* positions: transformers derives them from the attention mask and the image
  grids (multimodal RoPE, padding at position 1); we pass the same explicit
  positions to ComfyUI's decoder;
* left padding (``training`` preset): ComfyUI's ``-inf`` mask would turn
  rows with every key masked into NaN.  With ``pad_rows="reference"`` (the
  default) each pad row attends to every key, as the released AlignNets' training
  stack computed it: we run the real tokens plus one pad query (its own key
  weighted by the number of pads) through ComfyUI's decoder blocks with that
  explicit mask; with ``"constant"`` the real tokens run unpadded and the pad
  rows are the constant transformers >= 4.5x gives (an empty attention);
* the vision tower: transformers returns the merged image tokens in raster
  order (it undoes the window grouping after the merger); we drive ComfyUI's
  vision blocks ourselves so the order is the same;
* the final norm is applied to the last state only (``intermediate_output="all"``
  with ``final_layer_norm_intermediate=False``), as transformers reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.utils

from ..x2i_core import registry
from ..x2i_core.errors import X2IError
from ..x2i_core.mllm.base import EncodeRequest, HiddenStates
from ..x2i_core.mllm.chat import check_pad_rows, pad_query_mask, pil_image_processor_class
from ..x2i_core.mllm.mrope import rope_positions
from ..x2i_core.mllm.qwen25vl import Qwen25VLPrompt
from ..x2i_core.prompt import QWEN25VL_CHAT_TEMPLATE  # Qwen2.5-VL-Instruct's chat_template.json, reproduced
from .common import NodeError

NODE = "X2I CLIP Encode"

# The image processor settings of the released Qwen2.5-VL-3B/7B-Instruct (preprocessor_config.json).
QWEN25VL_IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14,
                                temporal_patch_size=2, merge_size=2)


@dataclasses.dataclass(frozen=True)
class Family:
    release: str        # the MLLM's release name in x2i_core.registry.KNOWN_MLLMS (its family, C and H)
    comfy_class: str    # the class in comfy.text_encoders.llama
    clip_type: str      # the stock Load CLIP type that loads it
    used_by: str        # the model family that ships it ("Qwen-Image")
    files: str          # what users have on disk
    vision: bool        # the ComfyUI model has its vision tower

    @property
    def known(self) -> registry.KnownMLLM:
        return registry.release(self.release)

    @property
    def name(self) -> str:  # "Qwen2.5-VL-7B"
        return self.release.removesuffix("-Instruct")

    @property
    def channels(self) -> int:  # C of the released AlignNet (layers + 1)
        return self.known.channels

    @property
    def hidden(self) -> int:  # H of the released AlignNet
        return self.known.hidden

    def fits(self) -> str:
        return registry.describe_dims(self.channels, self.hidden)

    def summary(self) -> str:
        """``"qwen_image (Qwen2.5-VL-7B, text + image; AlignNet C=<layers+1>, H=<width>)"``, for tooltips."""
        return (f"{self.clip_type} ({self.name}, text{' + image' if self.vision else ' only'}; "
                f"AlignNet C={self.channels}, H={self.hidden})")


FAMILIES = (
    Family("Qwen2.5-VL-7B-Instruct", "Qwen25_7BVLI", "qwen_image", "Qwen-Image",
           "qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors", True),
    Family("Qwen2.5-VL-3B-Instruct", "Qwen25_3B", "omnigen2", "OmniGen2", "OmniGen2's qwen_2.5_vl_fp16.safetensors",
           False),
)


def supported_text() -> str:
    parts = [f"{f.name} (Load CLIP type '{f.clip_type}', e.g. {f.files}; text{' + image' if f.vision else ' only'}; "
             f"fits the X2I AlignNet for {f.fits()})" for f in FAMILIES]
    return " and ".join(parts)


def clip_tooltip() -> str:
    """The CLIP input's tooltip: which Load CLIP types, models and AlignNet dimensions fit."""
    return f"From Load CLIP: type {' or '.join(f.summary() for f in FAMILIES)}."


def clip_description() -> str:
    """``"Qwen-Image's Qwen2.5-VL-7B, type qwen_image; OmniGen2's Qwen2.5-VL-3B, type omnigen2"``."""
    return "; ".join(f"{f.used_by}'s {f.name}, type {f.clip_type}" for f in FAMILIES)


def vision_names() -> str:
    """The native text encoders that take images (``"Qwen2.5-VL-7B"``)."""
    return " / ".join(f.name for f in FAMILIES if f.vision)


@dataclasses.dataclass
class NativeQwen:
    """The pieces of a ComfyUI CLIP that hold a supported Qwen2.5-VL."""

    family: Family
    clip: object            # comfy.sd.CLIP
    transformer: object     # comfy.text_encoders.llama.Qwen25_7BVLI / Qwen25_3B
    tokenizer: object       # the transformers Qwen2 tokenizer the CLIP carries

    @property
    def decoder(self):
        return self.transformer.model  # llama.Llama2_

    @property
    def channels(self) -> int:
        return len(self.decoder.layers) + 1

    @property
    def hidden_size(self) -> int:
        return int(self.decoder.config.hidden_size)

    @property
    def name(self) -> str:
        return f"{self.family.name} (ComfyUI text encoder)"


def _encoders_in(clip) -> list[tuple[str, object]]:
    """(attribute name, ComfyUI text-encoder wrapper) pairs inside a CLIP's model."""
    model = getattr(clip, "cond_stage_model", None)
    if not isinstance(model, torch.nn.Module):
        return []
    return [(n, m) for n, m in model.named_children() if isinstance(getattr(m, "transformer", None), torch.nn.Module)]


def find_native_qwen(clip) -> NativeQwen:
    """The Qwen2.5-VL inside a ComfyUI CLIP, or a NodeError naming what is supported."""
    import comfy.text_encoders.llama as llama

    if clip is None or not hasattr(clip, "cond_stage_model") or not hasattr(clip, "patcher"):
        raise NodeError(f"{NODE}: 'clip' is not a ComfyUI CLIP; connect a Load CLIP node. Supported: "
                        f"{supported_text()}.")
    found = _encoders_in(clip)
    for attr, wrapper in found:
        for fam in FAMILIES:
            cls = getattr(llama, fam.comfy_class, None)
            if cls is not None and isinstance(wrapper.transformer, cls):
                sd_tok = getattr(getattr(clip, "tokenizer", None), attr, None)
                tok = getattr(sd_tok, "tokenizer", None)
                if tok is None or not hasattr(tok, "convert_tokens_to_ids"):
                    raise NodeError(f"{NODE}: the CLIP holds {fam.name} but no Qwen tokenizer for it "
                                    f"(clip.tokenizer.{attr}); load it with the stock Load CLIP node")
                return NativeQwen(fam, clip, wrapper.transformer, tok)
    what = ", ".join(f"{a} ({type(w.transformer).__name__})" for a, w in found) or type(
        getattr(clip, "cond_stage_model", clip)).__name__
    raise NodeError(
        f"{NODE}: this CLIP holds {what} - not a Qwen2.5-VL text encoder that X2I has an AlignNet for. "
        f"Supported: {supported_text()}. For other MLLMs use X2I MLLM Loader + X2I MLLM Encode with a "
        "Hugging Face model folder.")


# -- the prompt: the transformers path's own code, with the CLIP's tokenizer ---------------------------

_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _processor_for(tokenizer):
    """A Qwen2.5-VL processor around the CLIP's tokenizer, with Qwen2.5-VL-Instruct's chat template (the
    tokenizer folder ComfyUI ships carries the text-only Qwen2.5 one) and image processor settings; the slow
    (PIL) image processor, as the transformers path loads it (what transformers 4.49 ran for the reference)."""
    proc = _PROCESSORS.get(tokenizer)
    if proc is None:
        from transformers import Qwen2_5_VLProcessor

        ImageProcessor = pil_image_processor_class("Qwen2VLImageProcessor")  # noqa: N806 - a class

        kwargs = {}
        try:  # transformers >= 4.52 wants a video processor (this node passes no video)
            from transformers import Qwen2VLVideoProcessor

            kwargs["video_processor"] = Qwen2VLVideoProcessor()
        except ImportError:
            pass
        proc = Qwen2_5_VLProcessor(image_processor=ImageProcessor(**QWEN25VL_IMAGE_PROCESSOR), tokenizer=tokenizer,
                                   chat_template=QWEN25VL_CHAT_TEMPLATE, **kwargs)
        _PROCESSORS[tokenizer] = proc
    return proc


class _Prompter(Qwen25VLPrompt):
    """The transformers path's prompt side (presets, template, media, padding) over ComfyUI's tokenizer."""

    def __init__(self, native: NativeQwen):
        self.processor = _processor_for(native.tokenizer)
        self.name = native.name
        self.modalities = frozenset({"text", "image"} if native.family.vision else {"text"})
        tok = native.tokenizer
        self._media_ids = {int(tok.convert_tokens_to_ids(t)) for t in ("<|image_pad|>", "<|video_pad|>")}

    def media_token_ids(self) -> set[int]:
        return self._media_ids  # ComfyUI's model sets no position limit of its own: max_positions() is None


# -- the forward: ComfyUI's modules, transformers' positions and padding ------------------------------

def vision_embeds(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Qwen2.5-VL vision tower over processed patches -> merged image tokens in raster order.

    Patches are grouped by attention window for the windowed blocks (full attention in the blocks listed
    in ``fullatt_block_indexes``); the grouping is undone after the merger, as transformers does."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    dev = pixel_values.device
    x = visual.patch_embed(pixel_values)
    window_index, cu_window = visual.get_window_index(grid_thw)
    window_index = window_index.to(dev)
    cu_window = torch.unique_consecutive(torch.tensor(cu_window, device=dev, dtype=torch.int32))
    rotary = visual.get_position_embeddings(grid_thw, dev)
    unit = visual.spatial_merge_size ** 2
    n = x.shape[0]
    x = x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
    rotary = rotary.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
    emb = torch.cat((rotary, rotary), dim=-1)
    position_embeddings = (emb.cos(), emb.sin())
    per_image = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    cu_full = F.pad(per_image.cumsum(0, dtype=torch.int32), (1, 0), value=0).to(dev)
    attention = optimized_attention_for_device(dev, mask=False, small_input=True)
    full = set(visual.fullatt_block_indexes)
    for i, block in enumerate(visual.blocks):
        x = block(x, position_embeddings, cu_full if i in full else cu_window, optimized_attention=attention)
    x = visual.merger(x)
    return x[torch.argsort(window_index)]


def _no_attention(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
    """Attention over nothing (every key masked): a zero output, as transformers' SDPA gives such rows."""
    return q.new_zeros(q.shape[0], q.shape[2], heads * q.shape[-1])


def pad_row_states(decoder, pad_id: int, device) -> torch.Tensor:
    """``[layers + 1, H]``: the states of a left-padding row (attends to nothing), one constant per layer."""
    x = decoder.embed_tokens(torch.tensor([[pad_id]], device=device), out_dtype=torch.float32)
    from comfy.text_encoders.llama import precompute_freqs_cis

    cfg = decoder.config
    # the identity rotation (position 0: cos 1, sin 0), in whatever layout this host's attention takes
    # (0.3.x: (cos, sin); later: (cos, sin first half, -sin second half))
    pos0 = torch.zeros(3 if cfg.rope_dims is not None else 1, 1, dtype=torch.long, device=device)
    rope = precompute_freqs_cis(cfg.head_dim, pos0, cfg.rope_theta, cfg.rope_scale, cfg.rope_dims, device=device)
    return torch.cat(_layer_states(decoder, x, None, rope, _no_attention), dim=0)[:, 0]


def _layer_states(decoder, x, mask, freqs, attention) -> list:
    """ComfyUI's decoder blocks driven one by one: the input and every block's output (the final norm on the
    last state only, as transformers reports hidden states)."""
    states = [x]
    for layer in decoder.layers:
        x = layer(x=x, attention_mask=mask, freqs_cis=freqs, optimized_attention=attention)
        if isinstance(x, tuple):  # ComfyUI >= 0.2x: (hidden states, this layer's key/value cache)
            x = x[0]
        states.append(x)
    if decoder.norm is not None:
        states[-1] = decoder.norm(states[-1])
    return states


def _stack_masked(decoder, embeds, mask, positions) -> torch.Tensor:
    """ComfyUI's decoder blocks with an explicit additive mask ``[1, 1, S, S]`` -> ``[1, layers + 1, S, H]``
    (the final norm on the last state only)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    from comfy.text_encoders.llama import precompute_freqs_cis

    cfg = decoder.config
    if cfg.rope_dims is None:  # a text-only decoder: one position axis
        positions = positions[:1]
    freqs = precompute_freqs_cis(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scale, cfg.rope_dims,
                                 device=embeds.device)
    attention = optimized_attention_for_device(embeds.device, mask=True, small_input=True)
    return torch.stack(_layer_states(decoder, embeds, mask, freqs, attention), dim=1)


def _stack(decoder, embeds, mask, positions) -> torch.Tensor:
    """One ComfyUI decoder pass -> ``[1, layers + 1, S, H]`` (the final norm on the last state only)."""
    if decoder.config.rope_dims is None:  # a text-only decoder: one position axis
        positions = positions[:1]
    out = decoder(None, attention_mask=mask, embeds=embeds, intermediate_output="all",
                  final_layer_norm_intermediate=False, dtype=torch.float32, position_ids=positions)
    inter = out[1]  # (x, intermediate) on 0.3.x; later hosts may add the key/value caches
    expected = (1, len(decoder.layers) + 1, embeds.shape[1], embeds.shape[2])
    if inter is None or tuple(inter.shape) != expected:
        raise NodeError(f"{NODE}: this ComfyUI version's Qwen2.5 forward returned hidden states of shape "
                        f"{None if inter is None else tuple(inter.shape)}, expected {expected}; "
                        "use X2I MLLM Loader + X2I MLLM Encode instead")
    return inter


def _input_embeds(native: NativeQwen, batch: dict, device, image_id: int) -> torch.Tensor:
    """Token embeddings with each image's merged vision tokens scattered over its ``<|image_pad|>`` slots."""
    ids, grid = batch["input_ids"], batch.get("image_grid_thw")
    embeds = native.decoder.embed_tokens(ids.to(device), out_dtype=torch.float32)
    if batch.get("pixel_values") is None:
        return embeds
    if not native.family.vision or getattr(native.transformer, "visual", None) is None:
        raise NodeError(f"{NODE}: {native.name} has no vision tower; disconnect the image")
    image = vision_embeds(native.transformer.visual, batch["pixel_values"].to(device, torch.float32), grid.to(device))
    where = (ids == image_id).to(device)
    if int(where.sum()) != image.shape[0]:
        raise NodeError(f"{NODE}: the prompt holds {int(where.sum())} image tokens but the vision tower gave "
                        f"{image.shape[0]}")
    return embeds.masked_scatter(where[..., None], image.to(embeds.dtype))


@contextlib.contextmanager
def _progress(decoder, total: int):
    """A ComfyUI progress bar ticking per decoder layer, and the interrupt button honoured between layers."""
    pbar = comfy.utils.ProgressBar(total)

    def tick(module, args):
        mm.throw_exception_if_processing_interrupted()
        pbar.update(1)

    handles = [layer.register_forward_pre_hook(tick) for layer in decoder.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hidden_states(native: NativeQwen, batch: dict, device, pad_rows: str = "reference") -> torch.Tensor:
    """Prepared inputs (``input_ids``, ``attention_mask``, optional ``pixel_values`` / ``image_grid_thw``)
    -> ``[B, layers + 1, S, H]`` float32 from ComfyUI's modules (left-pad rows per ``pad_rows``)."""
    decoder, tok = native.decoder, native.tokenizer
    image_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, S = ids.shape
    embeds = _input_embeds(native, batch, device, image_id)
    merge = int(getattr(getattr(native.transformer, "visual", None), "spatial_merge_size", 2))
    positions = rope_positions(ids, mask, batch.get("image_grid_thw"), image_id, merge).to(device)
    out = torch.empty(B, native.channels, S, native.hidden_size, dtype=torch.float32, device=device)
    pad_states = None
    with _progress(decoder, B * len(decoder.layers)):
        for b in range(B):
            real = mask[b].bool()
            if not bool(real.any()):
                raise NodeError(f"{NODE}: prompt {b + 1} has no tokens")
            first = int(torch.nonzero(real)[0])
            if first > 0 and pad_rows == "reference":  # left padding: the pad rows attend to every key
                n = S - first
                seg = torch.cat([embeds[b:b + 1, first:], embeds[b:b + 1, :1]], dim=1)  # real tokens + one pad
                pos = torch.cat([positions[:, b, first:], torch.ones_like(positions[:, b, :1])], dim=1)
                keys = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)], dim=1)
                attn = pad_query_mask(keys, torch.tensor([first]), torch.float32).to(device)
                st = _stack_masked(decoder, seg, attn, pos)[0]
                out[b, :, first:] = st[:, :n]
                out[b, :, :first] = st[:, n, None]
                continue
            if first > 0:  # left padding, constant rows: rows that attend to nothing
                if pad_states is None:
                    pad_states = pad_row_states(decoder, pad_id, device)
                out[b, :, :first] = pad_states[:, None, :]
            seg = real[first:]
            trailing = not bool(seg.all())
            if trailing and not bool(seg[: int(seg.sum())].all()):
                raise NodeError(f"{NODE}: prompt {b + 1} has padding inside its tokens; expected left or right "
                                "padding")
            seg_mask = mask[b:b + 1, first:].to(device) if trailing else None
            out[b, :, first:] = _stack(decoder, embeds[b:b + 1, first:], seg_mask, positions[:, b, first:])[0]
    return out


def _vision_encoders() -> str:
    """``"Qwen2.5-VL-7B text encoder (type 'qwen_image')"``."""
    return " or ".join(f"{f.name} text encoder (type '{f.clip_type}')" for f in FAMILIES if f.vision)


def encode_with_clip(clip, request: EncodeRequest, preset: str | None = None,
                     image_size: int | None = None, pad_rows: str = "reference") -> HiddenStates:
    """X2I hidden states from a ComfyUI CLIP holding Qwen2.5-VL-7B/3B: the same presets, padding and tensors
    as ``Qwen25VLEncoder.encode`` on the same weights."""
    native = find_native_qwen(clip)
    if request.images is not None and not native.family.vision:
        raise NodeError(
            f"{NODE}: images were given, but {native.family.name} as ComfyUI loads it ({native.family.clip_type} "
            f"type, language model only) has no vision tower. Disconnect the image, or use the {_vision_encoders()}, "
            f"or X2I MLLM Loader with a full {native.family.release} folder.")
    try:
        pad_rows = check_pad_rows(pad_rows)
        batch, preset_name, lengths = _Prompter(native).prepare([request], preset, image_size)
    except X2IError as exc:
        raise NodeError(f"{NODE}: {exc}") from None
    clip.load_model()  # ComfyUI's model management: onto the text-encoder device, offloading others if needed
    device = clip.patcher.load_device
    try:
        with torch.inference_mode():
            hidden = hidden_states(native, batch, device, pad_rows)
    except X2IError as exc:
        raise NodeError(f"{NODE}: {exc}") from None
    except torch.OutOfMemoryError:
        mm.soft_empty_cache(True)
        raise NodeError(f"{NODE}: out of memory while running {native.name}; try a smaller image_resolution, "
                        "an fp8 text encoder file, or launch ComfyUI with --lowvram") from None
    left = bool(batch["attention_mask"][:, 0].eq(0).any())
    hs = HiddenStates(hidden.to(mm.intermediate_device()), batch["attention_mask"], native.name, preset_name, lengths,
                      native.family.known.family, pad_rows if left else None)
    hs.source_path = None
    return hs
