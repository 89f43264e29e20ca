"""Small on-disk training datasets for the trainers' tests."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

CAPTIONS = ["a red fox in the snow", "a cat on a wooden table", "an oil painting of a lighthouse",
            "a futuristic city at night", "一只可爱的小猫", "a dog running on the beach"]


def caption_file(path, captions=CAPTIONS):
    """A .txt caption file (distillation data)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(captions) + "\n")
    return str(path)


def write_tar_shard(path, captions):
    """A WebDataset-style shard of ``NNNNNN.json`` caption members (distillation data)."""
    with tarfile.open(path, "w") as tf:
        for i, cap in enumerate(captions):
            data = json.dumps({"caption": cap}).encode("utf-8")
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def lora_dataset(folder, n=4, with_reference=True, corrupt=False, missing_caption=False):
    """Images of several sizes with sidecar captions, plus an image + text -> image sample (LoRA data)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    sizes = [(64, 64), (96, 64), (64, 96), (80, 80)]
    for i in range(n):
        w, h = sizes[i % 4]
        Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(os.path.join(folder, f"img{i}.png"))
        if missing_caption and i == 1:
            continue
        with open(os.path.join(folder, f"img{i}.txt"), "w") as fh:
            fh.write(["a red square", "a blue circle", "一条绿色的条纹", "a yellow gradient"][i % 4])
    if with_reference:  # image + text -> image: a sample with a reference picture
        Image.fromarray((rng.rand(50, 70, 3) * 255).astype(np.uint8)).save(os.path.join(folder, "ref0.png"))
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(os.path.join(folder, "edit.png"))
        with open(os.path.join(folder, "edit.json"), "w") as fh:
            json.dump({"caption": "the same scene at night", "references": ["ref0.png"]}, fh)
    if corrupt:
        with open(os.path.join(folder, "broken.png"), "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\nthis is not an image")
        with open(os.path.join(folder, "broken.txt"), "w") as fh:
            fh.write("a broken file")
    return folder


def edit_triples(folder, n=3):
    """(source, target, instruction) triples (LightControl data)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        src = (rng.rand(64, 64, 3) * 255).astype(np.uint8)
        tgt = np.clip(src.astype(int) + [60, -20, -40][i % 3], 0, 255).astype(np.uint8)
        Image.fromarray(src).save(os.path.join(folder, f"s{i}_source.png"))
        Image.fromarray(tgt).save(os.path.join(folder, f"s{i}_target.png"))
        with open(os.path.join(folder, f"s{i}.txt"), "w") as fh:
            fh.write(["make it red", "add snow", "turn it into night"][i % 3])
    return folder
