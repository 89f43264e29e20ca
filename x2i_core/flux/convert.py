"""FLUX weights: the original (BFL / ComfyUI single-file) key layout -> diffusers.

Covers double- and single-stream blocks and the embedders; fused ``qkv`` and
``linear1`` are split into diffusers' separate projections, and the final
norm's (shift, scale) halves are swapped into diffusers' (scale, shift).
"""

from __future__ import annotations

import torch

_DOUBLE = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
}


def bfl_flux_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k[len("model.diffusion_model."):] if k.startswith("model.diffusion_model.") else k: v for k, v in sd.items()}
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for src, dst in _GLOBAL.items():
        for end in ("weight", "bias"):
            if f"{src}.{end}" in sd:
                out[f"{dst}.{end}"] = sd[f"{src}.{end}"]
    for end in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{end}"].chunk(2, dim=0)
        out[f"norm_out.linear.{end}"] = torch.cat([scale, shift], dim=0)
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")})
    for i in doubles:
        p, q = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for end in ("weight", "bias"):
            for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                for name, part in zip(names, sd[f"{p}{stream}_attn.qkv.{end}"].split(hidden, dim=0)):
                    out[f"{q}attn.{name}.{end}"] = part
            for src, dst in _DOUBLE.items():
                out[f"{q}{dst}.{end}"] = sd[f"{p}{src}.{end}"]
        for src, dst in _DOUBLE_NORMS.items():
            out[q + dst] = sd[p + src]
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")})
    for j in singles:
        p, q = f"single_blocks.{j}.", f"single_transformer_blocks.{j}."
        for end in ("weight", "bias"):
            linear1 = sd[f"{p}linear1.{end}"]
            q_, k_, v_, mlp = linear1.split([hidden, hidden, hidden, linear1.shape[0] - 3 * hidden])
            out[f"{q}attn.to_q.{end}"], out[f"{q}attn.to_k.{end}"], out[f"{q}attn.to_v.{end}"] = q_, k_, v_
            out[f"{q}proj_mlp.{end}"] = mlp
            for src, dst in _SINGLE.items():
                out[f"{q}{dst}.{end}"] = sd[f"{p}{src}.{end}"]
        for src, dst in _SINGLE_NORMS.items():
            out[q + dst] = sd[p + src]
    return out


def diffusers_flux_from_bfl(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A diffusers ``FluxTransformer2DModel`` holding the weights of a BFL-layout state dict."""
    from diffusers import FluxTransformer2DModel

    conv = bfl_flux_to_diffusers(sd)
    hidden = conv["x_embedder.weight"].shape[0]
    heads = hidden // 128
    with torch.device("meta"):  # no random init of weights that are replaced right away
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=conv["x_embedder.weight"].shape[1],
            num_layers=len({k.split(".")[1] for k in conv if k.startswith("transformer_blocks.")}),
            num_single_layers=len({k.split(".")[1] for k in conv if k.startswith("single_transformer_blocks.")}),
            attention_head_dim=128, num_attention_heads=heads,
            joint_attention_dim=conv["context_embedder.weight"].shape[1],
            pooled_projection_dim=conv["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in conv, axes_dims_rope=(16, 56, 56),
        )
    model.load_state_dict({k: v.to(dtype) for k, v in conv.items()}, strict=True, assign=True)
    return model.eval()
