"""The bad-input battery (docs/bad-inputs.md): one case per row of the table.

Library rows call x2i_core directly; node rows run in ComfyUI's real PromptExecutor (one process, the rows one
after another, each followed by a good prompt: the host survives and the next prompt works); path rows go
through the real server's ``/prompt``.  Every refusal must be an X2IError (or a node error) whose message names
the input and what was expected, with no traceback; files must not be half-written; code in a pickle must
never run.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers.files import with_config
from x2i_core.errors import X2IError, X2IFileError, X2IInputError, X2IShapeError, X2IUnsafeFileError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "bad-inputs.md")


class _Evil:
    """Unpickling this creates the file ``target`` (what a hostile model file would do, harmlessly)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil_torch_file(path, marker, payload_key="state_dict"):
    torch.save({"config": {}, payload_key: {"w": _Evil(str(marker))}}, path)


def _truncate(src, dst, keep=0.5):
    data = open(src, "rb").read()
    with open(dst, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])
    return dst


def _mllm_copy(tiny, tmp):
    dst = os.path.join(tmp, "mllm-copy")
    shutil.copytree(tiny["mllm"], dst)
    return dst


def _tone(rate, seconds, channels=2):
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (330 + 110 * c) * t) for c in range(channels)]).astype(np.float32)


# -- library rows: id -> f(ctx) that must raise (returns (exception type, pattern)) or check and return None --------

def _alignnet(ctx, path):
    from x2i_core.alignnet import load_alignnet

    return load_alignnet(path)


def _lightcontrol(ctx, path):
    from x2i_core.lightcontrol import load_lightcontrol

    return load_lightcontrol(path)


def _mllm(ctx, path, **kw):
    from x2i_core.mllm import load_mllm

    return load_mllm(path, dtype="fp32", **kw)


def _enc(ctx, preset="comfyui", **req):
    from x2i_core.mllm import EncodeRequest

    return ctx["encoder"].encode(EncodeRequest(**req), preset=preset)


def row_alignnet_missing(ctx):
    _alignnet(ctx, ctx["tmp"] / "nope.safetensors")


def row_alignnet_empty(ctx):
    (ctx["tmp"] / "empty.safetensors").write_bytes(b"")
    _alignnet(ctx, ctx["tmp"] / "empty.safetensors")


def row_alignnet_truncated_safetensors(ctx):
    _alignnet(ctx, _truncate(ctx["tiny"]["alignnet_safetensors"], ctx["tmp"] / "cut.safetensors"))


def row_alignnet_html_page(ctx):
    (ctx["tmp"] / "page.safetensors").write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")
    _alignnet(ctx, ctx["tmp"] / "page.safetensors")


def row_alignnet_truncated_pt(ctx):
    _alignnet(ctx, _truncate(ctx["tiny"]["alignnet"], ctx["tmp"] / "cut.pt", 0.3))


def row_alignnet_is_a_lora(ctx):
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)},
              str(ctx["tmp"] / "lora.safetensors"))
    _alignnet(ctx, ctx["tmp"] / "lora.safetensors")


def row_alignnet_code_pickle(ctx):
    _evil_torch_file(ctx["tmp"] / "evil.pt", ctx["marker"])
    _alignnet(ctx, ctx["tmp"] / "evil.pt")


def row_lightcontrol_truncated(ctx):
    _lightcontrol(ctx, _truncate(ctx["tiny"]["lightcontrol"], ctx["tmp"] / "cut.bin", 0.4))


def row_lightcontrol_is_an_alignnet(ctx):
    _lightcontrol(ctx, ctx["tiny"]["alignnet_safetensors"])


def row_lightcontrol_code_pickle(ctx):
    torch.save({"0.time_embedding.linear_1.weight": _Evil(str(ctx["marker"]))}, ctx["tmp"] / "evil.bin")
    _lightcontrol(ctx, ctx["tmp"] / "evil.bin")


def row_mllm_folder_missing(ctx):
    _mllm(ctx, ctx["tmp"] / "no-such-model")


def row_mllm_config_corrupt(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    with open(os.path.join(d, "config.json"), "w") as fh:
        fh.write('{"model_type": "qwen2_5_vl", ')
    _mllm(ctx, d)


def row_mllm_no_tokenizer(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if os.path.exists(os.path.join(d, name)):
            os.remove(os.path.join(d, name))
    _mllm(ctx, d)


def row_mllm_config_malformed(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["vision_config"] = 5
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    _mllm(ctx, d)


def row_mllm_weights_truncated(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    w = os.path.join(d, "model.safetensors")
    _truncate(w, w + ".cut")
    os.replace(w + ".cut", w)
    _mllm(ctx, d)


def row_mllm_weights_code_pickle(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    os.remove(os.path.join(d, "model.safetensors"))
    torch.save({"model.embed_tokens.weight": _Evil(str(ctx["marker"]))}, os.path.join(d, "pytorch_model.bin"))
    _mllm(ctx, d)


def row_mllm_wrong_family(ctx):
    d = ctx["tmp"] / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _mllm(ctx, d)


def row_mllm_remote_code_switch_off(ctx):
    d = ctx["tmp"] / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "minicpmo",
                                               "auto_map": {"AutoModel": "modeling_minicpmo.MiniCPMO"}}))
    (d / "modeling_minicpmo.py").write_text(f"open({str(ctx['marker'])!r}, 'w')\n")
    _mllm(ctx, d)


def _minicpmo_copy(ctx):
    dst = os.path.join(ctx["tmp"], "minicpmo-copy")
    shutil.copytree(ctx["tiny"]["mllm_minicpmo"], dst)
    return dst


def row_minicpmo_pickle_weights(ctx):
    import torch
    from safetensors.torch import load_file

    d = _minicpmo_copy(ctx)
    torch.save(load_file(os.path.join(d, "model.safetensors")), os.path.join(d, "pytorch_model.bin"))
    os.remove(os.path.join(d, "model.safetensors"))
    _mllm(ctx, d)


def row_minicpmo_missing_tensors(ctx):
    from safetensors.torch import load_file, save_file

    d = _minicpmo_copy(ctx)
    state = load_file(os.path.join(d, "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("resampler.")}, os.path.join(d, "model.safetensors"))
    _mllm(ctx, d)


def row_minicpmo_bad_vision_config(ctx):
    d = _minicpmo_copy(ctx)
    path = os.path.join(d, "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg["audio_pool_step"] = 2.5
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    _mllm(ctx, d)


def row_mllm_published_pickle_file(ctx):
    _evil_torch_file(ctx["tmp"] / "qwen2.5-vl-7b-instruct.pt", ctx["marker"], "processor")
    _mllm(ctx, ctx["tmp"] / "qwen2.5-vl-7b-instruct.pt")


def row_alignnet_for_another_mllm(ctx):
    from x2i_core.tiny import build_alignnet

    net = build_alignnet(channels=29, hidden=64, seed=5)
    hs = _enc(ctx, text="a red fox", preset="training")
    net.check_hidden(hs.hidden, hs.mllm, "AlignNet 'alignnet-7b-like.safetensors'")


def row_alignnet_for_another_flux(ctx):
    from x2i_core.pipeline import X2IPipeline

    X2IPipeline.from_paths(ctx["tiny"]["mllm"], ctx["tiny"]["alignnet_safetensors"], ctx["tiny"]["flux_small"])


def row_lightcontrol_for_another_flux(ctx):
    from diffusers import FluxTransformer2DModel

    from x2i_core.lightcontrol import inject

    flux = FluxTransformer2DModel.from_pretrained(os.path.join(ctx["tiny"]["flux"], "transformer"))
    with inject(flux, [torch.zeros(1, 16, 3072)]):
        pass


def row_prompt_empty(ctx):
    _enc(ctx, text="", preset="training")


def row_prompt_whitespace_only(ctx):
    _enc(ctx, text=" \n\t ", preset="auto")


def row_prompt_only_special_tokens(ctx):
    _enc(ctx, text="<|im_end|><|endoftext|> <|im_start|>", preset="training")


def row_prompt_vision_placeholder_typed(ctx):
    _enc(ctx, text="draw <|image_pad|> please", preset="comfyui")


def row_prompt_longer_than_the_model(ctx):
    _enc(ctx, text="word " * 26000, preset="comfyui")


def row_prompt_long_training_preset_truncates(ctx):
    hs = _enc(ctx, text="a very long caption " * 400, preset="training")
    assert hs.hidden.shape[2] == 512 and hs.lengths[0] > 512  # cut to the training length, as in training


def row_image_zero_sized(ctx):
    _enc(ctx, text="x", images=np.zeros((0, 16, 3), np.uint8))


def row_image_wrong_channels(ctx):
    _enc(ctx, text="x", images=np.zeros((16, 16, 2), np.uint8))


def row_image_nan(ctx):
    _enc(ctx, text="x", images=np.full((16, 16, 3), np.nan, np.float32))


def _encodes(ctx, img, max_tokens=200):
    hs = _enc(ctx, text="x", images=img)
    assert torch.isfinite(hs.hidden).all() and hs.lengths[0] < max_tokens


def row_image_one_pixel(ctx):
    _encodes(ctx, np.full((1, 1, 3), 200, np.uint8))


def row_image_huge(ctx):
    _encodes(ctx, (np.random.RandomState(0).rand(3000, 4000, 3) * 255).astype(np.uint8))  # resized to the budget


def row_image_grayscale(ctx):
    from PIL import Image

    _encodes(ctx, Image.fromarray((np.random.RandomState(1).rand(40, 60) * 255).astype(np.uint8), "L"))


def row_image_rgba(ctx):
    from PIL import Image

    _encodes(ctx, Image.fromarray((np.random.RandomState(2).rand(40, 60, 4) * 255).astype(np.uint8), "RGBA"))


def row_image_16_bit(ctx):
    _encodes(ctx, (np.random.RandomState(3).rand(40, 60, 3) * 65535).astype(np.uint16))


def row_audio_empty(ctx):
    from x2i_core.audio import prepare_audio

    prepare_audio((np.zeros((2, 0), np.float32), 16000), 16000)


def row_audio_too_long(ctx):
    from x2i_core.audio import prepare_audio

    prepare_audio((np.zeros((1, 16000 * 301), np.float32), 16000), 16000)


def row_audio_bad_sample_rate(ctx):
    from x2i_core.audio import prepare_audio

    prepare_audio((_tone(16000, 0.1), 0), 16000)


def row_audio_stereo(ctx):
    from x2i_core.audio import prepare_audio

    st = _tone(16000, 0.25)
    mono = prepare_audio((st, 16000), 16000)
    assert mono.shape == (4000,) and np.allclose(mono, st.mean(0), atol=1e-6)


def row_audio_odd_rate(ctx):
    from x2i_core.audio import prepare_audio

    out = prepare_audio((_tone(7919, 0.5, 1), 7919), 16000)
    assert out.ndim == 1 and abs(out.shape[0] - 8000) <= 1 and np.isfinite(out).all()


def row_audio_to_a_model_without_audio(ctx):
    _enc(ctx, text="x", audios=[(_tone(16000, 0.2), 16000)])


def row_video_zero_frames(ctx):
    _enc(ctx, text="x", videos=[np.zeros((0, 32, 32, 3), np.uint8)])


def row_video_longer_than_the_frame_budget(ctx):
    from x2i_core.media import sample_frames

    frames = list(range(30 * 3600))  # one hour at 30 fps, 1 fps sampling, at most 768 frames
    kept = sample_frames(frames, 30.0, 1.0, 768)
    assert len(kept) == 768 and kept[0] == 0 and kept[-1] == frames[-1]  # spread over the whole clip, not cut


def row_hidden_states_nan(ctx):
    from x2i_core.alignnet import load_alignnet

    net = load_alignnet(ctx["tiny"]["alignnet_safetensors"])
    hs = _enc(ctx, text="a cat", preset="training")
    bad = hs.hidden.clone()
    bad[0, 1, 3, 5] = float("inf")
    net(bad)


@contextlib.contextmanager
def _read_only_dir(path):
    """A folder nobody can write into - root included (root ignores permission bits, so the folder is also
    made immutable with chattr while the row runs)."""
    os.mkdir(path)
    os.chmod(path, 0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield str(path)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        os.chmod(path, 0o755)


def row_output_folder_read_only_cli(ctx):
    from x2i_core.cli import main

    with _read_only_dir(ctx["tmp"] / "ro") as ro:
        code = main(["convert-alignnet", ctx["tiny"]["alignnet"], os.path.join(ro, "out.safetensors")])
        err = ctx["capsys"].readouterr().err
        assert code == 1, err
        assert "not writable" in err and ro in err and "Traceback" not in err, err
        assert os.listdir(ro) == []  # nothing half-written


def row_output_folder_read_only_trainer(ctx):
    from x2i_core.train.runtime import check_output_dir

    with _read_only_dir(ctx["tmp"] / "ro") as ro:
        with pytest.raises(X2IInputError, match=r"output folder '.*ro/run' cannot be created"):
            check_output_dir(os.path.join(ro, "run"))
        assert os.listdir(ro) == []

# -- hardening, round two: budgets before work, claims checked, configs named ------------------------------------

def row_mllm_config_too_deep(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    with open(os.path.join(d, "config.json"), "w") as fh:
        fh.write('{"model_type": "qwen2_5_vl", "a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _mllm(ctx, d)


def row_mllm_processor_patch_size_zero(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    name = next(n for n in ("preprocessor_config.json", "processor_config.json") if os.path.exists(os.path.join(d, n)))
    with open(os.path.join(d, name)) as fh:
        pre = json.load(fh)
    pre.get("image_processor", pre)["patch_size"] = 0
    with open(os.path.join(d, name), "w") as fh:
        json.dump(pre, fh)
    _mllm(ctx, d)


def row_mllm_config_nan_norm_eps(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    (cfg.get("text_config") or cfg)["rms_norm_eps"] = float("nan")
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    _mllm(ctx, d)


def row_mllm_tokenizer_json_only(ctx):
    d = _mllm_copy(ctx["tiny"], ctx["tmp"])
    for name in os.listdir(d):
        if name.startswith(("tokenizer_config", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
            os.remove(os.path.join(d, name))
    _mllm(ctx, d)


def row_alignnet_config_contradicts_tensors(ctx):
    from x2i_core.alignnet import load_alignnet

    load_alignnet(with_config(ctx["tiny"]["alignnet_safetensors"], ctx["tmp"] / "claims.safetensors",
                               output_dim1=10**6))


def row_lightcontrol_config_contradicts_tensors(ctx):
    from x2i_core.lightcontrol import LightControl, LightControlConfig, load_lightcontrol

    LightControl(LightControlConfig(num_modules=2, out_dim=32)).save(str(ctx["tmp"] / "lc.safetensors"))
    load_lightcontrol(with_config(ctx["tmp"] / "lc.safetensors", ctx["tmp"] / "claims.safetensors", out_dim=10**7))


def row_images_over_the_token_budget(ctx):
    from x2i_core.mllm import EncodeRequest

    old = os.environ.get("X2I_TOKEN_BUDGET")
    os.environ["X2I_TOKEN_BUDGET"] = "2000"
    try:
        ctx["encoder"].prepare([EncodeRequest(text="x", images=torch.rand(3, 1024, 1024, 3))], "comfyui",
                               image_size=3584)
    finally:
        if old is None:
            del os.environ["X2I_TOKEN_BUDGET"]
        else:
            os.environ["X2I_TOKEN_BUDGET"] = old


def _clip(path, frames=6, size=(64, 48)):
    from tools.comfy_fetch import write_video

    return write_video(path, (np.full((size[1], size[0], 3), (40 * i) % 256, np.uint8) for i in range(frames)))


def row_video_claims_more_frames_than_it_holds(ctx):
    from x2i_core.media import decode_sampled_frames

    frames = decode_sampled_frames(_clip(ctx["tmp"] / "liar.mp4"), 4 * 10**9, 4.0, fps=1.0, max_frames=768)
    assert len(frames) <= 6  # sampled over the 6 frames it holds, not 768 copies


def row_video_over_the_token_budget(ctx):
    from x2i_core.media import decode_sampled_frames

    decode_sampled_frames(_clip(ctx["tmp"] / "long.mp4", frames=40), 40, 4.0, fps=4.0, max_pixels=128 * 128,
                          token_budget=10)


def _generate_argv(ctx, *extra):
    t = ctx["tiny"]
    return ["generate", "--mllm", t["mllm"], "--alignnet", t["alignnet_safetensors"], "--flux", t["flux"], *extra]


def _cli_refuses(ctx, extra, needle):
    from x2i_core import cli

    with pytest.raises(SystemExit) as info:
        cli.main(_generate_argv(ctx, "--prompt", "x", "--out", str(ctx["tmp"] / "o.png"), *extra))
    assert info.value.code == 2
    err = ctx["capsys"].readouterr().err
    assert needle in err and "Traceback" not in err, err


def row_cli_guidance_nan(ctx):
    _cli_refuses(ctx, ["--guidance", "nan"], "guidance must be a finite number")


def row_cli_output_is_a_folder(ctx):
    _cli_refuses(ctx, ["--out", str(ctx["tmp"])], "is an existing folder")


def row_cli_bad_device(ctx):
    _cli_refuses(ctx, ["--device", "cuda:banana"], "is not a torch device")


def row_cli_size_too_large(ctx):
    _cli_refuses(ctx, ["--size", "32768x1024"], "more than 16384")


def row_cli_decompression_bomb(ctx):
    from PIL import Image

    from x2i_core import cli

    bomb = ctx["tmp"] / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    code = cli.main(_generate_argv(ctx, "--image", str(bomb), "--out", str(ctx["tmp"] / "o.png")))
    err = ctx["capsys"].readouterr().err
    assert code == 1 and "more pixels than PIL opens safely" in err and "Traceback" not in err, err



# id -> (row function, expected exception or None for "works", message pattern)
ROWS = {
    "alignnet-missing": (row_alignnet_missing, X2IFileError, r"nope\.safetensors' does not exist"),
    "alignnet-empty": (row_alignnet_empty, X2IFileError, r"empty \(0 bytes\).*download it again"),
    "alignnet-truncated-safetensors": (row_alignnet_truncated_safetensors, X2IFileError,
                                       r"cut\.safetensors.*corrupt or truncated"),
    "alignnet-html-page": (row_alignnet_html_page, X2IFileError, r"neither safetensors nor a torch.*HTML"),
    "alignnet-truncated-pt": (row_alignnet_truncated_pt, X2IFileError, r"cut\.pt.*(truncated|corrupt|cannot be read)"),
    "alignnet-is-a-lora": (row_alignnet_is_a_lora, X2IFileError, r"lora\.safetensors.*not an AlignNet"),
    "alignnet-code-pickle": (row_alignnet_code_pickle, X2IUnsafeFileError, r"evil\.pt' was refused.*code execution"),
    "lightcontrol-truncated": (row_lightcontrol_truncated, X2IFileError, r"cut\.bin.*(truncated|corrupt|cannot be read)"),
    "lightcontrol-is-an-alignnet": (row_lightcontrol_is_an_alignnet, X2IFileError, r"alignnet.*not a LightControl"),
    "lightcontrol-code-pickle": (row_lightcontrol_code_pickle, X2IUnsafeFileError, r"evil\.bin' was refused"),
    "mllm-folder-missing": (row_mllm_folder_missing, X2IFileError, r"no-such-model' does not exist; expected a Hugging Face"),
    "mllm-config-corrupt": (row_mllm_config_corrupt, X2IFileError, r"config\.json' is not valid JSON"),
    "mllm-no-tokenizer": (row_mllm_no_tokenizer, X2IFileError,
                          r"mllm-copy' has no tokenizer files; expected tokenizer\.json"),
    "mllm-config-malformed": (row_mllm_config_malformed, X2IFileError,
                              r"mllm-copy': config\.json does not describe a usable Qwen2\.5-VL model"),
    "mllm-weights-truncated": (row_mllm_weights_truncated, X2IFileError, r"truncated or corrupt \.safetensors"),
    "mllm-weights-code-pickle": (row_mllm_weights_code_pickle, X2IFileError, r"weights-only.*refused"),
    "mllm-wrong-family": (row_mllm_wrong_family, X2IFileError, r"model_type 'llama'; supported: qwen2_5_vl"),
    "mllm-remote-code-switch-off": (row_mllm_remote_code_switch_off, X2IFileError, r"no tokenizer files"),
    "minicpmo-pickle-weights": (row_minicpmo_pickle_weights, X2IFileError, r"only torch pickles.*does not unpickle"),
    "minicpmo-missing-tensors": (row_minicpmo_missing_tensors, X2IFileError, r"lack \d+ tensor.*resampler"),
    "minicpmo-bad-vision-config": (row_minicpmo_bad_vision_config, X2IFileError,
                                   r"audio_pool_step must be a whole number, found 2\.5"),
    "mllm-published-pickle-file": (row_mllm_published_pickle_file, X2IFileError, r"is a file.*pickle.*never opened"),
    "alignnet-for-another-mllm": (row_alignnet_for_another_mllm, X2IShapeError, r"C=29.*Qwen2.5-VL-tiny.*C=3"),
    "alignnet-for-another-flux": (row_alignnet_for_another_flux, X2IShapeError, r"width 4096.*expects 64"),
    "lightcontrol-for-another-flux": (row_lightcontrol_for_another_flux, X2IInputError,
                                      r"width 3072.*FLUX transformer is \d+ wide"),
    "prompt-empty": (row_prompt_empty, X2IInputError, r"empty"),
    "prompt-whitespace-only": (row_prompt_whitespace_only, X2IInputError, r"empty"),
    "prompt-only-special-tokens": (row_prompt_only_special_tokens, X2IInputError, r"only the MLLM's special tokens"),
    "prompt-vision-placeholder-typed": (row_prompt_vision_placeholder_typed, X2IInputError, r"placeholder.*remove them"),
    "prompt-longer-than-the-model": (row_prompt_longer_than_the_model, X2IInputError, r"at most 32768 positions"),
    "prompt-long-training-preset": (row_prompt_long_training_preset_truncates, None, None),
    "image-zero-sized": (row_image_zero_sized, X2IInputError, r"zero-sized"),
    "image-wrong-channels": (row_image_wrong_channels, X2IInputError, r"2 channels"),
    "image-nan": (row_image_nan, X2IInputError, r"NaN"),
    "image-one-pixel": (row_image_one_pixel, None, None),
    "image-huge": (row_image_huge, None, None),
    "image-grayscale": (row_image_grayscale, None, None),
    "image-rgba": (row_image_rgba, None, None),
    "image-16-bit": (row_image_16_bit, None, None),
    "audio-empty": (row_audio_empty, X2IInputError, r"empty"),
    "audio-too-long": (row_audio_too_long, X2IInputError, r"at most 300 s"),
    "audio-bad-sample-rate": (row_audio_bad_sample_rate, X2IInputError, r"sample rate"),
    "audio-stereo": (row_audio_stereo, None, None),
    "audio-odd-rate": (row_audio_odd_rate, None, None),
    "audio-to-a-model-without-audio": (row_audio_to_a_model_without_audio, X2IInputError, r"does not take audio.*Qwen2.5-Omni"),
    "video-zero-frames": (row_video_zero_frames, X2IInputError, r"no frames"),
    "video-longer-than-the-frame-budget": (row_video_longer_than_the_frame_budget, None, None),
    "hidden-states-nan": (row_hidden_states_nan, X2IInputError, r"NaN or infinite"),
    "output-folder-read-only-cli": (row_output_folder_read_only_cli, None, None),
    "output-folder-read-only-trainer": (row_output_folder_read_only_trainer, None, None),
    "mllm-config-too-deep": (row_mllm_config_too_deep, X2IFileError, r"config\.json' is nested too deeply"),
    "mllm-processor-patch-size-zero": (row_mllm_processor_patch_size_zero, X2IFileError, r"patch_size is 0; expected"),
    "mllm-config-nan-norm-eps": (row_mllm_config_nan_norm_eps, X2IFileError, r"rms_norm_eps is nan; expected"),
    "mllm-tokenizer-json-only": (row_mllm_tokenizer_json_only, X2IFileError, r"has no tokenizer_config\.json"),
    "alignnet-config-contradicts-tensors": (row_alignnet_config_contradicts_tensors, X2IFileError, r"has shape"),
    "lightcontrol-config-contradicts-tensors": (row_lightcontrol_config_contradicts_tensors, X2IFileError,
                                                r"has shape"),
    "images-over-the-token-budget": (row_images_over_the_token_budget, X2IInputError,
                                     r"3 image\(s\): 3675 tokens.*more than 2000.*image_resolution"),
    "video-claims-more-frames-than-it-holds": (row_video_claims_more_frames_than_it_holds, None, None),
    "video-over-the-token-budget": (row_video_over_the_token_budget, X2IInputError,
                                    r"40 sampled frames of 64x48 need \d+ visual tokens.*lower max_frames"),
    "cli-guidance-nan": (row_cli_guidance_nan, None, None),
    "cli-output-is-a-folder": (row_cli_output_is_a_folder, None, None),
    "cli-bad-device": (row_cli_bad_device, None, None),
    "cli-size-too-large": (row_cli_size_too_large, None, None),
    "cli-decompression-bomb": (row_cli_decompression_bomb, None, None),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_library_row(row, tiny, encoder, tmp_path, capsys):
    fn, exc, pattern = ROWS[row]
    marker = tmp_path / "code-ran"
    ctx = {"tiny": tiny, "encoder": encoder, "tmp": tmp_path, "marker": marker, "capsys": capsys}
    before = set(os.listdir(tmp_path))
    if exc is None:
        fn(ctx)
    else:
        with pytest.raises(X2IError) as info:
            fn(ctx)
        assert isinstance(info.value, exc), f"{type(info.value).__name__}: {info.value}"
        assert re.search(pattern, str(info.value), re.S), str(info.value)
        assert "Traceback" not in str(info.value)
    assert not marker.exists(), "code inside a model file ran"
    leftovers = [n for n in set(os.listdir(tmp_path)) - before if n.startswith(".tmp")]
    assert not leftovers, leftovers


# -- node rows: the real executor, each bad prompt followed by a good one ---------------------------------------

NODE_ROWS = {
    # id: (fault injected into the MLLM forward, graph changes, expected status, message fragments)
    "node-oom-during-encode": ("oom", {}, "execution_error", ["X2I MLLM Encode", "out of memory", "dtype fp16/bf16"]),
    "node-cancel-during-encode": ("cancel", {}, "execution_interrupted", []),
    "node-nan-hidden-states": ("nan", {}, "execution_error", ["X2I AlignNet Project", "NaN or infinite"]),
    "node-only-special-tokens": (None, {"X2IMLLMEncode": {"text": "<|im_end|><|im_start|>"}}, "execution_error",
                                 ["X2I MLLM Encode", "special tokens"]),
    "node-very-long-prompt": (None, {"X2IMLLMEncode": {"text": "word " * 26000, "preset": "comfyui"}},
                              "execution_error", ["X2I MLLM Encode", "max_position_embeddings"]),
    "node-nan-conditioning": (None, "nan-conditioning", "execution_error",
                              ["X2I Sampler", "NaN or infinite", "conditioning 1"]),
    "node-damaged-alignnet": (None, {"X2IAlignNetLoader": {"alignnet_name": "alignnet-nan.safetensors"}},
                              "execution_error", ["X2I AlignNet Project", "alignnet-nan.safetensors", "damaged"]),
    "node-truncated-alignnet": (None, {"X2IAlignNetLoader": {"alignnet_name": "alignnet-cut.safetensors"}},
                                "execution_error", ["X2I AlignNet Loader", "alignnet-cut.safetensors", "truncated"]),
    "node-code-pickle-alignnet": (None, {"X2IAlignNetLoader": {"alignnet_name": "alignnet-evil.pt"}},
                                  "execution_error", ["X2I AlignNet Loader", "alignnet-evil.pt", "refused"]),
}


def _node_prompt(host, row, index):
    from helpers.comfy import node_of, tiny_api

    fault, change, _, _ = NODE_ROWS[row]
    api = tiny_api(host, "x2i_sampler.json", **(change if isinstance(change, dict) else {}))
    enc = node_of(api, "X2IMLLMEncode")
    if fault or not isinstance(change, dict):
        api[enc]["inputs"]["text"] = f"battery row {index}: a lighthouse"  # never an encode-cache hit
    if change == "nan-conditioning":  # a conditioning with NaN from outside the pack (stock nodes only)
        samp = node_of(api, "X2ISampler")
        cond = api[samp]["inputs"]["conditioning"]
        api["95"] = {"class_type": "ConditioningAverage",
                     "inputs": {"conditioning_to": cond, "conditioning_from": cond, "conditioning_to_strength": float("nan")}}
        api[samp]["inputs"]["conditioning"] = ["95", 0]
    return api


@pytest.fixture(scope="module")
def node_runs(host, tmp_path_factory):
    from helpers.comfy import node_of, tiny_api
    from x2i_core.tiny import build_alignnet

    x2i = os.path.join(host["base"], "models", "x2i")
    net = build_alignnet(channels=3, hidden=64, seed=9)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    net.save(os.path.join(x2i, "alignnet-nan.safetensors"))
    _truncate(host["tiny"]["alignnet_safetensors"], os.path.join(x2i, "alignnet-cut.safetensors"))
    marker = os.path.join(host["base"], "pickle-code-ran")
    _evil_torch_file(os.path.join(x2i, "alignnet-evil.pt"), marker)
    prompts, faults = {}, {}
    for i, row in enumerate(sorted(NODE_ROWS)):
        prompts[row] = _node_prompt(host, row, i)
        if NODE_ROWS[row][0]:
            faults[row] = NODE_ROWS[row][0]
        good = tiny_api(host, "x2i_sampler.json")
        good[node_of(good, "X2ISampler")]["inputs"]["seed"] = i
        prompts[f"after:{row}"] = good
    tmp = tmp_path_factory.mktemp("battery")
    spec = tmp / "spec.json"
    out = str(tmp / "out.safetensors")
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompts": prompts,
                                "faults": faults, "capture": {}, "out": out}, allow_nan=True))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    facts = json.loads(open(out + ".json").read())
    facts["marker"] = os.path.exists(marker)
    return facts


@pytest.mark.comfy
@pytest.mark.parametrize("row", sorted(NODE_ROWS))
def test_node_row_in_the_real_executor(row, node_runs):
    _, _, status, needles = NODE_ROWS[row]
    events = node_runs["status"][row]
    assert status in events, events
    if status == "execution_error":
        (msg,) = node_runs["errors"][row]
        for needle in needles:
            assert needle in msg, msg
        assert "Traceback" not in msg and len(msg) < 2000, msg
    # the host survived and the next prompt works
    assert "execution_success" in node_runs["status"][f"after:{row}"], node_runs["status"][f"after:{row}"]
    assert not node_runs["marker"], "code inside a model file ran"


# -- paths: names sent in /prompt cannot leave the model folders --------------------------------------------------

ESCAPES = ["../../etc", "../x2i/alignnet-tiny.safetensors", "/etc/passwd", "C:\\Windows\\win.ini",
           "..\\..\\secret.safetensors", "sub/../../secret.safetensors", "escape/../../../secret.safetensors",
           "secret.safetensors\x00.pt", "%2e%2e/secret.safetensors", "~/secret.safetensors", ""]


@pytest.mark.comfy
def test_model_names_cannot_escape_the_model_folders_through_prompt(host, tmp_path):
    s, base = host["server"], host["base"]
    # a file outside the model folders that a hostile prompt would like to load, and a symlink the
    # folder's owner placed inside models/x2i pointing at a folder outside
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(host["tiny"]["alignnet_safetensors"], outside / "secret.safetensors")
    shutil.copyfile(host["tiny"]["alignnet_safetensors"], os.path.join(base, "secret.safetensors"))
    link = os.path.join(base, "models", "x2i", "escape")
    if not os.path.lexists(link):
        os.symlink(str(outside), link)
    try:
        _escape_checks(host, s)
    finally:  # the host is shared by the whole session: leave its model folder as it was
        os.unlink(link)
        os.unlink(os.path.join(base, "secret.safetensors"))


def _escape_checks(host, s):
    from helpers.comfy import tiny_api
    from tools.comfy_server import PromptRejected, execution_error

    loaders = {"X2IAlignNetLoader": "alignnet_name", "X2ILightControlLoader": "lightcontrol_name",
               "X2IMLLMLoader": "model_name"}
    checked = 0
    for name in ESCAPES:
        for wf, cls in (("x2i_sampler.json", "X2IAlignNetLoader"), ("x2i_sampler.json", "X2IMLLMLoader"),
                        ("x2i_edit_lightcontrol.json", "X2ILightControlLoader")):
            api = tiny_api(host, wf, **{cls: {loaders[cls]: name}})
            try:
                entry = s.run(api)
            except PromptRejected as exc:  # ComfyUI 0.28 validates combo values against the list before running
                errors = [e for node in exc.body.get("node_errors", {}).values() if node["class_type"] == cls
                          for e in node["errors"]]
                assert errors and all(e["type"] == "value_not_in_list" for e in errors), (name, cls, exc.body)
                checked += 1
                continue
            err = execution_error(entry)
            assert err is not None and err["node_type"] == cls, (name, cls, entry["status"])
            msg = err["exception_message"]
            assert ("not a plain name" in msg or "was not found" in msg) and "Traceback" not in msg, (name, msg)
            checked += 1
    # a symlink the owner placed is followed, as in ComfyUI's own loaders (documented)
    entry = s.run(tiny_api(host, "x2i_sampler.json", X2IAlignNetLoader={"alignnet_name": "escape/secret.safetensors"}))
    assert execution_error(entry) is None, execution_error(entry)
    assert checked == 3 * len(ESCAPES)
    entry = s.run(tiny_api(host, "x2i_sampler.json"))
    assert execution_error(entry) is None


# -- the table in the docs and the rows here are the same ---------------------------------------------------------

def test_the_documented_battery_has_a_test_per_row():
    rows = []
    for line in open(DOC, encoding="utf-8"):
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|", line)
        if m:
            rows.append(m.group(1))
    assert len(rows) >= 30 and len(rows) == len(set(rows)), rows
    tested = set(ROWS) | set(NODE_ROWS) | {"paths-escape"}
    assert set(rows) == tested, (sorted(set(rows) - tested), sorted(tested - set(rows)))
