"""The X2I prompt: chat message, media placement and padding, in one place.

Three presets reproduce the three conventions of the reference code:

``training``  What the released AlignNets were distilled on.  The user text
              goes into ``str({'Text input': text, 'Instruction editing
              description': 'no', 'image input': 'no'})`` as the only item of
              one user message; chat template with generation prompt; **left**
              padding to exactly 512 tokens (longer prompts are truncated at
              the end, as in training).  Text only.
``comfyui``   The reference ComfyUI nodes.  Same dict with ``''`` for the
              description and ``'image input': 'yes'`` when media are given;
              media items come first (images with a 224x224 pixel budget,
              videos 128x128 at 1 fps), no vision ids (the nodes ask for
              "Picture 1: " but transformers 4.49 never passed that flag to
              the template); **right** padding to ``max(int(1.3 * length), 512)``.
``scripts``   The reference inference scripts.  The plain user text; images
              resized to exactly 128x128, video frames with a 128x128 budget;
              **right** padding to 512 with truncation.

Default (``auto``): ``training`` for text-only prompts, since that is the
distribution the AlignNet was trained on; ``comfyui`` when images or videos
are given (the training preset has no media).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from .errors import X2IInputError
from .media import IMAGE_FACTOR, MIN_PIXELS, fit_pixels, smart_resize, video_frames

PRESETS = ("training", "comfyui", "scripts")
VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
DEFAULT_PRESET = "auto"

# The Qwen2.5-VL chat template (the format, reproduced: system prompt, vision
# placeholders, optional "Picture N: " ids, generation prompt).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    name: str
    padding_side: str           # "left" or "right"
    min_length: int             # pad to at least this many tokens
    grow: float | None          # pad to max(int(grow * length), min_length) when set
    truncate: bool              # truncate to min_length (fixed length)
    image_max_pixels: int | None  # pixel budget for images (smart resize), or None
    image_exact_size: tuple[int, int] | None  # exact (w, h) resize, or None
    video_max_pixels: int
    video_fps: float
    vision_ids: bool


SPECS = {
    "training": PresetSpec("training", "left", 512, None, True, None, None, 128 * 128, 1.0, False),
    # vision_ids False: the reference nodes ask for add_vision_id, but transformers 4.49's processor does not
    # pass it to the template, so no "Picture N: " was ever written (tests/test_reference_oracle.py).
    "comfyui": PresetSpec("comfyui", "right", 512, 1.3, False, 224 * 224, None, 128 * 128, 1.0, False),
    "scripts": PresetSpec("scripts", "right", 512, None, True, None, (128, 128), 128 * 128, 1.0, False),
    # The reference multi-turn script (infer/inference_multi_turn.py): every user turn = its images resized to
    # 256x256 and then fetched by qwen-vl-utils (smart resize to 252x252) + the comfyui-style dict; no padding.
    # Used with ChatEncoder.reference_multi_turn, which also generates the answer; not a node preset.
    "multiturn": PresetSpec("multiturn", "right", 0, None, False, 16384 * 28 * 28, (256, 256), 128 * 128, 1.0,
                            False),
}


def resolve_preset(preset: str | None, has_media: bool) -> PresetSpec:
    name = (preset or DEFAULT_PRESET).lower()
    if name == "auto":
        name = "comfyui" if has_media else "training"
    if name not in SPECS:
        raise X2IInputError(f"prompt preset {preset!r} is unknown; expected 'auto' or one of {list(PRESETS)}")
    if name == "training" and has_media:
        raise X2IInputError(
            "prompt preset 'training' is text-only (the AlignNet was trained on captions); "
            "use 'comfyui' or 'scripts' (or 'auto') for prompts with images or video"
        )
    return SPECS[name]


def with_image_size(spec: PresetSpec, size: int | None, video_size: int | None = None) -> PresetSpec:
    """Override the preset's image resolution: a ``size x size`` pixel budget for
    budget presets (``comfyui``), an exact ``size x size`` resize for ``scripts``;
    ``video_size`` sets the per-frame pixel budget (``video_size x video_size``)."""
    for value, what in ((size, "image"), (video_size, "video")):
        if value and value < 28:
            raise X2IInputError(f"{what} resolution {value} is too small; expected 0 (preset default) or at least 28 pixels")
    if video_size:
        spec = dataclasses.replace(spec, video_max_pixels=video_size * video_size)
    if not size:
        return spec
    if spec.image_exact_size is not None:
        return dataclasses.replace(spec, image_exact_size=(size, size))
    return dataclasses.replace(spec, image_max_pixels=size * size)


def instruction_dict(text: str | None, spec: PresetSpec, has_media: bool, instruction: str | None = None) -> str:
    """``str()`` of the reference's instruction dict (Python repr, single quotes).

    ``instruction`` fills the "Instruction editing description" field (image+text
    editing); without it the field is ``'no'`` (training) or ``''`` (comfyui).
    """
    if spec.name == "training":
        d = {"Text input": text, "Instruction editing description": instruction or "no", "image input": "no"}
    else:
        d = {
            "Text input": "" if text is None else text,
            "Instruction editing description": instruction or "",
            "image input": "yes" if has_media else "no",
        }
    return str(d)


@dataclasses.dataclass
class Turn:
    """One chat turn with its media already decoded (RGB images, frame lists, mono audio arrays)."""

    role: str                                  # "user" or "assistant"
    text: str | None = None
    images: list[Image.Image] = dataclasses.field(default_factory=list)
    videos: list[list[Any]] = dataclasses.field(default_factory=list)
    audios: list[Any] = dataclasses.field(default_factory=list)
    instruction: str | None = None             # the "Instruction editing description" field
    fitted: bool = False                       # images already resized for the preset (fit_image)


@dataclasses.dataclass
class BuiltPrompt:
    text: str                        # the templated prompt string
    images: list[Image.Image]        # processed images, in prompt order
    videos: list[list[Image.Image]]  # processed frame lists
    spec: PresetSpec
    templated: bool = True
    audios: list[Any] = dataclasses.field(default_factory=list)  # mono arrays at the model's rate


def _check_placeholders(text: str | None, spec: PresetSpec, single_turn: bool, extra: tuple[str, ...] = ()) -> None:
    placeholders = [t for t in (*VISION_PLACEHOLDERS, *extra) if text and t in text]
    both_pads = (single_turn and spec.name == "comfyui" and "<|image_pad|>" in placeholders
                 and "<|video_pad|>" in placeholders)
    if placeholders and not both_pads:
        raise X2IInputError(
            f"prompt text contains the MLLM's vision placeholder token(s) {placeholders}; they are inserted for "
            "connected images/videos automatically - remove them from the text")


def _check_has_words(text: str, processor) -> None:
    """A prompt made only of whitespace and the tokenizer's special tokens has nothing to draw (and its
    control tokens would end the chat turn early): refuse it, naming what was found."""
    tok = getattr(processor, "tokenizer", None)
    specials = sorted({*getattr(tok, "all_special_tokens", ()), *getattr(tok, "added_tokens_encoder", {})},
                      key=len, reverse=True) if tok is not None else []
    rest = text
    for t in specials:
        if t:
            rest = rest.replace(t, " ")
    if text.strip() and not rest.strip():
        found = [t for t in specials if t and t in text][:6]
        raise X2IInputError(
            f"prompt text {text[:80]!r} holds only the MLLM's special tokens {found}; expected words describing "
            "the image (special tokens are control symbols of the chat template, not content)")
    if not text.strip():
        raise X2IInputError("prompt text is empty (only whitespace); give a caption, or connect an image, video "
                            "or audio")


def build_conversation(turns: list[Turn], spec: PresetSpec, processor, chat_kwargs: dict[str, Any] | None = None,
                       system: str | None = None, placeholders: tuple[str, ...] = ()) -> BuiltPrompt:
    """Build the prompt exactly as the reference does for ``spec``.

    The last turn is the prompt proper and must be a user turn: its text goes
    through the preset (the instruction dict for ``training``/``comfyui``,
    plain for ``scripts``).  Earlier turns (multi-turn chats) are rendered as
    plain chat messages with their media, so the MLLM reads the whole
    conversation.  In every user turn media come before the text (images,
    then videos, then audio), as the reference nodes place them.  ``system``:
    a system message some families require (Qwen2.5-Omni's default);
    ``placeholders``: the family's own media tokens, refused in user text.
    """
    _check_conversation(turns, spec, processor, placeholders)
    last, single = turns[-1], len(turns) == 1
    final_media = bool(last.images or last.videos or last.audios)
    media = _Media([], [], [])
    messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    for ti, turn in enumerate(turns):
        if turn.role == "user":
            content = _user_media(turn, spec, media)
        elif turn.images or turn.videos or turn.audios:
            raise X2IInputError(f"chat turn {ti + 1} is an assistant turn with media; media belong in user turns")
        else:
            content = []
        is_last = ti == len(turns) - 1
        text_item = _turn_text(turn, last, is_last, spec, final_media)
        if is_last and single and spec.name == "comfyui" and last.text and "<|image_pad|>" in last.text \
                and "<|video_pad|>" in last.text:
            # The reference nodes skip the chat template when the user text already
            # carries both vision placeholders.
            return BuiltPrompt(text_item, media.images, media.videos, spec, templated=False, audios=media.audios)
        if text_item is not None:
            content.append({"type": "text", "text": text_item})
        messages.append({"role": turn.role, "content": content})
    kwargs = dict(chat_kwargs or {})
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return BuiltPrompt(prompt, media.images, media.videos, spec, audios=media.audios)


def _check_conversation(turns: list[Turn], spec: PresetSpec, processor, placeholders: tuple[str, ...]) -> None:
    """The checks before building: a last user turn with something to encode, the preset's modalities, no
    family media tokens typed into the text."""
    if not turns:
        raise X2IInputError("the conversation has no turns; add at least one user turn")
    last = turns[-1]
    if last.role != "user":
        raise X2IInputError("the conversation ends with an assistant turn; add a user turn after it "
                            "(the prompt that X2I encodes is the last user turn in context)")
    final_media = bool(last.images or last.videos or last.audios)
    any_media = any(t.images or t.videos or t.audios for t in turns)
    if last.text is not None and not final_media and not (last.instruction and not last.text.strip()):
        _check_has_words(last.text, processor)
    if spec.name == "training":
        if any_media:
            raise X2IInputError("prompt preset 'training' is text-only; use 'comfyui' or 'scripts' (or 'auto') "
                                "for prompts with images, video or audio")
        if not last.text:
            raise X2IInputError("prompt text is empty; the 'training' preset needs a caption")
    elif not last.text and not final_media and not last.instruction:
        raise X2IInputError("prompt is empty: give text, an image, a video or audio")
    single = len(turns) == 1
    for t in turns:
        _check_placeholders(t.text, spec, single, placeholders)
        _check_placeholders(t.instruction, spec, False, placeholders)


@dataclasses.dataclass
class _Media:
    """The media handed to the processor, in prompt order."""
    images: list[Image.Image]
    videos: list[list[Image.Image]]
    audios: list[Any]


def _user_media(turn: Turn, spec: PresetSpec, media: _Media) -> list[dict[str, Any]]:
    """A user turn's media content items (images, then videos, then audio), resized as the preset does."""
    content: list[dict[str, Any]] = []
    for img in turn.images:
        im = img if turn.fitted else fit_image(img, spec)
        media.images.append(im)
        content.append({"type": "image", "image": im})
    for frames in turn.videos:
        vf = video_frames(frames, spec.video_max_pixels, name=f"video {len(media.videos) + 1}")
        media.videos.append(vf)
        content.append({"type": "video", "video": vf})
    for audio in turn.audios:
        media.audios.append(audio)
        content.append({"type": "audio", "audio": audio})
    return content


def fit_image(img: Image.Image, spec: PresetSpec) -> Image.Image:
    """An image resized as ``spec`` does before the processor (an exact resize, then a pixel budget)."""
    if spec.image_exact_size is not None:
        img = img.resize(spec.image_exact_size, resample=Image.BICUBIC)
    if spec.image_max_pixels is not None:
        img = fit_pixels(img, spec.image_max_pixels)
    return img


def fitted_image_size(width: int, height: int, spec: PresetSpec) -> tuple[int, int]:
    """The ``(width, height)`` that :func:`fit_image` gives an image of that size, without the image."""
    if spec.image_exact_size is not None:
        width, height = spec.image_exact_size
    if spec.image_max_pixels is not None:
        height, width = smart_resize(height, width, IMAGE_FACTOR, MIN_PIXELS, spec.image_max_pixels)
    return width, height


def _turn_text(turn: Turn, last: Turn, is_last: bool, spec: PresetSpec, final_media: bool):
    """A turn's text item: the preset's instruction dict for the prompt proper (every user turn for
    ``multiturn``), the instruction appended for ``scripts``, plain text otherwise."""
    if spec.name == "multiturn" and turn.role == "user":  # the dict in every user turn
        return instruction_dict(turn.text, spec, bool(turn.images or turn.videos or turn.audios), turn.instruction)
    if is_last and spec.name != "scripts":
        return instruction_dict(last.text, spec, final_media, last.instruction)
    if spec.name == "scripts" and is_last and last.instruction:
        return last.instruction if last.text is None else f"{last.text}\n{last.instruction}"
    return turn.text


def target_length(spec: PresetSpec, real_length: int) -> int:
    if spec.min_length == 0:  # no padding
        return real_length
    if spec.grow is not None:
        return max(int(real_length * spec.grow), spec.min_length)
    return spec.min_length
