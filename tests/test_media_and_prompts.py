"""Input conversion and prompt building: clear errors for unusable input."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from x2i_core.errors import X2IInputError
from x2i_core.media import smart_resize, to_pil, to_pil_list
from x2i_core.mllm import EncodeRequest
from x2i_core.prompt import SPECS, instruction_dict, resolve_preset


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
    with pytest.raises(X2IInputError, match="only whitespace"):
        encoder.encode(EncodeRequest(text=" \n "), preset="comfyui")
    # an instruction alone is a prompt (the reference's editing field), whatever blank text comes with it
    assert torch.isfinite(encoder.encode(EncodeRequest(text=" ", instruction="make it red"), preset="comfyui").hidden).all()


def test_fixed_length_preset_refuses_to_cut_image_tokens(encoder):
    img = np.random.RandomState(0).rand(200, 200, 3).astype(np.float32)
    # 'scripts' resizes to 128x128 (few tokens) - fine; many images overflow 512 tokens.
    with pytest.raises(X2IInputError, match="comfyui"):
        encoder.encode(EncodeRequest(text="x", images=[img] * 40), preset="scripts")


def test_vision_placeholders_in_text_are_refused_clearly(encoder):
    for preset in ("training", "comfyui", "scripts"):
        with pytest.raises(X2IInputError, match="placeholder"):
            encoder.encode(EncodeRequest(text="look at <|image_pad|> this"), preset=preset)
    # a prompt of nothing but special tokens has nothing to draw: refused; mixed with words they stay text
    with pytest.raises(X2IInputError, match="only the MLLM's special tokens"):
        encoder.encode(EncodeRequest(text="<|im_end|><|endoftext|>"), preset="training")
    hs = encoder.encode(EncodeRequest(text="a fox <|im_end|><|endoftext|>"), preset="training")
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


# -- audio ----------------------------------------------------------------------------------------------------

def _tone(rate, seconds=0.5, channels=2):
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)]).astype(np.float32)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 24000), (16000, 16000)])
def test_resampler_matches_torchaudio(orig, new):
    from x2i_core.audio import resample

    torchaudio = pytest.importorskip("torchaudio")
    x = torch.from_numpy(_tone(orig))
    ours = resample(x, orig, new)
    ref = torchaudio.functional.resample(x, orig, new)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_audio_without_torchaudio_equals_with_it(tmp_path):
    """The pack never needs torchaudio for audio: a process where importing it fails gives the same features."""
    import subprocess
    import sys
    import wave

    path = tmp_path / "stereo.wav"
    pcm = (_tone(44100).T * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(2)
        wf.setsampwidth(2)
        wf.setframerate(44100)
        wf.writeframes(pcm.tobytes())
    code = (
        "import sys, numpy as np; sys.modules['torchaudio'] = None\n"
        "from x2i_core.audio import prepare_audio\n"
        f"np.save({str(tmp_path / 'no_ta.npy')!r}, prepare_audio({str(path)!r}, 16000))\n"
        "import importlib.util; assert 'torchaudio' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from x2i_core.audio import prepare_audio

    without = np.load(tmp_path / "no_ta.npy")
    with_ = prepare_audio({"waveform": torch.from_numpy(pcm.T.astype(np.float32) / 32768.0)[None], "sample_rate": 44100},
                          16000)
    assert without.shape == with_.shape == (8000,)
    assert np.abs(without - with_).max() <= 1e-6


def test_audio_inputs_and_bad_audio():
    from x2i_core.audio import as_clip, prepare_audio
    from x2i_core.errors import X2IInputError

    stereo = _tone(48000, 0.25)
    a = prepare_audio({"waveform": torch.from_numpy(stereo)[None], "sample_rate": 48000}, 16000)
    b = prepare_audio((stereo, 48000), 16000)
    c = prepare_audio((stereo.T.copy(), 48000), 16000)  # [samples, channels] is recognised
    assert a.shape == (4000,) and np.array_equal(a, b) and np.array_equal(a, c)
    assert np.allclose(prepare_audio((stereo[:1], 16000), 16000), stereo[0])
    with pytest.raises(X2IInputError, match="empty"):
        as_clip((np.zeros((2, 0), np.float32), 16000))
    with pytest.raises(X2IInputError, match="sample rate"):
        as_clip((stereo, 0))
    with pytest.raises(X2IInputError, match="NaN"):
        as_clip((np.full((1, 10), np.nan, np.float32), 16000))
    with pytest.raises(X2IInputError, match="batch of 2"):
        as_clip({"waveform": torch.zeros(2, 1, 100), "sample_rate": 16000})
    with pytest.raises(X2IInputError, match="at most 300 s"):
        prepare_audio((np.zeros((1, 16000 * 301), np.float32), 16000), 16000)
    with pytest.raises(X2IInputError, match="does not exist"):
        as_clip("/no/such/file.wav")


def test_audio_to_a_model_without_audio_is_refused(encoder):
    from x2i_core.errors import X2IInputError

    with pytest.raises(X2IInputError, match="does not take audio"):
        encoder.encode(EncodeRequest(text="x", audios=[(_tone(16000), 16000)]))


def test_multi_turn_and_instruction_prompts(encoder):
    from x2i_core.mllm import ChatTurn
    from x2i_core.prompt import SPECS

    img = Image.fromarray((np.random.RandomState(1).rand(60, 90, 3) * 255).astype(np.uint8))
    built = encoder.build_prompt(EncodeRequest(
        text="Now at night.", instruction="keep the cabin",
        history=[ChatTurn("user", "Describe this.", images=img), ChatTurn("assistant", "A cabin by a lake.")]),
        None, None)
    assert built.spec == SPECS["comfyui"]
    t = built.text
    assert t.index("Describe this.") < t.index("A cabin by a lake.") < t.index("Now at night.")
    assert "<|im_start|>assistant\nA cabin by a lake.<|im_end|>" in t
    assert "'Instruction editing description': 'keep the cabin'" in t and "'image input': 'no'" in t
    assert t.count("<|image_pad|>") == 1 and len(built.images) == 1
    # the last history turn is the prompt when the request adds nothing
    only = encoder.build_prompt(EncodeRequest(history=[ChatTurn("user", "a cat")]), None, None)
    assert only.spec.name == "training" and "'Text input': 'a cat'" in only.text


@pytest.mark.parametrize("orig,new", [(44100, 16000), (8000, 16000), (997, 1600)])
def test_direct_resampler_equals_the_filter_bank(orig, new):
    """The per-sample evaluation (used for rate pairs with a huge bank, e.g. prime rates) is the same filter."""
    from x2i_core.audio import resample

    x = torch.from_numpy(_tone(orig, 0.3))
    bank = resample(x, orig, new, direct=False)
    direct = resample(x, orig, new, direct=True)
    assert direct.shape == bank.shape
    assert (direct - bank).abs().max().item() <= 1e-9
    torchaudio = pytest.importorskip("torchaudio")
    assert (direct - torchaudio.functional.resample(x, orig, new)).abs().max().item() <= 5e-5  # its fp32 bank


def test_prime_rate_resamples_quickly():
    import time

    from x2i_core.audio import resample

    x = torch.from_numpy(_tone(7919, 2.0))
    t0 = time.perf_counter()
    out = resample(x, 7919, 16000)
    assert out.shape[-1] == -(-2 * 7919 * 16000 // 7919) and time.perf_counter() - t0 < 5.0  # was ~8 s for 0.5 s
    spectrum = torch.fft.rfft(out[0].double())
    assert abs(int(spectrum.abs().argmax()) / 2.0 - 300) <= 1  # the 300 Hz tone stays at 300 Hz


def test_pil_image_processor_class_is_the_pil_backend_on_every_transformers():
    """The reference ran the PIL image processor; transformers 5 made the plain class name the torchvision one
    (which resizes differently, ~1e-2 on pixel values)."""
    from x2i_core.mllm.chat import pil_image_processor_class

    cls = pil_image_processor_class("Qwen2VLImageProcessor")
    assert "Torchvision" not in " ".join(c.__name__ for c in cls.__mro__), cls.__mro__
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    out = cls(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(images=[im], return_tensors="pt")
    assert out["pixel_values"].dtype == torch.float32 and out["image_grid_thw"].tolist() == [[1, 8, 12]]


def _lying_video(path, values=(10, 50), gap_s=14_400):
    """A real 2-frame MJPEG Matroska file whose second frame sits ``gap_s`` seconds in: the container then
    claims duration x rate frames (345 601 here, as ComfyUI's VIDEO counts them) but holds two."""
    import fractions

    av = pytest.importorskip("av")
    with av.open(path, "w") as c:
        s = c.add_stream("mjpeg", rate=24)
        s.width = s.height = 32
        s.pix_fmt = "yuvj420p"
        s.time_base = fractions.Fraction(1, 24)
        for i, v in enumerate(values):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), v, np.uint8), format="rgb24")
            f.pts, f.time_base = i * gap_s * 24, s.time_base
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


@pytest.mark.parametrize("claimed", [345_601, 30_000_000, 4_000_000_000])
def test_a_video_is_sampled_over_the_frames_it_holds_not_the_frames_it_claims(tmp_path, claimed):
    """Once: 768 copies of the last frame for 345 601 claimed frames, a raw IndexError past 2**24 (float32
    indices) and a MemoryError for 4e9 (a list of every claimed index)."""
    from x2i_core.media import decode_sampled_frames

    path = _lying_video(str(tmp_path / "lie.mkv"))
    frames = decode_sampled_frames(path, claimed, 24.0, fps=1.0, max_frames=768)
    assert frames.shape == (2, 32, 32, 3)
    assert abs(int(frames[0].mean()) - 10) < 6 and abs(int(frames[1].mean()) - 50) < 6  # both real frames


def test_sampling_indices_stay_exact_past_float32(tmp_path):
    from x2i_core.media import sample_frames

    idx = sample_frames(range(30_000_002), 24.0, fps=1.0, max_frames=8)  # last index odd: not a float32
    assert idx[-1] == 30_000_001 and len(set(idx)) == len(idx) == 8
