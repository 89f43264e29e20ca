"""InternVL (-hf): the 'comfyui' preset (chat template; no InternVL recipe exists in the reference nodes) with
images, video and chats equals a straightforward computation, and the InternVL recipes build the reference's
prompt strings.

The computation is written independently of x2i_core's prompt/padding code: the processor called with the
comfyui padding arguments, then the model's forward with every hidden state and positions ``0..S-1`` - the
reference's InternVL model calls its language model with the mask and no position ids.  The 'training' and
'scripts' recipes are checked against the reference's own stack in tests/test_internvl_oracle.py.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.reference_recipe import _frames, _resize_budget
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
    from transformers import InternVLForConditionalGeneration

    from x2i_core.mllm.chat import load_pil_processor

    model = InternVLForConditionalGeneration.from_pretrained(ivl_dir, dtype=torch.float32)
    # The folder's processor with the PIL image processor, as the encoder loads it on every transformers (the
    # reference's own image transform is checked in test_internvl_oracle.py).
    return model.eval(), load_pil_processor(ivl_dir)


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
        n = processor(**call, padding=True)["input_ids"].shape[1]
        return processor(**call, padding="max_length", max_length=max(int(1.3 * n), 512), padding_side="right")
    return processor(**call, padding="max_length", max_length=512, truncation=True, padding_side="right")


def _reference(reference, preset, texts, images=(), video=None, history=()):
    model, processor = reference
    inputs = _inputs(processor, preset, texts, images, video, history)
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(inputs["input_ids"].shape[0], -1)
    with torch.no_grad():
        out = model(**inputs, position_ids=positions, output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states, dim=1)


CASES = {
    "comfyui batch of two lengths": ("comfyui", ["a cat", "A red fox jumps over a lazy dog in the forest."], 0,
                                     False),
    "comfyui text": ("comfyui", ["一只可爱的小猫坐在窗台上"], 0, False),
    "comfyui one image": ("comfyui", ["Draw this in watercolour."], 1, False),
    "comfyui two images": ("comfyui", ["Combine these pictures."], 2, False),
    "comfyui video": ("comfyui", ["What happens here?"], 0, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_internvl_comfyui_matches_the_forward_with_reference_positions(ivl, reference, case):
    preset, texts, n_img, with_video = CASES[case]
    images = [_image(i, 90 + 40 * i, 60 + 10 * i) for i in range(n_img)]
    video = [_image(10 + i, 80, 64) for i in range(3)] if with_video else None
    ref = _reference(reference, preset, texts, images, video)
    hs = ivl.encode([EncodeRequest(text=t, images=images or None, videos=[video] if video else None) for t in texts],
                    preset=preset)
    assert hs.hidden.shape == ref.shape and hs.hidden.shape[1] == ivl.channels == 3
    diff = (hs.hidden - ref).abs().max().item()
    assert diff <= TOL, f"{case}: max abs diff {diff}"


def test_internvl_two_turn_chat_matches_reference(ivl, reference):
    history = [("user", "Describe a cabin by a lake."), ("assistant", "A small wooden cabin with smoke rising.")]
    ref = _reference(reference, "comfyui", ["Now at night."], history=history)
    hs = ivl.encode(EncodeRequest(text="Now at night.", history=[ChatTurn(r, t) for r, t in history]),
                    preset="comfyui")
    assert (hs.hidden - ref).abs().max().item() <= TOL


def test_internvl_recipes_build_the_reference_prompts(ivl):
    from x2i_core.mllm.internvl import INTERNVL25_SYSTEM

    built = ivl.build_prompt(EncodeRequest(text="a cat"), "training", None)
    assert built.text == "{'Text input': 'a cat', 'Instruction editing description': 'no', 'image input': 'no'}"
    assert built.spec.padding_side == "right" and built.spec.min_length == 512 and built.spec.truncate
    built = ivl.build_prompt(EncodeRequest(text="a cat", images=_image(3, 200, 90)), "scripts", None)
    assert built.text == (f"<|im_start|>system\n{INTERNVL25_SYSTEM}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n"
                          "{'Text input': 'a cat', 'Instruction editing description': 'no'}<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert [im.size for im in built.images] == [(128, 128)]
    hs = ivl.encode([EncodeRequest(text="a cat"), EncodeRequest(text="a red fox in the snow at dawn")],
                    preset="training")
    assert hs.hidden.shape[2] == 512 and hs.attention_mask[:, 0].all() and not hs.attention_mask[:, -1].any()  # right-padded
    # positions 0..S-1: every pad row has its own position, so neighbouring pad rows differ
    assert (hs.hidden[0, -1, -1] - hs.hidden[0, -1, -2]).abs().max().item() > 1e-4
    with pytest.raises(X2IInputError, match="one .as the reference script"):
        ivl.encode(EncodeRequest(text="x", images=[_image(1), _image(2)]), preset="scripts")
    with pytest.raises(X2IInputError, match="comfyui"):
        ivl.encode(EncodeRequest(text="x", videos=[[_image(1), _image(2)]]), preset="scripts")


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
