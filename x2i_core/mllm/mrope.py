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


def qwen25vl_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, image_token_id: int,
                       video_token_id: int, vision_start_token_id: int, merge: int, tokens_per_second: float,
                       image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                       second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen2.5-VL's M-RoPE positions ``[3, B, S]`` for a (padded) batch, computed as transformers 4.49 computed
    them for the reference (``get_rope_index``), so that the result does not depend on the installed
    transformers (5.x derives them from ``mm_token_type_ids`` instead).

    Per row, over its real tokens: each media item is the ``vision_start`` token followed by its merged patch
    tokens; text runs count on from the last position + 1; a media item's tokens take ``start + (t, row, col)``
    with ``t`` = frame index x seconds per grid step (0 for a still image) x ``tokens_per_second``, truncated
    to an integer; pads sit at position 1."""
    b, s = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = torch.ones(3, b, s, dtype=torch.long)
    image_i = video_i = 0
    for r in range(b):
        real = mask[r].bool().cpu()
        tokens = input_ids[r].cpu()[real].tolist()
        starts = [i for i, t in enumerate(tokens[:-1]) if t == vision_start_token_id]
        kinds = [tokens[i + 1] for i in starts]
        left = {"image": kinds.count(image_token_id), "video": kinds.count(video_token_id)}
        parts: list[torch.Tensor] = []
        st = 0
        for _ in range(left["image"] + left["video"]):
            nxt = _next_index(tokens, image_token_id, st) if left["image"] else len(tokens) + 1
            nxt_v = _next_index(tokens, video_token_id, st) if left["video"] else len(tokens) + 1
            if nxt < nxt_v:
                grid, step, ed = _grid(image_grid_thw, image_i, "image"), torch.tensor(0.0), nxt
                image_i, left["image"] = image_i + 1, left["image"] - 1
            else:
                grid, ed = _grid(video_grid_thw, video_i, "video"), nxt_v
                step = (second_per_grid_ts[video_i].float().cpu() if second_per_grid_ts is not None
                        else torch.tensor(1.0))
                video_i, left["video"] = video_i + 1, left["video"] - 1
            t, h, w = grid[0], grid[1] // merge, grid[2] // merge
            base = int(parts[-1].max()) + 1 if parts else 0
            parts.append(torch.arange(ed - st).view(1, -1).expand(3, -1) + base)
            frames = torch.arange(t).view(-1, 1).expand(-1, h * w)
            t_index = (frames * step * tokens_per_second).long().flatten()
            h_index = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
            w_index = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
            parts.append(torch.stack([t_index, h_index, w_index]) + (ed - st) + base)
            st = ed + t * h * w
        if st < len(tokens):
            base = int(parts[-1].max()) + 1 if parts else 0
            parts.append(torch.arange(len(tokens) - st).view(1, -1).expand(3, -1) + base)
        if parts:
            pos[:, r, real] = torch.cat(parts, dim=1)
    return pos


def _next_index(tokens: list[int], token: int, start: int) -> int:
    try:
        return tokens.index(token, start)
    except ValueError:
        raise X2IInputError("a vision_start token is not followed by the media tokens it opens") from None


def _grid(grids: torch.Tensor | None, i: int, kind: str) -> tuple[int, int, int]:
    if grids is None or i >= len(grids):
        raise X2IInputError(f"the prompt has more {kind} placeholders than {kind}s were processed")
    return tuple(int(v) for v in grids[i].tolist())
