"""The encoder shared by chat-template MLLM families (Qwen2.5-VL, Qwen2.5-Omni, InternVL ...).

Encoding = build the X2I prompt (one or more chat turns with their media, per
preset), run the processor, pad per preset, then one forward pass of the
multimodal backbone with every hidden state returned and no LM head: the
embedding output plus each decoder layer (the last one after the final norm,
as transformers returns it), stacked as ``[B, layers + 1, S, H]``.  The
reference obtains the same tensors from the prefill step of
``generate(max_new_tokens=1, output_hidden_states=True)``.

A family subclass says how to load its model folder, which decoder layers to
report progress on, which modalities it accepts and how its processor is
called; everything else is here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from typing import Any, Sequence

import torch
from safetensors import SafetensorError

from .. import registry
from ..errors import X2IError, X2IFileError, X2IInputError
from .attention import given_mask
from .base import EncodeRequest, HiddenStates
from .cache import FORWARD_CALLS, EncodeCache, digest
from .prompting import TOKEN_KEYS, ChatPrompt, with_tokens


def _config_errors() -> tuple[type[BaseException], ...]:
    """transformers 5 validates configs as huggingface-hub strict dataclasses (their errors are no TypeError)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


_CONFIG_ERRORS = _config_errors()


def transformers_major() -> int:
    """The installed transformers' major version (4 or 5: the pack computes what changed between them itself)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def load_pil_processor(path: str):
    """The folder's processor with the PIL ("slow") image processor, which transformers 4.49 ran for the
    reference (the torchvision one resizes differently, ~1e-2): ``use_fast=False`` on 4.x; on 5.x (which
    deprecates ``use_fast`` and defaults to torchvision) ``backend="pil"``, or - where a part such as InternVL's
    video processor has no PIL backend - the default processor with its image processor swapped for the PIL one."""
    from transformers import AutoImageProcessor, AutoProcessor

    if transformers_major() < 5:
        return AutoProcessor.from_pretrained(path, use_fast=False)
    try:
        return AutoProcessor.from_pretrained(path, backend="pil")
    except ImportError:
        processor = AutoProcessor.from_pretrained(path)
        processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        return processor


def pil_image_processor_class(name: str):
    """transformers' PIL image processor class for ``name`` (e.g. ``"Qwen2VLImageProcessor"``): the class itself
    on 4.x, where it is the slow PIL one; ``<name>Pil`` on 5.x, where ``<name>`` is the torchvision backend."""
    import transformers

    if transformers_major() >= 5:
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isfile(path):
        raise X2IFileError(
            f"MLLM '{path}' is a file; X2I loads MLLMs from Hugging Face model folders (config.json, "
            "*.safetensors, tokenizer and preprocessor files). The published single-file ComfyUI MLLM "
            "(e.g. qwen2.5-vl-7b-instruct.pt) is a pickle that runs code when loaded, so it is never opened: "
            "download the model's folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct) instead")
    if not os.path.isdir(path):
        raise X2IFileError(
            f"MLLM folder '{path}' does not exist; expected a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer and preprocessor files)"
        )
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise X2IFileError(f"MLLM folder '{path}' has no config.json; expected a Hugging Face model folder")
    cfg = read_json_object(cfg_path, "MLLM config")
    check_config_numbers(cfg, cfg_path)
    return cfg


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a file that is not one (bad JSON, nested past Python's recursion limit, not
    an object) is an X2IFileError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise X2IFileError(f"{what} '{path}' is not valid JSON ({exc})") from exc
    except RecursionError:
        raise X2IFileError(f"{what} '{path}' is nested too deeply to be a model config (JSON objects inside "
                           "objects past Python's recursion limit); download the file again") from None
    if not isinstance(obj, dict):
        raise X2IFileError(f"{what} '{path}' is not a JSON object")
    return obj


# Numbers a config must hold as finite and positive, where a wrong one fails deep inside torch (a zero patch size
# divides by zero, a NaN norm epsilon turns every hidden state NaN and looks like damaged weights).
POSITIVE_CONFIG_KEYS = ("rms_norm_eps", "layer_norm_eps", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
                        "patch_size", "spatial_patch_size", "spatial_merge_size", "temporal_patch_size", "merge_size",
                        "image_size", "rope_theta")


def check_config_numbers(cfg: Any, path: str, where: str = "") -> None:
    """Refuse a config (or preprocessor config) whose sizes or epsilons are not finite positive numbers, naming
    the key and its place; nested sub-configs (``text_config``, ``vision_config``, ...) are checked too."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            here = f"{where}.{key}" if where else key
            if key in POSITIVE_CONFIG_KEYS and value is not None and not isinstance(value, (dict, list)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and value > 0
                if not ok:
                    raise X2IFileError(f"'{path}': {here} is {value!r}; expected a finite number above 0 - the file "
                                       "is damaged or was edited by hand; download the model folder again")
            elif isinstance(value, dict):
                check_config_numbers(value, path, here)


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
PREPROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def check_model_folder(path: str) -> None:
    """What every MLLM folder must hold, checked before transformers sees it (whose errors for a missing
    tokenizer or weights are about protobuf or sentencepiece, not the folder)."""
    names = set(os.listdir(path))
    if not any(all(f in names for f in group) for group in TOKENIZER_FILES):
        raise X2IFileError(
            f"MLLM folder '{path}' has no tokenizer files; expected tokenizer.json (or vocab.json + merges.txt, or "
            "tokenizer.model) beside config.json - download the model folder completely")
    if "tokenizer_config.json" not in names:
        raise X2IFileError(
            f"MLLM folder '{path}' has no tokenizer_config.json (it names the tokenizer's class and special "
            "tokens; without it transformers guesses a sentencepiece tokenizer) - download the model folder "
            "completely")
    for name in PREPROCESSOR_FILES:
        if name in names:
            check_config_numbers(read_json_object(os.path.join(path, name), "MLLM processor config"),
                                 os.path.join(path, name))
    if not any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) for n in names):
        raise X2IFileError(f"MLLM folder '{path}' has no weight files; expected *.safetensors (or a weights index "
                           "and its shards) beside config.json - download the model folder completely")


def _weights_hint(path: str) -> str:
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names) and any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        return ("; its weights are torch pickles, which are read weights-only: one that needs code execution is "
                "refused - get the model's .safetensors weights instead")
    return ""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in table:
        raise X2IInputError(f"dtype {dtype!r} is unknown; expected auto, fp32, bf16 or fp16")
    return table[name]


class ChatEncoder(ChatPrompt):
    """Base of the chat-template MLLM encoders (see the module docstring); the prompt side is
    :class:`~.prompting.ChatPrompt`."""

    family = "mllm"
    display = "MLLM"
    model_types: tuple[str, ...] = ()
    trust_remote_code = False
    video_decode_fit = True  # a video file's frames may be resized as they decode to this encoder's video size

    def __init_subclass__(cls, family: str | None = None, **kwargs):
        """``class X(ChatEncoder, family="internvl")``: the family's facts (id, display name, config.json model
        types, modalities, remote code) come from :data:`x2i_core.registry.MLLM_FAMILIES`."""
        super().__init_subclass__(**kwargs)
        if family is not None:
            facts = registry.family(family)
            cls.family, cls.display, cls.model_types = facts.id, facts.display, facts.model_types
            cls.modalities, cls.trust_remote_code = facts.modalities, facts.remote_code

    def __init__(self, module, model, processor, name: str, path: str | None = None):
        self.module = module        # the full model (LM head included, used only by generate)
        self.model = model          # the backbone (no LM head)
        self.processor = processor
        self.name = name
        self.path = path
        cfg = self.text_config()
        self.channels = int(cfg.num_hidden_layers) + 1
        self.hidden_size = int(cfg.hidden_size)

    # -- family hooks -------------------------------------------------------
    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, **kwargs):
        """-> (full model, backbone, processor)."""
        raise NotImplementedError

    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg)

    def max_positions(self) -> int | None:
        """The longest input the text decoder takes (its ``max_position_embeddings``), or None if unknown."""
        return getattr(self.text_config(), "max_position_embeddings", None)

    @property
    def decoder_layers(self):
        lm = getattr(self.model, "language_model", None)
        return getattr(lm, "layers", None)

    def media_token_ids(self) -> set[int]:
        cfg = self.model.config
        ids = {getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "audio_token_id",
                                                "image_token_index", "video_token_index", "audio_token_index")}
        ids.discard(None)
        return {int(i) for i in ids}

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra forward arguments (e.g. position ids) that make a padded batch equal the reference's generate."""
        return {}

    # -- loading ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto",
                        device: str | torch.device = "cpu", quant: str | None = "none",
                        cpu_matmul: str | None = "auto", **kwargs) -> "ChatEncoder":
        """Load a model folder.  ``quant``: 'none', 'int8' (weight-only, CPU/GPU), 'bnb8' / 'bnb4'
        (bitsandbytes, CUDA; the model then lives on ``device`` for good) - see :mod:`.quant`.
        ``cpu_matmul``: 'auto', 'torch' or 'onednn' (the decoder's products on a CPU) - see :mod:`.packed`."""
        from .packed import pack_linears, resolve_cpu_matmul
        from .quant import bnb_config, check_quant, quantize_int8

        path = os.fspath(path)
        cfg = read_model_config(path)
        if cfg.get("model_type") not in cls.model_types:
            raise X2IFileError(
                f"MLLM folder '{path}' holds a {cfg.get('model_type')!r} model; this encoder reads "
                f"{cls.display} folders (model_type {' / '.join(repr(t) for t in cls.model_types)})"
            )
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        q = check_quant(quant, device)
        matmul = resolve_cpu_matmul(cpu_matmul, device, torch_dtype, q)
        if q in ("bnb8", "bnb4"):
            kwargs["quantization_config"] = bnb_config(q, list(cls.unquantised_modules))
            kwargs["device_map"] = {"": device}
        check_model_folder(path)
        try:
            full, backbone, processor = cls.load_parts(path, torch_dtype, **kwargs)
        except X2IError:  # already says what is wrong and where
            raise
        except (TypeError, AttributeError, KeyError, *_CONFIG_ERRORS) as exc:  # transformers reading a malformed config
            raise X2IFileError(f"MLLM folder '{path}': config.json does not describe a usable "
                               f"{cls.display} model ({type(exc).__name__}: {exc}); download it again") from exc
        except ImportError as exc:
            raise X2IFileError(f"MLLM folder '{path}' cannot be loaded: {exc}") from exc
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # 5.x: the raw unpickler's
            raise X2IFileError(f"MLLM folder '{path}' is incomplete or corrupt ({exc}){_weights_hint(path)}") from exc
        except SafetensorError as exc:  # a truncated or damaged weight file
            raise X2IFileError(f"MLLM folder '{path}' has a truncated or corrupt .safetensors weight file ({exc}); "
                               "download the model's weights again") from exc
        if q not in ("bnb8", "bnb4"):
            full.to(device)
        full.eval().requires_grad_(False)
        name = f"{cls.display} ({os.path.basename(os.path.normpath(path))})"
        enc = cls(full, backbone, processor, name, path)
        if q == "int8":
            quantize_int8(enc.decoder_layers)
        if matmul == "onednn":
            pack_linears(enc.decoder_layers)
        enc.quant, enc.cpu_matmul = q, matmul
        enc.cache_tag = q if matmul == "torch" else f"{q}+{matmul}"
        return enc

    quant = "none"
    cpu_matmul = "torch"
    # module names bitsandbytes leaves alone (towers, projector, LM head)
    unquantised_modules = ("lm_head", "visual", "vision_tower", "audio_tower", "multi_modal_projector", "mlp1")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- forward ------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev, dtype = self.device, self.dtype
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev)
                if v.is_floating_point() and (k.startswith("pixel_values") or k == "input_features"):
                    v = v.to(dtype)
            out[k] = v
        return out

    def forward_hidden(self, batch: dict[str, torch.Tensor], unmask_pad_rows: bool = False,
                       mask: torch.Tensor | None = None, prefix=None) -> torch.Tensor:
        """One forward pass over prepared inputs -> ``[B, layers + 1, S, H]``.  ``unmask_pad_rows``: a query
        row whose keys are all masked (a left pad) attends to every key, as transformers 4.49's SDPA path did
        on CUDA (the tensors the released AlignNets were trained on).  ``mask``: an explicit additive
        attention mask ``[B, 1, S, S]`` for the text decoder (``[B, 1, S, P + S]`` after a ``prefix``).
        ``prefix``: a :meth:`prompt_prefix` whose cached keys/values come before these tokens (the batch
        then carries its ``position_ids``)."""
        inputs = self._to_device(batch)
        extra = self.forward_inputs(inputs)
        inputs.update({k: v for k, v in extra.items() if k not in inputs})
        if unmask_pad_rows:
            mask = unmasked_causal_mask(inputs["attention_mask"], self.dtype)
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefix is not None:
            from transformers import DynamicCache

            b = inputs["input_ids"].shape[0]
            cache = DynamicCache()
            for i, (k, v) in enumerate(prefix[2]):
                cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
            kwargs = {"use_cache": True, "past_key_values": cache}
        FORWARD_CALLS[self.name] += 1
        with torch.inference_mode(), (given_mask(self, mask.to(self.device)) if mask is not None
                                      else contextlib.nullcontext()):
            out = self.model(**inputs, output_hidden_states=True, return_dict=True, **kwargs)
        return torch.stack(out.hidden_states, dim=1)

    def encode(self, requests: EncodeRequest | Sequence[EncodeRequest], preset: str | None = None,
               image_size: int | None = None, video_size: int | None = None, exact_fill: bool = True,
               prefill: Any = None, pad_rows: str | None = None) -> HiddenStates:
        """Encode prompts.  ``image_size`` / ``video_size`` override the preset's image / video-frame
        resolution (pixels per side).  ``exact_fill`` (default on) skips the work whose result is known
        (see :meth:`forward_left_padded` / :meth:`forward_right_padded`); off = the plain padded forward.
        ``prefill``: None / "off" = dense attention; "auto" = CritiPrefill sparse attention for inputs of
        at least 4096 tokens; "on" = always; or a :class:`~x2i_core.mllm.critiprefill.CritiPrefillConfig`
        / "auto,budget=2048,..." string (approximate: see that module).
        ``pad_rows``: what left-pad positions hold (default: :attr:`pad_rows`) - ``"reference"``, the rows
        the released AlignNets were trained on, or ``"constant"`` (see :data:`PAD_ROWS`)."""
        pad_rows = check_pad_rows(self.pad_rows if pad_rows is None else pad_rows)
        if prefill not in (None, "off", "dense"):
            from .critiprefill import sparse_prefill

            with sparse_prefill(self, prefill):
                return self.encode(requests, preset, image_size, video_size, exact_fill, pad_rows=pad_rows)
        if isinstance(requests, EncodeRequest):
            requests = [requests]
        batch, preset_name, lengths = self.prepare(list(requests), preset, image_size, video_size)
        mask = batch["attention_mask"]
        left = bool(mask[:, -1].all()) and not bool(mask.all())
        right = bool(mask[:, 0].all()) and not bool(mask.all())
        key = None
        if self.cache is not None:
            key = digest(batch, self.path, self.name, str(self.dtype), self.cache_tag, pad_rows if left else None)
            hit = self.cache.get(key)
            if hit is not None:
                return HiddenStates(hit.to(self.device), mask, self.name, preset_name, lengths, self.family,
                                    pad_rows if left else None)
        text_only = set(batch) - set(TOKEN_KEYS) == {"input_ids", "attention_mask"}
        if left and exact_fill and self.left_pad_exact and text_only:
            hidden = self.forward_left_padded(batch, pad_rows, preset_name)
        elif left and pad_rows == "reference":
            hidden = self.forward_hidden(batch, unmask_pad_rows=True)
        elif exact_fill and right and self.right_pad_rows_shared:
            hidden = self.forward_right_padded(batch, preset_name if text_only else None)
        else:
            hidden = self.forward_hidden(batch)
        if key is not None and bool(torch.isfinite(hidden).all()):  # a damaged result is never served again
            self.cache.put(key, hidden)
        return HiddenStates(hidden, mask, self.name, preset_name, lengths, self.family, pad_rows if left else None)

    # -- encoding cache -------------------------------------------------------
    cache: EncodeCache | None = None   # set ``encoder.cache = EncodeCache(max_bytes)`` to enable
    cache_tag: Any = None              # anything else that changes the forward (e.g. quantisation, sparse prefill)

    # -- exact prefill savings ------------------------------------------------
    left_pad_exact = False   # a family sets this once tests show its left-pad fill equals the padded forward
    right_pad_rows_shared = False  # ... and this once tests show a prompt's right-pad rows are all equal
    pad_rows = "reference"   # what left-pad rows hold by default (see PAD_ROWS)
    prefix_cache = True      # reuse the fixed opening of each preset's text prompts (see :meth:`prompt_prefix`)

    def constant_pad_rows(self) -> torch.Tensor:
        """``[C, H]``: a left-pad row under ``pad_rows="constant"`` in every layer (a query whose keys are all
        masked attends to nothing, so the row depends on the pad token alone).  Once per device/dtype."""
        key = (str(self.device), self.dtype)
        cache = self.__dict__.setdefault("_pad_rows", {})
        if key not in cache:
            tok = self.processor.tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids = torch.tensor([[pad_id, pad_id, pad_id]])
            probe = {"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1]])}
            cache[key] = self.forward_hidden(probe)[0, :, 0].clone()
        return cache[key]

    def forward_left_padded(self, batch: dict[str, torch.Tensor], pad_rows: str = "reference",
                            preset: str | None = None) -> torch.Tensor:
        """The left-padded forward without running the pads; equals :meth:`forward_hidden` on the full
        padded batch (with ``unmask_pad_rows`` for ``"reference"``) to fp32 round-off.

        Every left pad of a prompt holds one vector per layer (same token, same position 1, same keys).
        ``"reference"``: that vector attends to *every* key of the padded sequence - the prompt's real tokens
        and the pads themselves - so the batch runs as ``[fillers | real tokens | one pad query]``: the real
        rows attend causally to real keys only, and the pad query attends to the real keys and to its own
        key with the pads' multiplicity (a logit bias of ``log(pads)``); fillers (pads of shorter prompts
        inside the cut) only see themselves and are never read.  ``B x (longest + 1)`` tokens instead of
        ``B x 512``.  ``"constant"``: the batch is cut to its longest prompt and the pad rows come from
        :meth:`constant_pad_rows`."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(dim=1)
        longest = int(lengths.max())
        total = ids.shape[1]
        prefix = self._usable_prefix(ids, mask, preset)
        if prefix is not None:
            return self._left_padded_after_prefix(ids, mask, pad_rows, prefix)
        if pad_rows == "constant":
            h = self.forward_hidden({"input_ids": ids[:, -longest:], "attention_mask": mask[:, -longest:]})
            lead = total - longest
            if lead == 0:
                return h
            fill = self.constant_pad_rows().to(h.dtype)[None, :, None, :].expand(h.shape[0], h.shape[1], lead,
                                                                                h.shape[3])
            return torch.cat([fill, h], dim=2)
        pad_id = int(ids[mask == 0][0])
        cut_ids = torch.cat([ids[:, -longest:], torch.full((ids.shape[0], 1), pad_id, dtype=ids.dtype)], dim=1)
        cut_mask = torch.cat([mask[:, -longest:], torch.zeros((ids.shape[0], 1), dtype=mask.dtype)], dim=1)
        h = self.forward_hidden({"input_ids": cut_ids, "attention_mask": cut_mask},
                                mask=pad_query_mask(cut_mask, total - lengths, self.dtype))
        out = h.new_empty(h.shape[0], h.shape[1], total, h.shape[3])
        out[:, :, total - longest:] = h[:, :, :longest]
        for b, n in enumerate(lengths.tolist()):
            out[b, :, :total - n] = h[b, :, longest, None, :]
        return out

    def forward_right_padded(self, batch: dict[str, torch.Tensor], preset: str | None = None) -> torch.Tensor:
        """The right-padded forward without running pads whose result is known.  A right-pad query sees only
        the prompt's real keys (pad keys are masked) at the one position every pad gets, so all pad rows of
        a prompt are the same vector in every layer - it depends on the prompt, so it is computed, once: the
        batch runs cut to its longest prompt plus one pad, and each row's last column is repeated over the
        remaining pads.  Equals :meth:`forward_hidden` on the full padded batch to fp32 round-off."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = int(mask.sum(dim=1).max()) + 1
        if keep >= ids.shape[1]:
            return self.forward_hidden(batch)
        prefix = self._usable_prefix(ids, mask, preset)
        if prefix is not None:
            h = self._right_padded_after_prefix(ids[:, :keep], mask[:, :keep], prefix)
            tail = h[:, :, -1:, :].expand(h.shape[0], h.shape[1], ids.shape[1] - keep, h.shape[3])
            return torch.cat([h, tail], dim=2)
        cut = dict(batch)
        for key in ("input_ids", "attention_mask", *TOKEN_KEYS):
            if key in cut:
                cut[key] = cut[key][:, :keep]
        h = self.forward_hidden(cut)
        tail = h[:, :, -1:, :].expand(h.shape[0], h.shape[1], ids.shape[1] - keep, h.shape[3])
        return torch.cat([h, tail], dim=2)

    # -- the preset's fixed opening ---------------------------------------------
    PREFIX_PROBES = ("Ax", "zebra", "1x", "(x", "'s x", "一x", "éx", "-x", '"x', "x")

    def prompt_prefix(self, preset: str):
        """``(ids [P], hidden [1, C, P, H], per-layer (keys, values))`` of the tokens every text prompt of
        ``preset`` starts with (system message, chat template, the dict's opening), computed once per
        device/dtype - or None.  The opening is the longest common prefix of the token ids of prompts built
        for very different texts (letters, digits, punctuation, CJK, a contraction), so no merge across the
        boundary is assumed; each batch is checked to start with it before it is used.  Its rows and keys are
        what the full forward computes for them: a real token sees only earlier real keys, and the opening
        holds positions 0..P-1 whatever the padding."""
        key = (preset, str(self.device), self.dtype)
        store = self.__dict__.setdefault("_prefixes", {})
        if key not in store:
            for other in [k for k in store if k[1] != key[1]]:  # the model moved (e.g. offloaded): free the old copy
                del store[other]
            rows = [self.processor_inputs(self.build_prompt(EncodeRequest(text=t), preset, None))["input_ids"][0]
                    for t in self.PREFIX_PROBES]
            n = 0
            while n < min(len(r) for r in rows) and all(int(r[n]) == int(rows[0][n]) for r in rows):
                n += 1
            value = None
            if n >= 2:
                ids = rows[0][:n]
                inputs = self._to_device({"input_ids": ids[None], "attention_mask": torch.ones(1, n, dtype=torch.long)})
                inputs.update(self.forward_inputs(inputs))
                with torch.inference_mode():
                    out = self.model(**inputs, use_cache=True, output_hidden_states=True, return_dict=True)
                kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
                value = (ids, torch.stack(out.hidden_states, dim=1), kv)
            # written only once complete: an interrupt (Cancel) inside the forward above leaves no entry, so the
            # next encode computes it again instead of taking the uncached path for the model's lifetime
            store[key] = value
        return store[key]

    def _usable_prefix(self, ids: torch.Tensor, mask: torch.Tensor, preset: str | None):
        """The preset's opening when every prompt of this batch starts with it (and goes on past it)."""
        if not (self.prefix_cache and preset) or self._sparse_active():
            return None
        try:
            found = self.prompt_prefix(preset)
        except X2IInputError:  # a preset that cannot build a text-only probe
            return None
        if found is None:
            return None
        p_ids = found[0]
        n_p = len(p_ids)
        for row, m in zip(ids, mask):
            real = row[m.bool()]
            if len(real) <= n_p or not torch.equal(real[:n_p], p_ids):
                return None
        return found

    def _sparse_active(self) -> bool:
        from .critiprefill import NAME as SPARSE

        cfg = self.text_config()
        return getattr(cfg, "_attn_implementation", None) == SPARSE or getattr(
            self.model.config, "_attn_implementation", None) == SPARSE

    def _forward_after_prefix(self, chunk_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                              bias: torch.Tensor | None, prefix) -> torch.Tensor:
        """The decoder over ``chunk_ids [B, L]`` after the cached opening: ``allowed [B, L, P + L]`` says which
        keys each query sees (``bias``: an additive logit bias of the same shape, or None).  Returns the
        chunk's hidden states ``[B, C, L, H]``."""
        additive = _additive(allowed, self.dtype)
        if bias is not None:
            additive = additive + bias[:, None].to(self.dtype)
        return self.forward_hidden({"input_ids": chunk_ids, "position_ids": positions}, mask=additive, prefix=prefix)

    def _left_padded_after_prefix(self, ids, mask, pad_rows: str, prefix) -> torch.Tensor:
        """:meth:`forward_left_padded` without the opening: rows ``[fillers | real tokens after the opening |
        one pad query]`` (no pad query for ``"constant"``) attend to the cached opening's keys too."""
        n_p = len(prefix[0])
        lengths = mask.sum(dim=1).tolist()
        longest, total, b = max(lengths), ids.shape[1], ids.shape[0]
        query = pad_rows == "reference"
        width = longest - n_p + int(query)
        pad_id = int(ids[mask == 0][0])
        chunk = torch.full((b, width), pad_id, dtype=ids.dtype)
        real = torch.zeros(b, width, dtype=torch.bool)
        positions = torch.ones(b, width, dtype=torch.long)
        for r, n in enumerate(lengths):
            f = longest - n  # fillers
            chunk[r, f:longest - n_p] = ids[r, total - n + n_p:]
            real[r, f:longest - n_p] = True
            positions[r, f:longest - n_p] = torch.arange(n_p, n)
        idx = torch.arange(width)
        causal = idx[None, :, None] >= idx[None, None, :]
        own = (causal & real[:, None, :] & real[:, :, None]) | (idx[:, None] == idx[None, :])[None] & ~real[:, :, None]
        sees_prefix = real.clone()
        bias = None
        if query:
            own[:, -1, :] = real
            own[:, -1, -1] = True
            sees_prefix[:, -1] = True
            bias = torch.zeros(b, width, n_p + width)
            pads = torch.tensor([total - n for n in lengths], dtype=torch.float64)
            bias[:, -1, -1] = torch.log(pads.clamp_min(1)).float()
            own[:, -1, -1] = pads > 0
        allowed = torch.cat([sees_prefix[:, :, None].expand(b, width, n_p), own], dim=2)
        h = self._forward_after_prefix(chunk, positions, allowed, bias, prefix)
        out = h.new_empty(b, h.shape[1], total, h.shape[3])
        p_hidden = prefix[1].to(h.dtype)
        for r, n in enumerate(lengths):
            f = longest - n
            out[r, :, total - n:total - n + n_p] = p_hidden[0]
            out[r, :, total - n + n_p:] = h[r, :, f:longest - n_p]
            if n < total:
                fill = h[r, :, -1] if query else self.constant_pad_rows().to(h.dtype)
                out[r, :, :total - n] = fill[:, None, :]
        return out

    def _right_padded_after_prefix(self, ids, mask, prefix) -> torch.Tensor:
        """:meth:`forward_right_padded`'s cut batch ``[real | pads]`` without the opening."""
        n_p = len(prefix[0])
        b, keep = ids.shape
        chunk, real = ids[:, n_p:], mask[:, n_p:].bool()
        width = keep - n_p
        positions = torch.ones(b, width, dtype=torch.long)
        for r, n in enumerate(mask.sum(dim=1).tolist()):
            positions[r, :n - n_p] = torch.arange(n_p, n)
        idx = torch.arange(width)
        causal = (idx[:, None] >= idx[None, :])[None]
        allowed = torch.cat([torch.ones(b, width, n_p, dtype=torch.bool), causal & real[:, None, :]], dim=2)
        h = self._forward_after_prefix(chunk, positions, allowed, None, prefix)
        return torch.cat([prefix[1].to(h.dtype).expand(b, -1, -1, -1), h], dim=2)

    def encode_text(self, text: str | Sequence[str], preset: str | None = None, **options) -> HiddenStates:
        """Text prompts; ``options`` as for :meth:`encode` (``exact_fill``, ``prefill``, ``pad_rows``)."""
        texts = [text] if isinstance(text, str) else list(text)
        return self.encode([EncodeRequest(text=t) for t in texts], preset, **options)

    # -- reasoning ----------------------------------------------------------
    def generate_answer(self, request: EncodeRequest, *, max_new_tokens: int = 128, temperature: float = 0.0,
                        seed: int = 0, image_size: int | None = None, answer: str = "states",
                        preset: str | None = None, video_size: int | None = None) -> tuple[str, HiddenStates]:
        """Reasoning -> image: the MLLM answers the prompt first, then the answer is what gets encoded.

        The question is asked as the reference scripts ask it (plain user text with its media, chat
        template, generation prompt, no padding).  ``answer="states"`` (the reference's "use answer"):
        the hidden states of the answer tokens, every layer, in the context of the question.
        ``answer="text"``: the answer text re-encoded alone as a new prompt with ``preset``.
        """
        if max_new_tokens < 1:
            raise X2IInputError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
        if temperature < 0:
            raise X2IInputError(f"temperature is {temperature}; expected 0 (greedy) or more")
        if answer not in ("states", "text"):
            raise X2IInputError(f"answer mode {answer!r}; expected 'states' or 'text'")
        # No padding and no cut for generation: the whole question, then the generation prompt (a question cut at
        # the preset's 512 tokens lost its generation prompt, and the answer was sliced at the uncut length).
        batch, _, lengths = self.prepare([request], "scripts", image_size, video_size, pad=False)
        n = lengths[0]
        inputs = self._to_device(batch)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "min_new_tokens": 1, "use_cache": True}
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        tok = self.processor.tokenizer
        stop = {t for t in (tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}
        stop.discard(getattr(tok, "unk_token_id", None))
        devices = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            with torch.inference_mode():
                out = self.generator().generate(**inputs, **gen_kwargs, eos_token_id=sorted(stop),
                                                pad_token_id=tok.pad_token_id)
        new = out[0, n:].to("cpu")
        keep = len(new)
        while keep and int(new[keep - 1]) in stop:
            keep -= 1
        new = new[:keep]
        text = tok.decode(new, skip_special_tokens=True).strip()
        if keep == 0 or (answer == "text" and not text):
            raise X2IInputError(
                f"{self.name} produced no answer{' text' if keep else ' tokens'} (it ended its turn at once); raise "
                "max_new_tokens, set a temperature above 0 or rephrase the question")
        if answer == "text":
            return text, self.encode(EncodeRequest(text=text), preset=preset)  # text only: auto = training
        full = with_tokens(batch, torch.cat([batch["input_ids"], new[None]], dim=1))
        hidden = self.forward_hidden(full)[:, :, n:]
        mask = torch.ones(1, keep, dtype=torch.long)
        return text, HiddenStates(hidden, mask, self.name, "answer", [keep], self.family)

    def reference_multi_turn(self, request: EncodeRequest, *, max_new_tokens: int = 64,
                             image_size: int | None = None) -> tuple[str, HiddenStates]:
        """The reference's multi-turn recipe (its ``infer/inference_multi_turn.py``) for the conversation's last
        user turn: the whole conversation - every user turn = its images at 256x256 (then qwen-vl-utils'
        resize) and the comfyui-style dict, earlier answers as assistant turns - without padding; the MLLM
        answers with the folder's own generation settings (at most ``max_new_tokens``, as ``generate()`` is
        called there); the AlignNet gets the prompt's states followed by the answer's (every generated token
        but the last, which ``generate()`` never feeds back).  Returns the answer text (put it in the next
        turn's history as the assistant turn) and the states."""
        if max_new_tokens < 1:
            raise X2IInputError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
        batch, _, lengths = self.prepare([request], "multiturn", image_size)
        n = lengths[0]
        with torch.inference_mode():
            out = self.generator().generate(**self._to_device(batch), max_new_tokens=int(max_new_tokens))
        new = out[0, n:].to("cpu")
        answer = self.processor.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        full = with_tokens(batch, torch.cat([batch["input_ids"], new[None, :-1].to(batch["input_ids"].dtype)], dim=1))
        hidden = self.forward_hidden(full)
        mask = torch.ones(1, hidden.shape[2], dtype=torch.long)
        return answer, HiddenStates(hidden, mask, self.name, "multiturn", [hidden.shape[2]], self.family)

    def generator(self):
        """The module whose ``generate`` answers questions (the full model with its LM head)."""
        return self.module


PAD_ROWS = {
    "reference": "left pads attend to every key of the padded sequence, as transformers 4.49 with SDPA computed "
                 "them on CUDA - the rows the released AlignNets were trained on (they depend on the prompt)",
    "constant": "left pads attend to nothing, as transformers >= 4.5x computes them (one prompt-independent row "
                "per layer); for AlignNets distilled that way",
}


def check_pad_rows(value: str) -> str:
    if value not in PAD_ROWS:
        raise X2IInputError(f"pad_rows {value!r} is unknown; expected one of {sorted(PAD_ROWS)}")
    return value


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, S]`` booleans -> ``[B, 1, S, S]`` additive mask (0 / the dtype's minimum, as 4.49 builds it)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def unmasked_causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal + key-padding mask in which a query with no visible key sees every key (transformers 4.49's
    ``AttentionMaskConverter._unmask_unattended``, which its SDPA path applied on CUDA)."""
    size = mask.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return _additive(allowed, dtype)


def pad_query_mask(mask: torch.Tensor, pads: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask of :meth:`ChatEncoder.forward_left_padded` for ``[fillers | real | pad query]`` rows:
    real rows see earlier real keys; the pad query (last column) sees the real keys and itself with a
    ``log(pads)`` bias, standing for ``pads`` identical pad keys; fillers see only themselves."""
    size = mask.shape[1]
    real = mask.bool()
    eye = torch.eye(size, dtype=torch.bool, device=mask.device)[None]
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).tril()[None]
    allowed = (causal & real[:, None, :] & real[:, :, None]) | (eye & ~real[:, :, None])
    allowed[:, -1, :] = real
    has_pads = pads > 0
    allowed[:, -1, -1] = has_pads
    additive = _additive(allowed, dtype)
    bias = torch.log(pads.clamp_min(1).to(torch.float64)).to(dtype)
    additive[:, 0, -1, -1] = torch.where(has_pads, bias, additive[:, 0, -1, -1])
    return additive
