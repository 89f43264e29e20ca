"""Qwen2.5-Omni (thinker): text, image, video, audio and chats equal a straightforward reference computation.

The reference here is written from the method notes, independently of x2i_core's prompt/padding code: the
processor called with the reference's padding arguments, then the thinker's ``generate(max_new_tokens=1,
output_hidden_states=True)`` prefill states.  Audio is given to both sides as the same 16 kHz mono array
(our resampler is checked against torchaudio in test_media_and_prompts.py).
"""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.reference_recipe import _frames, _resize_budget
from x2i_core.errors import X2IInputError
from x2i_core.mllm import ChatTurn, EncodeRequest, load_mllm
from x2i_core.mllm.qwen25omni import OMNI_SYSTEM_PROMPT

TOL = 1e-5


@pytest.fixture(scope="module")
def omni_dir(tiny):
    return tiny["mllm_omni"]


@pytest.fixture(scope="module")
def omni(omni_dir):
    return load_mllm(omni_dir, dtype="fp32")


@pytest.fixture(scope="module")
def reference(omni_dir):
    from transformers import AutoProcessor, Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration

    cfg = Qwen2_5OmniConfig.from_pretrained(omni_dir).thinker_config
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(omni_dir, config=cfg, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(omni_dir)


def _image(seed, w=90, h=60):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _tone(seconds=1.0, rate=16000, f=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def _reference(reference, preset, text, images=(), video=None, audio=None, history=()):
    """Reference prompt per preset (system message first, media before text), padded by the processor."""
    model, processor = reference
    msgs = [{"role": "system", "content": [{"type": "text", "text": OMNI_SYSTEM_PROMPT}]}]
    for role, t in history:
        msgs.append({"role": role, "content": [{"type": "text", "text": t}]})
    content, imgs, vids, auds = [], [], None, None
    size = (lambda im: im.resize((128, 128))) if preset == "scripts" else (lambda im: _resize_budget(im, 224 * 224))
    for im in images:
        imgs.append(size(im))
        content.append({"type": "image", "image": imgs[-1]})
    if video is not None:
        vids = [_frames(video, 128 * 128)]
        content.append({"type": "video", "video": vids[0]})
    if audio is not None:
        auds = [audio]
        content.append({"type": "audio", "audio": audio})
    media = bool(imgs or vids or auds)
    if preset == "training":
        item = str({"Text input": text, "Instruction editing description": "no", "image input": "no"})
    elif preset == "comfyui":
        item = str({"Text input": text or "", "Instruction editing description": "", "image input": "yes" if media else "no"})
    else:
        item = text
    content.append({"type": "text", "text": item})
    msgs.append({"role": "user", "content": content})
    # No vision ids: the Qwen reference stack (transformers 4.49) never passed add_vision_id to the template.
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    call = dict(text=[prompt], images=imgs or None, videos=vids, audio=auds, return_tensors="pt",
                use_audio_in_video=False, **({"fps": 1.0} if vids else {}))
    # Text padding goes in text_kwargs: given flat, the processor would also hand max_length to the audio
    # feature extractor and cut the audio to max_length samples.
    if preset == "training":
        text = dict(padding="max_length", max_length=512, truncation=True, padding_side="left")
    elif preset == "comfyui":
        n = processor(**call)["input_ids"].shape[1]
        text = dict(padding="max_length", max_length=max(int(1.3 * n), 512), padding_side="right")
    else:
        text = dict(padding="max_length", max_length=512, truncation=True, padding_side="right")
    inputs = processor(**call, text_kwargs=text)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True,
                             do_sample=False)
    return torch.stack(out.hidden_states[0], dim=1)


CASES = {
    "training text": ("training", "A red fox jumps over a lazy dog.", 0, False, False),
    "comfyui text": ("comfyui", "一只可爱的小猫坐在窗台上", 0, False, False),
    "comfyui image": ("comfyui", "Draw this in watercolour.", 1, False, False),
    "comfyui video": ("comfyui", "What happens here?", 0, True, False),
    "comfyui audio": ("comfyui", "Paint what you hear.", 0, False, True),
    "comfyui image+video+audio": ("comfyui", "Combine all of it.", 1, True, True),
    "scripts text+image": ("scripts", "An oil painting of this.", 1, False, False),
    "scripts audio": ("scripts", "A picture of this sound.", 0, False, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_omni_matches_the_reference_generate_prefill(omni, reference, case):
    preset, text, n_img, with_video, with_audio = CASES[case]
    images = [_image(i) for i in range(n_img)]
    video = [_image(10 + i, 80, 64) for i in range(3)] if with_video else None
    audio = _tone() if with_audio else None
    ref = _reference(reference, preset, text, images, video, audio)
    hs = omni.encode(EncodeRequest(text=text, images=images or None, videos=[video] if video else None,
                                   audios=[(audio, 16000)] if audio is not None else None), preset=preset,
                    pad_rows="constant")  # this environment's transformers: constant left-pad rows
    assert hs.hidden.shape == ref.shape and hs.hidden.shape[1] == omni.channels == 3
    diff = (hs.hidden - ref).abs().max().item()
    assert diff <= TOL, f"{case}: max abs diff {diff}"


def test_omni_two_turn_chat_matches_reference(omni, reference):
    history = [("user", "Describe a cabin by a lake."), ("assistant", "A small wooden cabin with smoke rising.")]
    ref = _reference(reference, "comfyui", "Now at night.", history=history)
    hs = omni.encode(EncodeRequest(text="Now at night.", history=[ChatTurn(r, t) for r, t in history]),
                     preset="comfyui")
    assert (hs.hidden - ref).abs().max().item() <= TOL


def test_omni_exact_fill_equals_padded_forward(omni):
    a = omni.encode_text(["a cat", "a red fox in the snow at dawn"], preset="training")
    b = omni.encode([EncodeRequest(text=t) for t in ("a cat", "a red fox in the snow at dawn")], preset="training",
                    exact_fill=False)
    assert (a.hidden - b.hidden).abs().max().item() <= TOL


def test_family_is_read_from_config_not_folder_name(omni_dir, tmp_path):
    other = tmp_path / "my-model"
    shutil.copytree(omni_dir, other)
    enc = load_mllm(str(other), dtype="fp32")
    assert type(enc).__name__ == "Qwen25OmniEncoder" and "audio" in enc.modalities
    assert not any(k.startswith(("talker", "token2wav")) for k, _ in enc.module.named_parameters())


def test_omni_reasoning_answers_then_encodes(omni):
    answer, hs = omni.generate_answer(EncodeRequest(text="What do you hear?", audios=[(_tone(0.5), 16000)]),
                                      max_new_tokens=4, temperature=0.7, seed=3)
    again, hs2 = omni.generate_answer(EncodeRequest(text="What do you hear?", audios=[(_tone(0.5), 16000)]),
                                      max_new_tokens=4, temperature=0.7, seed=3)
    assert answer == again and torch.equal(hs.hidden, hs2.hidden)
    assert hs.hidden.shape[1] == omni.channels and 1 <= hs.hidden.shape[2] <= 4


def test_omni_bad_audio_is_a_clear_error(omni):
    with pytest.raises(X2IInputError, match="at most 30 s"):
        omni.encode(EncodeRequest(text="x", audios=[(_tone(31.0), 16000)]))
    with pytest.raises(X2IInputError, match="placeholder"):
        omni.encode(EncodeRequest(text="hear <|AUDIO|> this"), preset="comfyui")
    assert os.path.isdir(omni.path)
