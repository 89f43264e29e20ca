"""Input conversion and prompt building: clear errors for unusable input."""

import numpy as np
import pytest
import torch
from PIL import Image

from x2i_core.errors import X2IInputError
from x2i_core.media import smart_resize, to_pil, to_pil_list
from x2i_core.mllm import EncodeRequest
from x2i_core.prompt import instruction_dict, resolve_preset, SPECS


def test_instruction_dict_is_python_repr_as_in_training():
    s = instruction_dict("a dog", SPECS["training"], False)
    assert s == "{'Text input': 'a dog', 'Instruction editing description': 'no', 'image input': 'no'}"
    s = instruction_dict(None, SPECS["comfyui"], True)
    assert s == "{'Text input': '', 'Instruction editing description': '', 'image input': 'yes'}"


def test_auto_preset_is_training_for_text_and_comfyui_with_media():
    assert resolve_preset("auto", False).name == "training"
    assert resolve_preset(None, True).name == "comfyui"
    with pytest.raises(X2IInputError, match="text-only"):
        resolve_preset("training", True)
    with pytest.raises(X2IInputError, match="unknown"):
        resolve_preset("fancy", False)


def test_grayscale_and_rgba_become_rgb_with_white_background():
    gray = to_pil(np.full((4, 5), 0.5, dtype=np.float32))
    assert gray.mode == "RGB" and gray.size == (5, 4)
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)  # fully transparent black
    assert to_pil(rgba).getpixel((1, 1)) == (255, 255, 255)
    assert to_pil(Image.new("L", (2, 2))).mode == "RGB"
    assert len(to_pil_list(torch.rand(3, 8, 8, 3))) == 3


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 10, 3), dtype=np.uint8), "zero-sized"),
    (np.zeros((10, 10, 2), dtype=np.uint8), "2 channels"),
    (np.zeros((3, 10, 10, 5), dtype=np.float32)[0], "5 channels"),
    (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN"),
    ("not/a/file.png", "does not exist"),
    (42, "expected a PIL image"),
])
def test_bad_images_raise_clear_errors(bad, match):
    with pytest.raises(X2IInputError, match=match):
        to_pil(bad)


def test_smart_resize_keeps_budget_and_multiples_of_28():
    h, w = smart_resize(1080, 1920, max_pixels=224 * 224)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 224 * 224
    assert smart_resize(10, 10, max_pixels=224 * 224) == (56, 56)  # min pixels 4*28*28


def test_encoder_rejects_empty_prompts_and_bad_images(encoder):
    with pytest.raises(X2IInputError, match="empty"):
        encoder.encode(EncodeRequest(text=""), preset="training")
    with pytest.raises(X2IInputError, match="empty"):
        encoder.encode(EncodeRequest(text=None), preset="comfyui")
    with pytest.raises(X2IInputError, match="zero-sized"):
        encoder.encode(EncodeRequest(text="x", images=np.zeros((0, 0, 3), np.uint8)), preset="comfyui")
    with pytest.raises(X2IInputError, match="channels"):
        encoder.encode(EncodeRequest(text="x", images=np.zeros((8, 8, 7), np.uint8)), preset="comfyui")
    with pytest.raises(X2IInputError, match="no frames"):
        encoder.encode(EncodeRequest(text="x", videos=[[]]), preset="comfyui")


def test_fixed_length_preset_refuses_to_cut_image_tokens(encoder):
    img = np.random.RandomState(0).rand(200, 200, 3).astype(np.float32)
    # 'scripts' resizes to 128x128 (few tokens) - fine; many images overflow 512 tokens.
    with pytest.raises(X2IInputError, match="comfyui"):
        encoder.encode(EncodeRequest(text="x", images=[img] * 40), preset="scripts")


def test_vision_placeholders_in_text_are_refused_clearly(encoder):
    for preset in ("training", "comfyui", "scripts"):
        with pytest.raises(X2IInputError, match="placeholder"):
            encoder.encode(EncodeRequest(text="look at <|image_pad|> this"), preset=preset)
    # other special tokens are just text to the model
    hs = encoder.encode(EncodeRequest(text="<|im_end|><|endoftext|>"), preset="training")
    assert torch.isfinite(hs.hidden).all()


@pytest.mark.parametrize("shape,dtype", [((1, 1, 3), np.uint8), ((1600, 1200, 3), np.uint8), ((40, 30, 3), np.uint16)])
def test_one_pixel_huge_and_16bit_images_encode(encoder, shape, dtype):
    rng = np.random.RandomState(0)
    top = 65535 if dtype == np.uint16 else 255
    img = (rng.rand(*shape) * top).astype(dtype)
    hs = encoder.encode(EncodeRequest(text="x", images=img), preset="comfyui")
    assert torch.isfinite(hs.hidden).all()
    # huge inputs are resized to the preset's pixel budget: the token count stays small
    assert hs.lengths[0] < 200
