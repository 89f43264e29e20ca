"""Qwen2.5-VL's multimodal rotary positions for a padded batch, computed from the token ids and image grids
(pure torch; used where a host's decoder takes explicit positions, e.g. ComfyUI's native Qwen2.5-VL)."""

from __future__ import annotations

import torch

from ..errors import X2IInputError


def rope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   image_token_id: int, merge: int = 2) -> torch.Tensor:
    """Qwen2.5-VL's multimodal RoPE positions ``[3, B, S]`` (temporal, height, width), as transformers
    computes them for a padded batch: real tokens count from 0 in order, each image's merged tokens take
    ``start + (0, row, column)`` and the text after it continues at ``start + max(rows, columns)``;
    padding sits at position 1."""
    B, S = input_ids.shape
    pos = torch.ones(3, B, S, dtype=torch.long)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    image = 0
    for b in range(B):
        real = torch.nonzero(attention_mask[b].bool()).flatten().tolist()
        ids = input_ids[b].tolist()
        nxt = 0
        k = 0
        while k < len(real):
            if ids[real[k]] != image_token_id:
                pos[:, b, real[k]] = nxt
                nxt += 1
                k += 1
                continue
            if image >= len(grids):
                raise X2IInputError("the prompt has more image tokens than images were processed")
            t, h, w = grids[image]
            h, w = h // merge, w // merge
            n = t * h * w
            cols = [real[k + j] for j in range(n)] if k + n <= len(real) else None
            if cols is None or any(ids[c] != image_token_id for c in cols):
                raise X2IInputError(f"image {image + 1} expects {n} image tokens in the prompt; found fewer")
            grid = torch.arange(n)
            idx = torch.tensor(cols)
            pos[0, b, idx] = nxt  # a still image has one temporal slot
            pos[1, b, idx] = nxt + (grid // w) % h
            pos[2, b, idx] = nxt + grid % w
            nxt += max(h, w)
            image += 1
            k += n
    return pos
