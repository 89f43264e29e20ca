"""``python -m x2i_core`` - generate, convert-alignnet, convert-internvl, make-tiny-models, demo, training."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

from . import registry
from .errors import X2IError

log = logging.getLogger("x2i")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def _number(name: str, kind, lo, hi, range_text: str):
    """An argparse type: ``kind`` (int or float) within [lo, hi] (None = unbounded); errors name the option."""
    noun = "an integer" if kind is int else "a number"

    def parse(value):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {noun}, got {value!r}") from None
        if kind is float and not math.isfinite(v):  # every comparison with NaN is false: check it by name
            raise argparse.ArgumentTypeError(f"{name} must be a finite number ({range_text}), got {value!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{name} must be {range_text}, got {v}")
        return v
    return parse


def _positive_int(name):
    return _number(name, int, 1, None, "at least 1")


_seed = _number("seed", int, 0, 2**63 - 1, "between 0 and 2**63-1")
_guidance = _number("guidance", float, 0.0, 100.0, "between 0 and 100")


def _size(value):
    from .pipeline import parse_size

    try:
        return parse_size(value)
    except X2IError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(value):
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"device {value!r} is not a torch device ({exc}); expected cpu, cuda, "
                                         "cuda:1, mps, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {value!r}: this torch sees no CUDA GPU "
                                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"device {value!r}: there are {torch.cuda.device_count()} CUDA "
                                             "device(s), numbered from 0")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"device {value!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"device {value!r}: expected cpu, cuda, cuda:N, mps or xpu")
    return value


def _existing(what, check=os.path.isfile, noun="file"):
    def parse(value):
        if not check(value):
            raise argparse.ArgumentTypeError(f"{what} {noun} '{value}' does not exist")
        return value
    return parse


def _existing_dir(what):
    return _existing(what, os.path.isdir, "folder")


def _existing_file(what):
    return _existing(what)


def _out_image(value):
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"output '{value}' is an existing folder; give a file path inside it, "
                                         f"e.g. '{os.path.join(value, 'x2i.png')}'")
    if not value.lower().endswith(IMAGE_EXTS):
        raise argparse.ArgumentTypeError(f"output '{value}' must end with one of {', '.join(IMAGE_EXTS)}")
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"output folder '{folder}' does not exist")
    return value


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate an image from a text/image/video prompt")
    g.add_argument("--mllm", required=True, type=_existing_dir("MLLM"),
                   help=f"Hugging Face MLLM folder ({registry.labels()})")
    g.add_argument("--alignnet", required=True, type=_existing_file("AlignNet"),
                   help="AlignNet file (.safetensors or published .pt)")
    g.add_argument("--alignnet-config", default=None, help="config for a bare AlignNet state dict: JSON file or preset name")
    g.add_argument("--flux", required=True, type=_existing_dir("FLUX"), help="diffusers FLUX folder (e.g. FLUX.1-dev)")
    g.add_argument("--prompt", default=None, help="prompt text, any language")
    g.add_argument("--image", action="append", default=[], type=_existing_file("image"), help="input image (repeatable)")
    g.add_argument("--video-frames", nargs="+", default=None, type=_existing_file("video frame"),
                   help="one video given as its frame images, in order")
    g.add_argument("--audio", action="append", default=[], type=_existing_file("audio"),
                   help="input audio file (repeatable; WAV read without torchaudio; needs "
                        f"{registry.labels(registry.families_with('audio'), ' / ')})")
    g.add_argument("--instruction", default=None, help="editing instruction (the 'Instruction editing description')")
    g.add_argument("--sparse-prefill", default="off",
                   help="CritiPrefill sparse attention for long inputs: off (exact), auto (inputs of 4096+ tokens), "
                        "on, or with settings, e.g. 'auto,budget=2048'")
    g.add_argument("--pad-rows", default=None, choices=["reference", "constant"],
                   help="left-pad rows (training preset): reference = as the released AlignNets were trained "
                        "(transformers 4.49 on CUDA), constant = as transformers >= 4.5x computes them; default: "
                        "what the AlignNet file records, else reference")
    g.add_argument("--quant", default="none", choices=["none", "int8", "bnb8", "bnb4"],
                   help="MLLM quantisation: int8 weight-only (CPU/GPU) or bitsandbytes 8/4-bit (CUDA)")
    g.add_argument("--cpu-matmul", default="auto", choices=["auto", "torch", "onednn"],
                   help="the MLLM decoder's products on a CPU: onednn packs the weights once (faster for short "
                        "prompts); auto = onednn for fp32 on a CPU, else torch's nn.Linear")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code an MLLM folder ships instead of reading its files "
                        f"({registry.labels(registry.families_with(remote_code_option=True))}; no family needs it) - "
                        "only for trusted folders")
    g.add_argument("--preset", default="auto", choices=["auto", "training", "comfyui", "scripts"],
                   help="X2I prompt convention (auto: training for text, comfyui with media)")
    g.add_argument("--steps", type=_positive_int("steps"), default=28, help="sampling steps (FLUX-dev 28, schnell 4)")
    g.add_argument("--guidance", type=_guidance, default=3.5, help="FLUX guidance (default 3.5)")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--size", type=_size, default=(1024, 1024), help="WIDTHxHEIGHT, multiples of 16")
    g.add_argument("--device", default="cpu", type=_device, help="cpu, cuda, cuda:1 …")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--out", required=True, type=_out_image, help="output image path (.png/.jpg/.webp)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m x2i_core", description="X2I for FLUX: any prompt an MLLM understands.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_generate(sub)

    c = sub.add_parser("convert-alignnet", help="published AlignNet torch file -> our safetensors")
    c.add_argument("src", type=_existing_file("AlignNet"))
    c.add_argument("dst")
    c.add_argument("--config", default=None, help="config for a bare state dict: JSON file or preset name")

    ci = sub.add_parser("convert-internvl", help="original InternVL2.5 folder (internvl_chat) -> transformers -hf "
                        "folder, without running its code")
    ci.add_argument("src", type=_existing_dir("InternVL"))
    ci.add_argument("dst")
    ci.add_argument("--force", action="store_true", help="replace the output folder if it exists")

    t = sub.add_parser("make-tiny-models", help="write the tiny random model set (tests, demo)")
    t.add_argument("dir")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--no-comfy", action="store_true", help="skip the ComfyUI single-file FLUX (~0.8 GB) and VAE")
    t.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")

    for command, what, config_help, example in (
            ("distill", "train an AlignNet by attention distillation (torchrun for several GPUs)",
             "YAML config (see configs/distill-*.yaml)", "e.g. train.steps=200 train.lr=1e-4"),
            ("train-lora", "train a FLUX LoRA whose prompts are X2I conditionings",
             "YAML config (see configs/lora-*.yaml)", "e.g. lora.rank=32"),
            ("train-lightcontrol", "train LightControl on (source, instruction, target) triples", "YAML config", "")):
        tr = sub.add_parser(command, help=what)
        tr.add_argument("--config", default=None, help=config_help)
        tr.add_argument("overrides", nargs="*", help=f"key=value overrides{', ' + example if example else ''}")

    d = sub.add_parser("demo", help="build the tiny models and generate one image end to end")
    d.add_argument("--models", default=None, help="tiny model folder (default: the cache)")
    d.add_argument("--out", default=os.path.join("out", "x2i_demo.png"), help="output PNG")
    d.add_argument("--prompt", default="A red fox jumps over a lazy dog in the snowy forest at dawn.")
    d.add_argument("--size", type=_size, default=(256, 256))
    d.add_argument("--steps", type=_positive_int("steps"), default=4)
    return p


def _save_image(img, path: str) -> str:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower(), "PNG")
        img.save(tmp, format=fmt)
    return os.path.abspath(path)


def cmd_generate(args) -> str:
    from .pipeline import X2IPipeline

    if not args.prompt and not args.image and not args.video_frames and not args.audio:
        raise SystemExit("error: give --prompt, --image, --video-frames or --audio (the prompt is empty)")
    media = _read_media(args)  # before any model loads: a bad file fails in a second, not after minutes
    t0 = time.time()
    pipe = X2IPipeline.from_paths(args.mllm, args.alignnet, args.flux, device=args.device, dtype=args.dtype,
                                  alignnet_config=args.alignnet_config, trust_remote_code=args.trust_remote_code,
                                  quant=args.quant, cpu_matmul=args.cpu_matmul)
    log.info("models loaded in %.1fs", time.time() - t0)
    width, height = args.size
    img = pipe.generate(args.prompt, images=media["images"], videos=media["videos"], preset=args.preset,
                        steps=args.steps, guidance=args.guidance, seed=args.seed,
                        width=width, height=height, audios=media["audios"], instruction=args.instruction,
                        prefill=args.sparse_prefill, pad_rows=args.pad_rows)
    return _save_image(img, args.out)


def _read_media(args) -> dict:
    """The command's media files read and checked (images and frames decoded, audio loaded)."""
    from .audio import load_audio_file
    from .media import to_pil

    images = [to_pil(p, f"--image {i + 1}") for i, p in enumerate(args.image)] or None
    frames = [to_pil(p, f"--video-frames {i + 1}") for i, p in enumerate(args.video_frames or [])]
    audios = [load_audio_file(p) for p in args.audio] or None
    return {"images": images, "videos": [frames] if frames else None, "audios": audios}


def cmd_demo(args) -> str:
    from .pipeline import X2IPipeline
    from .tiny import default_cache_dir, make_tiny_models

    root = args.models or default_cache_dir()
    paths = make_tiny_models(root, comfy=False)
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    pipe = X2IPipeline.from_paths(paths["mllm"], paths["alignnet"], paths["flux"])
    width, height = args.size
    img = pipe.generate(args.prompt, steps=args.steps, width=width, height=height, seed=0)
    return _save_image(img, out)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            print(cmd_generate(args))
        elif args.command == "convert-alignnet":
            from .alignnet import convert_alignnet

            if not args.dst.endswith(".safetensors"):
                parser.error(f"output '{args.dst}' must end with .safetensors")
            net = convert_alignnet(args.src, args.dst, args.config)
            print(f"wrote {os.path.abspath(args.dst)} ({net.config.fusion} fusion, fits {net.fits})")
        elif args.command == "convert-internvl":
            from .convert_internvl import convert_internvl

            print(f"wrote {os.path.abspath(convert_internvl(args.src, args.dst, args.force))}")
        elif args.command == "make-tiny-models":
            from .tiny import make_tiny_models

            for name, path in make_tiny_models(args.dir, seed=args.seed, comfy=not args.no_comfy, force=args.force).items():
                print(f"{name}: {path}")
        elif args.command == "demo":
            print(cmd_demo(args))
        elif args.command == "train-lora":
            from .train.lora import run as run_lora

            print(run_lora(args.config, args.overrides))
        elif args.command == "train-lightcontrol":
            from .train.lightcontrol_trainer import run as run_lc

            print(run_lc(args.config, args.overrides))
        elif args.command == "distill":
            from .train.distill import run

            print(run(args.config, args.overrides))
    except X2IError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
