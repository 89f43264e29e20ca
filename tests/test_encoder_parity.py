"""The encoder's hidden-state stack equals the reference recipe (processor -> generate prefill)."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.reference_recipe import reference_hidden
from x2i_core.mllm import EncodeRequest
from x2i_core.mllm.chat import transformers_major

TOL = 1e-5
TRANSFORMERS_MAJOR = transformers_major()


def _image(seed, w, h):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


CASES = [
    ("training", "A red fox jumps over a lazy dog in the snowy forest at dawn.", 0),
    ("training", "一只可爱的小猫坐在窗台上", 0),
    ("comfyui", "A futuristic city skyline at night.", 0),
    ("comfyui", "Combine these pictures into one scene.", 2),
    ("comfyui", None, 1),
    ("scripts", "An oil painting of a lighthouse.", 0),
    ("scripts", "Draw this in watercolour.", 2),
]


@pytest.mark.parametrize("preset,text,n_images", CASES)
def test_hidden_stack_matches_reference_generate_prefill(encoder, hf_model, preset, text, n_images):
    model, processor = hf_model
    images = [_image(i, 150 + 37 * i, 100 + 11 * i) for i in range(n_images)]
    ref = reference_hidden(model, processor, preset, text, images)
    # This environment's transformers gives the constant left-pad rows; the rows the released AlignNets were
    # trained on (the default) are compared with the reference stack in tests/test_reference_oracle.py.
    hs = encoder.encode(EncodeRequest(text=text, images=images or None), preset=preset, pad_rows="constant")
    assert hs.hidden.shape == ref.shape
    assert hs.hidden.shape[1] == 3  # 2 layers + embeddings
    if TRANSFORMERS_MAJOR >= 5:
        # transformers 5's own generate places and masks pad tokens differently from 4.x (its positions come
        # from mm_token_type_ids and cumulative masks), so on 5.x only the real rows are comparable here; the
        # pack computes the pad rows as 4.49 did, checked against the 4.49 stack itself in test_reference_oracle.
        real = hs.attention_mask[0].bool()
        hs_rows, ref = hs.hidden[:, :, real], ref[:, :, real]
    else:
        hs_rows = hs.hidden
    diff = (hs_rows - ref).abs().max().item()
    assert diff <= TOL, f"{preset}: max abs diff {diff}"


def test_image_inputs_as_numpy_and_comfy_tensor_equal_pil(encoder):
    img = _image(3, 120, 90)
    arr = np.asarray(img).astype(np.float32) / 255.0
    a = encoder.encode(EncodeRequest(text="x", images=[img]), preset="comfyui").hidden
    b = encoder.encode(EncodeRequest(text="x", images=arr), preset="comfyui").hidden
    c = encoder.encode(EncodeRequest(text="x", images=torch.from_numpy(arr)[None]), preset="comfyui").hidden
    assert torch.equal(a, b) and torch.equal(a, c)


def test_training_preset_left_pads_to_512_and_pad_rows_follow_the_option(encoder):
    texts = ["a cat", "A red fox jumps over a lazy dog in the snowy forest."]
    hs = encoder.encode_text(texts, preset="training", pad_rows="constant")
    assert hs.hidden.shape[2] == 512
    mask = hs.attention_mask
    assert mask[:, -1].all() and not mask[:, 0].any()  # left padding
    # "constant": every pad row is one prompt-independent constant per layer.
    assert (hs.hidden[0, :, 0] - hs.hidden[1, :, 0]).abs().max() <= 1e-6
    # "reference" (the default): the rows attend to the prompt, so they differ between prompts; all pad rows
    # of one prompt are the same vector.
    ref = encoder.encode_text(texts, preset="training")
    assert (ref.hidden[0, :, 0] - ref.hidden[1, :, 0]).abs().max() > 1e-3
    n = ref.lengths[0]
    assert (ref.hidden[0, :, : 512 - n] - ref.hidden[0, :, :1]).abs().max() == 0
    assert (ref.hidden[:, :, -n:][0] - hs.hidden[0, :, -n:]).abs().max() <= 1e-5  # real rows do not change
    # Real rows equal an unpadded run of the same prompt.
    batch, _, lengths = encoder.prepare([EncodeRequest(text="a cat")], "training")
    n = lengths[0]
    ids = batch["input_ids"][:, -n:]
    unpadded = encoder.forward_hidden({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert (hs.hidden[0, :, -n:] - unpadded[0]).abs().max() <= 1e-5


def test_batch_of_prompts_equals_one_at_a_time_for_fixed_length_presets(encoder):
    texts = ["a cat", "a dog on a beach"]
    both = encoder.encode_text(texts, preset="training").hidden
    for i, t in enumerate(texts):
        one = encoder.encode_text(t, preset="training").hidden
        assert (both[i] - one[0]).abs().max() <= TOL


def test_comfyui_preset_pads_to_1_3_times_length_when_long(encoder):
    long_text = "a very long caption with many words " * 80
    hs = encoder.encode_text(long_text, preset="comfyui")
    n = hs.lengths[0]
    assert n > 512
    assert hs.hidden.shape[2] == int(n * 1.3)
    assert hs.attention_mask[0, :n].all() and not hs.attention_mask[0, n:].any()  # right padding


@contextlib.contextmanager
def layer0_inputs(encoder):
    """Record the ``[batch, tokens]`` shape of every input to the text decoder's first layer."""
    seen = []
    hook = encoder.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple(kwargs.get("hidden_states", args[0] if args else None).shape[:2])),
        with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


@pytest.mark.parametrize("pad_rows", ["reference", "constant"])
def test_exact_fill_skips_the_pads_and_equals_the_padded_forward(encoder, pad_rows):
    """Left padding: the real tokens after the preset's fixed opening run (+ one pad query per prompt for the
    reference rows, + the 3-token probe of the constant once); never the 512-token sequence (issue: exact
    savings).  The opening itself runs once per model and preset (measured here before counting)."""
    opening = len(encoder.prompt_prefix("training")[0])
    encoder.encode_text("warm up the constant rows", preset="training", pad_rows=pad_rows)
    texts = ["a cat", "A red fox jumps over a lazy dog in the snowy forest."]
    with layer0_inputs(encoder) as seen:
        fast = encoder.encode_text(texts, preset="training", pad_rows=pad_rows)
        tokens_fast = sum(b * n for b, n in seen)
        seen.clear()
        slow = encoder.encode([EncodeRequest(text=t) for t in texts], preset="training", exact_fill=False,
                              pad_rows=pad_rows)
        tokens_slow = sum(b * n for b, n in seen)
    assert (fast.hidden - slow.hidden).abs().max().item() <= TOL
    assert torch.equal(fast.attention_mask, slow.attention_mask)
    assert tokens_slow == 2 * 512
    longest = max(fast.lengths)
    assert opening >= 10  # system message, template and the dict's opening
    assert tokens_fast == 2 * (longest - opening + (pad_rows == "reference"))  # one forward over what follows it
    assert tokens_fast < tokens_slow / 8
    encoder.prefix_cache = False
    try:
        with layer0_inputs(encoder) as seen:
            plain = encoder.encode_text(texts, preset="training", pad_rows=pad_rows)
        assert sum(b * n for b, n in seen) == 2 * (longest + (pad_rows == "reference"))
    finally:
        encoder.prefix_cache = True
    assert (plain.hidden - fast.hidden).abs().max().item() <= TOL


@pytest.mark.parametrize("preset", ["comfyui", "scripts"])
def test_right_padding_runs_one_pad_and_equals_the_padded_forward(encoder, preset):
    """Right padding: every pad row of a prompt is the same vector, so one pad runs and is repeated."""
    imgs = [_image(5, 120, 90)]
    reqs = [EncodeRequest(text="a cat", images=imgs), EncodeRequest(text="a red fox in the snowy forest", images=imgs)]
    with layer0_inputs(encoder) as seen:
        fast = encoder.encode(reqs, preset=preset)
        cols_fast = seen[-1][1]
        slow = encoder.encode(reqs, preset=preset, exact_fill=False)
        cols_slow = seen[-1][1]
    assert (fast.hidden - slow.hidden).abs().max().item() <= TOL
    assert cols_slow == fast.hidden.shape[2] >= 512 and cols_fast == max(fast.lengths) + 1


@pytest.mark.parametrize("preset", ["comfyui", "scripts"])
def test_right_padded_text_runs_after_the_opening_and_equals_the_padded_forward(encoder, preset):
    """Text prompts under the right-padded presets: the fixed opening runs once, then only what follows it
    plus one pad per batch row."""
    texts = ["a cat", "一只可爱的小猫坐在窗台上, watercolour", "(a parenthesis first) and then words"]
    opening = len(encoder.prompt_prefix(preset)[0])
    with layer0_inputs(encoder) as seen:
        fast = encoder.encode_text(texts, preset=preset)
        cols_fast = seen[-1][1]
        slow = encoder.encode([EncodeRequest(text=t) for t in texts], preset=preset, exact_fill=False)
    assert (fast.hidden - slow.hidden).abs().max().item() <= TOL
    assert cols_fast == max(fast.lengths) + 1 - opening
