"""The prompt side of an X2I MLLM: chat turns with their media -> the preset's templated prompt -> processor
inputs padded per preset (no model).  :class:`ChatPrompt` is used by every transformers encoder
(``ChatEncoder`` derives from it) and by ComfyUI's native Qwen2.5-VL node, which has a tokenizer and a
processor but no transformers model.

A user of the mixin sets ``processor``, ``name`` and ``modalities`` (and may set ``system_prompt``,
``placeholders``, ``max_audio_seconds``) and provides ``media_token_ids()``; families override the hooks
(``chat_kwargs``, ``processor_inputs``, ``audio_rate``, ``max_positions``, ``build_prompt``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import torch

from .. import registry
from ..audio import prepare_audio
from ..errors import X2IInputError
from ..media import (
    IMAGE_FACTOR,
    MIN_PIXELS,
    as_video_list,
    declared_image_sizes,
    declared_video,
    fitted_pixels,
    image_items,
    smart_resize,
    to_pil,
    video_tokens,
)
from ..prompt import (
    Turn,
    build_conversation,
    fit_image,
    fitted_image_size,
    resolve_preset,
    target_length,
    with_image_size,
)
from .base import ChatTurn, EncodeRequest

log = logging.getLogger("x2i")

MODALITY_NAMES = {"image": "images", "video": "video", "audio": "audio"}


class ChatPrompt:
    """Builds and pads X2I prompts for one family's processor (see the module docstring)."""

    modalities = frozenset({"text", "image", "video"})
    system_prompt: str | None = None      # a system message the family requires in every prompt
    placeholders: tuple[str, ...] = ()    # the family's media tokens, refused in user text
    max_audio_seconds = 300.0

    # -- hooks --------------------------------------------------------------
    def media_token_ids(self) -> set[int]:
        raise NotImplementedError

    def max_positions(self) -> int | None:
        """The longest input the decoder takes, or None if unknown."""
        return None

    def chat_kwargs(self, spec) -> dict[str, Any]:
        return {}

    def audio_rate(self) -> int:
        fe = getattr(self.processor, "feature_extractor", None)
        return int(getattr(fe, "sampling_rate", 16000))

    def processor_inputs(self, built) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [built.text], "padding": False, "return_tensors": "pt"}
        if built.images:
            kwargs["images"] = built.images
        if built.videos:
            # Frames are *sampled* at spec.video_fps; the processor keeps its default rate (2.0, so
            # second_per_grid_ts = 1.0), as the reference calls it.
            kwargs["videos"] = built.videos
        if built.audios:
            kwargs["audio"] = built.audios
        out = dict(self.processor(**kwargs))
        if built.videos and "second_per_grid_ts" in out:
            # Seconds per temporal grid step as 4.x's processor computed it for the reference: its default rate
            # of 2 fps, temporal_patch_size / 2.0 per video (transformers 5 takes 24 fps when given no
            # metadata, which moves every video's time positions).
            step = getattr(self.processor.video_processor, "temporal_patch_size", 2) / 2.0
            out["second_per_grid_ts"] = torch.full((len(built.videos),), float(step), dtype=torch.float32)
        return out

    # -- prompt -------------------------------------------------------------
    def _check_modalities(self, i: int, turn: ChatTurn, images, videos, audios) -> None:
        given = [m for m, items in (("image", images), ("video", videos), ("audio", audios)) if items]
        for m in given:
            if m not in self.modalities:
                supported = sorted(self.modalities - {"text"})
                others = [f.display for f in registry.families_with(m, remote_code=False)]
                raise X2IInputError(
                    f"prompt {i + 1}: {MODALITY_NAMES[m]} given, but {self.name} does not take {MODALITY_NAMES[m]} "
                    f"(it takes text{''.join(', ' + MODALITY_NAMES[s] for s in supported)}); "
                    + (f"load an audio-capable MLLM such as {' or '.join(others)}" if m == "audio" else
                       f"load an MLLM that supports it ({', '.join(others)})")
                )

    def build_prompt(self, req: EncodeRequest, preset: str | None, image_size: int | None, index: int = 0,
                     video_size: int | None = None):
        """The templated prompt and processed media for one request (no tokenisation).  The media's token cost
        is computed from their declared sizes and checked (:meth:`check_media_budget`) before any image is
        converted; each image is then converted and resized one at a time."""
        turns_in = _turns_of(req)
        for t in turns_in:
            if t.role not in ("user", "assistant"):
                raise X2IInputError(f"prompt {index + 1}: chat turn role {t.role!r}; expected 'user' or 'assistant'")
        declared = [(declared_image_sizes(t.images), [(*declared_video(v), fitted_pixels(v))
                                                       for v in as_video_list(t.videos)]) for t in turns_in]
        has_media = any(ims or vids or _as_list(t.audios) for t, (ims, vids) in zip(turns_in, declared))
        spec = with_image_size(resolve_preset(preset, has_media), image_size, video_size)
        self.check_media_budget(index, spec, [s for ims, _ in declared for s in ims],
                                [v for _, vids in declared for v in vids])
        turns: list[Turn] = []
        for t in turns_in:
            images = []
            for raw, label in image_items(t.images, "image"):
                self.interrupted()
                images.append(fit_image(to_pil(raw, label), spec))
            self.interrupted()
            videos = [v if fitted_pixels(v) else list(v) for v in as_video_list(t.videos)]
            audios = [prepare_audio(a, self.audio_rate(), f"audio {j + 1}", self.max_audio_seconds)
                      for j, a in enumerate(_as_list(t.audios))]
            self._check_modalities(index, t, images, videos, audios)
            if t.text is not None and not isinstance(t.text, str):
                raise X2IInputError(f"prompt {index + 1}: text must be a string, found {type(t.text).__name__}")
            turns.append(Turn(t.role, t.text, images, videos, audios, t.instruction, fitted=True))
        return build_conversation(turns, spec, self.processor, self.chat_kwargs(spec), self.system_prompt,
                                  self.placeholders)

    # -- budgets and Cancel ----------------------------------------------------
    interrupt_check = None  # a callable that raises to cancel (ComfyUI's Cancel), set by the host around an encode

    def interrupted(self) -> None:
        """Give the host's Cancel a chance between steps of the prompt side (per image, before the processor)."""
        if self.interrupt_check is not None:
            self.interrupt_check()

    def token_budget(self) -> tuple[int, str]:
        """The most tokens a prompt may take, and why: the decoder's positions, and X2I's own ceiling
        (``X2I_TOKEN_BUDGET``, 32768 by default: what one 24 GB GPU encodes with the released 7B MLLMs)."""
        budget, why = token_budget_setting(), "X2I's token budget (environment variable X2I_TOKEN_BUDGET)"
        limit = self.max_positions()
        if limit and int(limit) <= budget:  # where both agree, the model's own limit (no setting raises it)
            budget, why = int(limit), f"{self.name} takes at most {int(limit)} positions (max_position_embeddings)"
        return budget, why

    def image_tokens(self, width: int, height: int, spec) -> int:
        """Tokens of one image of this size under ``spec`` (Qwen2.5-VL's rule: one token per 28 x 28 pixels after
        the preset's resize and the processor's own pixel ceiling)."""
        w, h = fitted_image_size(width, height, spec)
        ceiling = _processor_max_pixels(getattr(self.processor, "image_processor", None))
        if ceiling and h * w > ceiling:
            h, w = smart_resize(h, w, IMAGE_FACTOR, MIN_PIXELS, ceiling)
        return (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR)

    def video_tokens(self, frames: int, height: int, width: int, spec, fitted: int | None = None) -> int:
        """Tokens of one clip of ``frames`` sampled frames (frames go in pairs, one token per 28 x 28 pixels);
        ``fitted``: the budget the frames were already resized for as they decoded."""
        return video_tokens(frames, height, width, spec.video_max_pixels, fitted == spec.video_max_pixels)

    def check_media_budget(self, index: int, spec, image_sizes: list[tuple[int, int]],
                           videos: list[tuple[int, int, int, int | None]]) -> None:
        """Refuse a prompt whose images and video frames alone need more tokens than :meth:`token_budget`, from
        their declared sizes, before anything is converted, processed or run (numbers and widgets named)."""
        if not image_sizes and not videos:
            return
        img = [self.image_tokens(w, h, spec) for w, h in image_sizes]
        vid = [self.video_tokens(t, h, w, spec, fitted) for t, h, w, fitted in videos]
        need = sum(img) + sum(vid)
        budget, why = self.token_budget()
        if need <= budget:
            return
        parts = []
        if img:
            parts.append(f"{len(img)} image(s): {sum(img)} tokens" + (f" ({img[0]} each)" if len(set(img)) == 1 else ""))
        if vid:
            parts.append(f"{len(vid)} video(s), {sum(v[0] for v in videos)} frames: {sum(vid)} tokens")
        raise X2IInputError(
            f"prompt {index + 1}: its media alone need {need} tokens ({'; '.join(parts)}), more than {budget}, "
            f"{why}. Lower image_resolution or connect fewer images; for video lower max_frames, video_fps or "
            "video_resolution")

    def prepare(self, requests: Sequence[EncodeRequest], preset: str | None = None, image_size: int | None = None,
                video_size: int | None = None, pad: bool = True) -> tuple[dict[str, torch.Tensor], str, list[int]]:
        """Processor inputs for a batch, padded per the preset (no forward pass).  ``pad=False``: the prompts as
        they are (one prompt, or prompts of one length), neither padded nor cut - what generation asks with.

        A chat under a fixed-length preset ('training': 512 tokens) that is too long loses its oldest turns, never
        its last: the prompt to draw is what the user wrote last.  Where the last turn alone is too long, it is
        refused with the numbers.  A single prompt is cut at the preset's length, as the reference's training did."""
        if not requests:
            raise X2IInputError("no prompt given; expected at least one text/image/video/audio prompt")
        tok = self.processor.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        per_prompt = []
        spec = None
        for i, req in enumerate(requests):
            built = self.build_prompt(req, preset, image_size, i, video_size)
            if spec is not None and built.spec != spec:
                raise X2IInputError(
                    "a batch mixes text-only prompts and prompts with media under preset 'auto'; "
                    "choose one preset explicitly ('comfyui' or 'scripts') for the whole batch"
                )
            spec = built.spec
            self.interrupted()
            enc = self.processor_inputs(built)
            if pad and spec.truncate and req.history and int(enc["input_ids"].shape[1]) > spec.min_length:
                enc = self._fit_chat(req, preset, image_size, i, video_size, spec, int(enc["input_ids"].shape[1]))
            per_prompt.append(enc)
        lengths = [int(e["input_ids"].shape[1]) for e in per_prompt]
        if pad:
            target = max(target_length(spec, n) for n in lengths)
        elif len(set(lengths)) == 1:
            target = lengths[0]
        else:
            raise X2IInputError(f"prompts of different lengths {lengths} cannot be batched without padding")
        budget, why = self.token_budget()
        if target > budget:  # the model's positions or X2I's budget: token ids are all that exists yet
            longest = max(range(len(lengths)), key=lambda i: lengths[i])
            raise X2IInputError(
                f"prompt {longest + 1} is {lengths[longest]} tokens (padded to {target} by the '{spec.name}' "
                f"preset), more than {budget}, {why}. Shorten the text or the chat, use the 'training' preset "
                "(512 tokens), fewer or smaller images, fewer video frames or shorter audio")
        media_ids = self.media_token_ids()
        ids_rows, mask_rows = [], []
        token_rows: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KEYS if k in per_prompt[0]}
        for i, (enc, n) in enumerate(zip(per_prompt, lengths)):
            ids = enc["input_ids"][0]
            if n > target:
                kept = ids[:target]
                if any(int((ids == m).sum()) != int((kept == m).sum()) for m in media_ids):
                    raise X2IInputError(
                        f"prompt {i + 1} is {n} tokens with its media, more than the '{spec.name}' preset's "
                        f"fixed {target}; use the 'comfyui' preset (its length grows with the prompt), "
                        "fewer or smaller images, fewer video frames, shorter audio, or shorter text"
                    )
                log.warning("prompt %d is %d tokens; truncated to %d as the '%s' preset does", i + 1, n, target, spec.name)
                ids = kept
            pad = torch.full((target - ids.shape[0],), pad_id, dtype=ids.dtype)
            mask = torch.ones(ids.shape[0], dtype=torch.long)
            zeros = torch.zeros(pad.shape[0], dtype=torch.long)
            left = spec.padding_side == "left"
            ids_rows.append(torch.cat([pad, ids] if left else [ids, pad]))
            mask_rows.append(torch.cat([zeros, mask] if left else [mask, zeros]))
            for key, rows in token_rows.items():  # per-token processor outputs follow the ids (0 on pads)
                row = torch.as_tensor(enc[key])[0][:ids.shape[0]]
                fill = torch.zeros(pad.shape[0], dtype=row.dtype)
                rows.append(torch.cat([fill, row] if left else [row, fill]))
        batch: dict[str, torch.Tensor] = {"input_ids": torch.stack(ids_rows), "attention_mask": torch.stack(mask_rows)}
        batch.update({key: torch.stack(rows) for key, rows in token_rows.items()})
        batch.update(_collate_media(per_prompt))
        return batch, spec.name, lengths

    def _fit_chat(self, req, preset, image_size, index, video_size, spec, full: int):
        """The chat ``req`` (``full`` tokens) without its oldest turns (a user turn and the answers after it at a
        time) until it fits the fixed ``spec.min_length``; its processor inputs.  Refuses when the last user turn
        alone does not fit."""
        history = list(req.history)
        dropped = 0
        while history:
            del history[0]
            dropped += 1
            while history and history[0].role != "user":  # a chat starts with a user turn
                del history[0]
                dropped += 1
            trial = dataclasses.replace(req, history=history)
            if not (trial.text is not None or trial.images is not None or trial.videos is not None
                    or trial.audios is not None) and not history:
                break  # the last history turn was the prompt itself
            enc = self.processor_inputs(self.build_prompt(trial, preset, image_size, index, video_size))
            n = int(enc["input_ids"].shape[1])
            if n <= spec.min_length:
                log.warning("prompt %d: the chat is %d tokens, more than the '%s' preset's fixed %d; dropped its %d "
                            "oldest turn(s) so that the last turn is kept whole (%d tokens now)", index + 1, full,
                            spec.name, spec.min_length, dropped, n)
                return enc
        raise X2IInputError(
            f"prompt {index + 1}: the chat's last turn alone is more than the '{spec.name}' preset's fixed "
            f"{spec.min_length} tokens (the whole chat is {full}); shorten that turn, or use the 'comfyui' preset "
            "(its length grows with the prompt)")


def token_budget_setting() -> int:
    """``X2I_TOKEN_BUDGET`` (the default when unset), checked."""
    raw = os.environ.get("X2I_TOKEN_BUDGET", "")
    if not raw.strip():
        return DEFAULT_TOKEN_BUDGET
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise X2IInputError(f"X2I_TOKEN_BUDGET is {raw!r}; expected a whole number of tokens above 0 "
                            f"(default {DEFAULT_TOKEN_BUDGET})")
    return value


DEFAULT_TOKEN_BUDGET = 32768


def _processor_max_pixels(image_processor) -> int | None:
    """The image processor's own pixel ceiling (4.x ``max_pixels``, 5.x ``size['longest_edge']``), if it has one."""
    if image_processor is None:
        return None
    value = getattr(image_processor, "max_pixels", None)
    size = getattr(image_processor, "size", None)  # a dict on 4.x, a SizeDict on 5.x
    for key in ("longest_edge", "max_pixels"):
        if value is None and size is not None:
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _turns_of(req: EncodeRequest) -> list[ChatTurn]:
    turns = list(req.history or [])
    has_own = req.text is not None or req.images is not None or req.videos is not None or req.audios is not None
    if has_own or not turns:
        turns.append(ChatTurn("user", req.text, req.images, req.videos, req.audios, req.instruction))
    elif req.instruction is not None and turns[-1].role == "user":
        last = turns[-1]
        turns[-1] = ChatTurn("user", last.text, last.images, last.videos, last.audios, req.instruction)
    return turns


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)) and not (len(x) == 2 and isinstance(x[1], (int, float))):
        return list(x)
    return [x]


# Processor outputs with one entry per token (transformers 5's processors add ``mm_token_type_ids``: 0 text,
# 1 image, 2 video, ...); they are padded and cut with the ids, never concatenated like media tensors.
TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")


def with_tokens(batch: dict[str, Any], input_ids: torch.Tensor) -> dict[str, Any]:
    """``batch`` over new ``input_ids`` that start with its own (e.g. a prompt cut to its real tokens, or a prompt
    followed by an answer): the attention mask is all ones and per-token keys are cut or extended with 0 (text)."""
    out = dict(batch)
    n = input_ids.shape[1]
    out["input_ids"], out["attention_mask"] = input_ids, torch.ones_like(input_ids)
    for key in TOKEN_KEYS:
        if key in out:
            row = out[key][:, :n]
            out[key] = torch.cat([row, row.new_zeros(row.shape[0], n - row.shape[1])], dim=1)
    return out


def _collate_media(per_prompt: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate the processors' media tensors of several prompts along their first dimension."""
    out: dict[str, torch.Tensor] = {}
    keys = []
    for e in per_prompt:
        keys.extend(k for k in e if k not in ("input_ids", "attention_mask", *TOKEN_KEYS) and k not in keys)
    for key in keys:
        parts = [e[key] for e in per_prompt if e.get(key) is not None]
        if not parts:
            continue
        parts = [p if isinstance(p, torch.Tensor) else torch.as_tensor(p) for p in parts]
        if key == "second_per_grid_ts":
            parts = [p.to(torch.float32).reshape(-1) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out
