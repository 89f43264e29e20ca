"""InternVL (-hf): text, images, video and chats equal a straightforward reference computation.

The reference is written from the method notes, independently of x2i_core's prompt/padding code: the processor
called with the reference's padding arguments, then ``generate(max_new_tokens=1, output_hidden_states=True)``
prefill states (generate derives positions from the attention mask - what the encoder must reproduce).
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reference_recipe import _frames, _resize_budget
from x2i_core.errors import X2IInputError
from x2i_core.mllm import ChatTurn, EncodeRequest, load_mllm

TOL = 1e-5


@pytest.fixture(scope="module")
def ivl_dir(tiny):
    return tiny["mllm_internvl"]


@pytest.fixture(scope="module")
def ivl(ivl_dir):
    return load_mllm(ivl_dir, dtype="fp32")


@pytest.fixture(scope="module")
def reference(ivl_dir):
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(ivl_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(ivl_dir)


def _image(seed, w=90, h=60):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _inputs(processor, preset, texts, images=(), video=None, history=()):
    msgs_batch = []
    imgs, vids = [], None
    size = (lambda im: im.resize((128, 128))) if preset == "scripts" else (lambda im: _resize_budget(im, 224 * 224))
    content = []
    for im in images:
        imgs.append(size(im))
        content.append({"type": "image", "image": imgs[-1]})
    if video is not None:
        vids = [_frames(video, 128 * 128)]
        content.append({"type": "video", "video": vids[0]})
    media = bool(imgs or vids)
    prompts = []
    for text in texts:
        msgs = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in history]
        if preset == "training":
            item = str({"Text input": text, "Instruction editing description": "no", "image input": "no"})
        elif preset == "comfyui":
            item = str({"Text input": text or "", "Instruction editing description": "",
                        "image input": "yes" if media else "no"})
        else:
            item = text
        msgs.append({"role": "user", "content": content + [{"type": "text", "text": item}]})
        msgs_batch.append(msgs)
        prompts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    call = dict(text=prompts, images=imgs or None, videos=vids, return_tensors="pt")
    if preset == "training":
        return processor(**call, padding="max_length", max_length=512, truncation=True, padding_side="left")
    if preset == "comfyui":
        n = processor(**call)["input_ids"].shape[1]
        return processor(**call, padding="max_length", max_length=max(int(1.3 * n), 512), padding_side="right")
    return processor(**call, padding="max_length", max_length=512, truncation=True, padding_side="right")


def _reference(reference, preset, texts, images=(), video=None, history=()):
    model, processor = reference
    inputs = _inputs(processor, preset, texts, images, video, history)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True,
                             do_sample=False)
    return torch.stack(out.hidden_states[0], dim=1)


CASES = {
    "training text": ("training", ["A red fox jumps over a lazy dog."], 0, False),
    "training batch of two lengths": ("training", ["a cat", "A red fox jumps over a lazy dog in the forest."], 0,
                                      False),
    "comfyui text": ("comfyui", ["一只可爱的小猫坐在窗台上"], 0, False),
    "comfyui one image": ("comfyui", ["Draw this in watercolour."], 1, False),
    "comfyui two images": ("comfyui", ["Combine these pictures."], 2, False),
    "comfyui video": ("comfyui", ["What happens here?"], 0, True),
    "scripts text+image": ("scripts", ["An oil painting of this."], 1, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_internvl_matches_the_reference_generate_prefill(ivl, reference, case):
    preset, texts, n_img, with_video = CASES[case]
    images = [_image(i, 90 + 40 * i, 60 + 10 * i) for i in range(n_img)]
    video = [_image(10 + i, 80, 64) for i in range(3)] if with_video else None
    ref = _reference(reference, preset, texts, images, video)
    hs = ivl.encode([EncodeRequest(text=t, images=images or None, videos=[video] if video else None) for t in texts],
                    preset=preset, pad_rows="constant")  # this environment's transformers: constant left-pad rows
    assert hs.hidden.shape == ref.shape and hs.hidden.shape[1] == ivl.channels == 3
    diff = (hs.hidden - ref).abs().max().item()
    assert diff <= TOL, f"{case}: max abs diff {diff}"


def test_internvl_two_turn_chat_matches_reference(ivl, reference):
    history = [("user", "Describe a cabin by a lake."), ("assistant", "A small wooden cabin with smoke rising.")]
    ref = _reference(reference, "comfyui", ["Now at night."], history=history)
    hs = ivl.encode(EncodeRequest(text="Now at night.", history=[ChatTurn(r, t) for r, t in history]),
                    preset="comfyui")
    assert (hs.hidden - ref).abs().max().item() <= TOL


def test_internvl_exact_fill_equals_padded_forward(ivl):
    texts = ("a cat", "a red fox in the snow at dawn")
    a = ivl.encode_text(list(texts), preset="training")
    b = ivl.encode([EncodeRequest(text=t) for t in texts], preset="training", exact_fill=False)
    assert (a.hidden - b.hidden).abs().max().item() <= TOL


def test_family_is_read_from_config_not_folder_name(ivl_dir, tmp_path):
    other = tmp_path / "Qwen2.5-VL-looks-like-but-is-not"
    shutil.copytree(ivl_dir, other)
    enc = load_mllm(str(other), dtype="fp32")
    assert type(enc).__name__ == "InternVLEncoder"


def test_internvl_reasoning_and_bad_input(ivl):
    answer, hs = ivl.generate_answer(EncodeRequest(text="What is shown?", images=_image(1)), max_new_tokens=4,
                                     temperature=0.7, seed=1)
    assert hs.hidden.shape[1] == ivl.channels and 1 <= hs.hidden.shape[2] <= 4
    t = np.arange(16000) / 16000
    with pytest.raises(X2IInputError, match="does not take audio"):
        ivl.encode(EncodeRequest(text="x", audios=[(np.sin(t).astype(np.float32), 16000)]))
    with pytest.raises(X2IInputError, match="placeholder"):
        ivl.encode(EncodeRequest(text="look <IMG_CONTEXT> here"), preset="comfyui")
