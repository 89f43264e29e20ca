"""The composability matrix: X2I conditioning inside the stock ComfyUI nodes users already combine.

Every cell is one API prompt run by ComfyUI's own ``PromptExecutor`` (``tools/comfy_host.py inprocess``) on
the tiny models, with FLUX evaluations counted (``Flux.forward_orig`` calls and batch rows). The checks in
``tests/test_composability.py`` assert what would fail if the composition were broken; :data:`CELLS` is
also the source of the README table (``python -m tests.helpers.composability`` prints it;
the test compares the README with it).
"""

from __future__ import annotations

CAPTION_A = "a red fox in the snow"
CAPTION_B = "一座海边的灯塔，暴风雨的天空"  # a lighthouse by the sea under a stormy sky
STEPS = 4
CACHE_STEPS = 8
EXPECTED_ERRORS = {"x2i_blend_refused": "token width 4096 and pooled width 768, 'other' has 2048"}
SIZE = 128

# (cell id, group, the stock nodes it combines with X2I, what the test asserts)
CELLS = [
    ("baseline", "sampling", "KSampler (cfg 1)", "reference for the cells below: one FLUX call per step"),
    ("easycache", "speed", "EasyCache → KSampler", "fewer FLUX calls than steps; threshold 0 skips none"),
    ("lazycache", "speed", "LazyCache → KSampler", "fewer FLUX calls than steps"),
    ("easycache_x2i", "speed", "EasyCache → X2I Sampler", "fewer FLUX calls than the X2I Sampler alone"),
    ("lazycache_x2i", "speed", "LazyCache → X2I Sampler", "fewer FLUX calls than the X2I Sampler alone"),
    ("custom_basic", "sampling", "SamplerCustomAdvanced + BasicGuider + BasicScheduler + RandomNoise",
     "latent equals KSampler's with the same seed"),
    ("cfg_guider", "sampling", "CFGGuider (cfg 3) + ConditioningZeroOut negative",
     "2 batch rows per step (cond + uncond); latent differs from cfg 1"),
    ("model_sampling", "sampling", "ModelSamplingFlux", "latent changes with max_shift"),
    ("flux_guidance", "sampling", "FluxGuidance", "conditioning carries the new guidance; latent changes"),
    ("beta_scheduler", "sampling", "BetaSamplingScheduler", "one call per step; latent differs from BasicScheduler"),
    ("batch", "sampling", "EmptySD3LatentImage batch 2", "2 rows per call; item 0 equals the batch-1 latent"),
    ("img2img", "sampling", "LoadImage → VAEEncode → KSampler denoise 0.5",
     "latent nearer the source than text-to-image"),
    ("inpaint", "sampling", "SetLatentNoiseMask", "unmasked latent columns equal the source; masked ones change"),
    ("combine", "conditioning", "ConditioningCombine (X2I + X2I)", "2 entries, batched: 2 rows per step"),
    ("average", "conditioning", "ConditioningAverage (X2I, X2I)", "sequence and pooled = the weighted mean"),
    ("average_stock", "conditioning", "ConditioningAverage (X2I to, T5+CLIP from)",
     "first T5-length rows weighted, the rest X2I × strength; pooled weighted"),
    ("concat", "conditioning", "ConditioningConcat (X2I + X2I)", "1024 text tokens reach FLUX; latent changes"),
    ("timestep_range", "conditioning", "ConditioningSetTimestepRange ×2 + Combine",
     "one cond per step (both only on the boundary step); latent differs from either alone"),
    ("set_area", "conditioning", "ConditioningSetArea + Combine", "area kept; area and full cond evaluated per step"),
    ("zero_out", "conditioning", "ConditioningZeroOut negative, KSampler cfg 3", "2 rows per step; latent differs"),
    ("mixed_combine", "mixed", "ConditioningCombine (X2I + stock CLIPTextEncodeFlux)",
     "runs with different lengths; latent differs from either alone"),
    ("control_chain", "control", "X2I LightControl → stock ControlNet (FLUX, XLabs layout) → KSampler, LoRA on FLUX",
     "the ControlNet runs every step; the latent differs from each control alone and from the chain without the LoRA"),
    ("x2i_blend", "mixed", "X2I Blend Conditioning (X2I + T5+CLIP, 0.7)",
     "one-step latent = 0.7 × X2I's + 0.3 × T5+CLIP's (a weighted blend of predictions, lengths differ); "
     "conditioning of another width refused on the node"),
]


def readme_table() -> str:
    lines = ["| cell | group | stock nodes combined with X2I | asserted in the real executor |",
             "|---|---|---|---|"]
    lines += [f"| `{cid}` | {group} | {nodes} | {what} |" for cid, group, nodes, what in CELLS]
    return "\n".join(lines)


def _n(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def shared_nodes(names: dict) -> dict:
    """Nodes every cell reuses (same ids and inputs, so the executor's cache runs them once)."""
    return {
        "unet": _n("UNETLoader", unet_name=names["unet"], weight_dtype="default"),
        "vae": _n("VAELoader", vae_name=names["vae"]),
        "mllm": _n("X2IMLLMLoader", model_name=names["mllm"], dtype="fp32", device="default"),
        "encA": _n("X2IMLLMEncode", mllm=["mllm", 0], text=CAPTION_A, preset="auto",
                   image_resolution=0),
        "encB": _n("X2IMLLMEncode", mllm=["mllm", 0], text=CAPTION_B, preset="auto",
                   image_resolution=0),
        "align": _n("X2IAlignNetLoader", alignnet_name=names["alignnet_published"]),
        "A": _n("X2IAlignNetProject", hidden=["encA", 0], alignnet=["align", 0], guidance=3.5),
        "B": _n("X2IAlignNetProject", hidden=["encB", 0], alignnet=["align", 0], guidance=3.5),
        "negA": _n("ConditioningZeroOut", conditioning=["A", 0]),
        "empty": _n("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1),
        "stockclip": _n("X2ITestTinyFluxTextEncoders", seed=0, t5_width=4096),
        "T": _n("CLIPTextEncodeFlux", clip=["stockclip", 0], clip_l=CAPTION_A, t5xxl=CAPTION_A, guidance=3.5),
        "photo": _n("LoadImage", image="photo.png"),
        "photo64": _n("ImageScale", image=["photo", 0], upscale_method="nearest-exact", width=SIZE, height=SIZE,
                      crop="center"),
        "source": _n("VAEEncode", pixels=["photo64", 0], vae=["vae", 0]),
    }


def ksampler(model, positive, negative, latent, steps=STEPS, cfg=1.0, denoise=1.0, seed=1):
    return _n("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="simple",
              positive=positive, negative=negative, latent_image=latent, denoise=denoise)


def x2i_sampler(model, conditioning, steps=CACHE_STEPS):
    return _n("X2ISampler", model=model, vae=["vae", 0], conditioning=conditioning, seed=1, steps=steps,
              guidance=3.5, width=SIZE, height=SIZE, sampler_name="euler", scheduler="simple",
              control_strength=1.0)


def cell_prompts(names: dict) -> tuple[dict, dict]:
    """{label: API prompt} and {label: [node ids to capture]} for every cell (and the cells' controls)."""
    base = shared_nodes(names)
    prompts: dict[str, dict] = {}
    capture: dict[str, list[str]] = {}

    def add(label, nodes, cap):
        nodes = dict(nodes)
        for k, v in list(nodes.items()):  # an output node per sampler (the executor runs what outputs need)
            if v["class_type"] in ("KSampler", "SamplerCustomAdvanced"):
                nodes[f"{k}.save"] = _n("SaveLatent", samples=[k, 0], filename_prefix=f"matrix/{label}")
            elif v["class_type"] == "X2ISampler":
                nodes[f"{k}.save"] = _n("PreviewImage", images=[k, 0])
        if not any(k.endswith(".save") for k in nodes):
            last = list(nodes)[-1]
            nodes[f"{last}.save"] = _n("PreviewAny", source=[last, 0])
        prompts[label] = {**base, **{f"{label}.{k}": _rename(v, label, nodes) for k, v in nodes.items()}}
        capture[label] = [f"{label}.{c}" if c in nodes else c for c in cap]

    def ks(**kw):
        return ksampler(["unet", 0], ["A", 0], ["negA", 0], ["empty", 0], **kw)

    add("baseline", {"ks": ks()}, ["ks"])
    add("baseline_8", {"ks": ks(steps=CACHE_STEPS)}, ["ks"])
    for kind in ("EasyCache", "LazyCache"):
        low = kind.lower()
        add(low, {"m": _n(kind, model=["unet", 0], reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                          verbose=False),
                  "ks": ksampler(["m", 0], ["A", 0], ["negA", 0], ["empty", 0], steps=CACHE_STEPS)}, ["ks"])
        add(f"{low}_x2i", {"m": _n(kind, model=["unet", 0], reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                                   verbose=False),
                           "s": x2i_sampler(["m", 0], ["A", 0])}, [])
    add("easycache_off", {"m": _n("EasyCache", model=["unet", 0], reuse_threshold=0.0, start_percent=0.0,
                                  end_percent=1.0, verbose=False),
                          "ks": ksampler(["m", 0], ["A", 0], ["negA", 0], ["empty", 0], steps=CACHE_STEPS)}, [])
    add("x2i_sampler", {"s": x2i_sampler(["unet", 0], ["A", 0])}, [])

    def custom(guider, sigmas):
        return {"noise": _n("RandomNoise", noise_seed=1), "sampler": _n("KSamplerSelect", sampler_name="euler"),
                "guider": guider, "sigmas": sigmas,
                "sca": _n("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0], sampler=["sampler", 0],
                          sigmas=["sigmas", 0], latent_image=["empty", 0])}

    basic_sigmas = _n("BasicScheduler", model=["unet", 0], scheduler="simple", steps=STEPS, denoise=1.0)
    add("custom_basic", custom(_n("BasicGuider", model=["unet", 0], conditioning=["A", 0]), basic_sigmas), ["sca"])
    add("cfg_guider", custom(_n("CFGGuider", model=["unet", 0], positive=["A", 0], negative=["negA", 0], cfg=3.0),
                             basic_sigmas), ["sca"])
    add("beta_scheduler", custom(_n("BasicGuider", model=["unet", 0], conditioning=["A", 0]),
                                 _n("BetaSamplingScheduler", model=["unet", 0], steps=STEPS, alpha=0.6, beta=0.6)),
        ["sca"])
    for label, shift in (("model_sampling", 1.15), ("model_sampling_b", 2.5)):
        add(label, {"m": _n("ModelSamplingFlux", model=["unet", 0], max_shift=shift, base_shift=0.5, width=SIZE,
                            height=SIZE),
                    "ks": ksampler(["m", 0], ["A", 0], ["negA", 0], ["empty", 0])}, ["ks"])
    add("flux_guidance", {"g": _n("FluxGuidance", conditioning=["A", 0], guidance=8.0),
                          "ks": ksampler(["unet", 0], ["g", 0], ["negA", 0], ["empty", 0])}, ["g", "ks"])
    add("batch", {"e": _n("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=2),
                  "ks": ksampler(["unet", 0], ["A", 0], ["negA", 0], ["e", 0])}, ["ks"])
    add("img2img", {"ks": ksampler(["unet", 0], ["A", 0], ["negA", 0], ["source", 0], denoise=0.5)},
        ["ks", "source"])
    add("inpaint", {"zeros": _n("SolidMask", value=0.0, width=SIZE, height=SIZE),
                    "ones": _n("SolidMask", value=1.0, width=SIZE // 2, height=SIZE),
                    "mask": _n("MaskComposite", destination=["zeros", 0], source=["ones", 0], x=0, y=0,
                               operation="add"),
                    "lat": _n("SetLatentNoiseMask", samples=["source", 0], mask=["mask", 0]),
                    "ks": ksampler(["unet", 0], ["A", 0], ["negA", 0], ["lat", 0])}, ["ks", "source"])
    add("only_B", {"ks": ksampler(["unet", 0], ["B", 0], ["negA", 0], ["empty", 0])}, ["ks"])
    add("combine", {"c": _n("ConditioningCombine", conditioning_1=["A", 0], conditioning_2=["B", 0]),
                    "ks": ksampler(["unet", 0], ["c", 0], ["negA", 0], ["empty", 0])}, ["c", "ks"])
    add("average", {"c": _n("ConditioningAverage", conditioning_to=["A", 0], conditioning_from=["B", 0],
                            conditioning_to_strength=0.25)}, ["c", "A", "B"])
    add("average_stock", {"c": _n("ConditioningAverage", conditioning_to=["A", 0], conditioning_from=["T", 0],
                                  conditioning_to_strength=0.5),
                          "ks": ksampler(["unet", 0], ["c", 0], ["negA", 0], ["empty", 0])}, ["c", "A", "T", "ks"])
    add("concat", {"c": _n("ConditioningConcat", conditioning_to=["A", 0], conditioning_from=["B", 0]),
                   "ks": ksampler(["unet", 0], ["c", 0], ["negA", 0], ["empty", 0])}, ["c", "ks"])
    add("timestep_range", {
        "ra": _n("ConditioningSetTimestepRange", conditioning=["A", 0], start=0.0, end=0.5),
        "rb": _n("ConditioningSetTimestepRange", conditioning=["B", 0], start=0.5, end=1.0),
        "c": _n("ConditioningCombine", conditioning_1=["ra", 0], conditioning_2=["rb", 0]),
        "ks": ksampler(["unet", 0], ["c", 0], ["negA", 0], ["empty", 0])}, ["ks"])
    add("set_area", {"area": _n("ConditioningSetArea", conditioning=["B", 0], width=SIZE // 2, height=SIZE, x=0, y=0,
                                strength=1.0),
                     "c": _n("ConditioningCombine", conditioning_1=["A", 0], conditioning_2=["area", 0]),
                     "ks": ksampler(["unet", 0], ["c", 0], ["negA", 0], ["empty", 0])}, ["area", "ks"])
    add("zero_out", {"ks": ks(cfg=3.0)}, ["ks"])
    add("only_T", {"ks": ksampler(["unet", 0], ["T", 0], ["negA", 0], ["empty", 0])}, ["ks"])
    add("mixed_combine", {"c": _n("ConditioningCombine", conditioning_1=["A", 0], conditioning_2=["T", 0]),
                          "ks": ksampler(["unet", 0], ["c", 0], ["negA", 0], ["empty", 0])}, ["c", "ks"])
    # Control: X2I LightControl and a stock FLUX ControlNet chained on the X2I conditioning, a LoRA on FLUX.
    lora = _n("LoraLoaderModelOnly", model=["unet", 0], lora_name=names["lora"], strength_model=1.0)
    lightcontrol = _n("X2ILightControlLoader", lightcontrol_name=names["lightcontrol"])
    controlnet = _n("ControlNetLoader", control_net_name=names["controlnet"])

    def apply(pos, neg, net):
        return _n("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=[net, 0], image=["photo64", 0],
                  strength=1.0, start_percent=0.0, end_percent=1.0)

    for label, nets, model in (("control_chain", ("lc", "cn"), "lora"), ("control_chain_no_lora", ("lc", "cn"), None),
                               ("lightcontrol_only", ("lc",), "lora"), ("controlnet_only", ("cn",), "lora"),
                               ("lora_only", (), "lora")):
        nodes = {"lora": lora, "lc": lightcontrol, "cn": controlnet}
        pos, neg = ["A", 0], ["negA", 0]
        for i, net in enumerate(nets):
            nodes[f"apply{i}"] = apply(pos, neg, net)
            pos, neg = [f"apply{i}", 0], [f"apply{i}", 1]
        nodes["ks"] = ksampler([model, 0] if model else ["unet", 0], pos, neg, ["empty", 0])
        add(label, nodes, ["ks"])
    # One Euler step is affine in the prediction, so the blend's latent is the weighted mean of the two alone.
    add("x2i_blend", {"b": _n("X2IBlendConditioning", x2i=["A", 0], other=["T", 0], x2i_weight=0.7),
                      "ks": ksampler(["unet", 0], ["b", 0], ["negA", 0], ["empty", 0], steps=1)}, ["b", "ks"])
    add("x2i_blend_refused", {"clip": _n("X2ITestTinyFluxTextEncoders", seed=0, t5_width=2048),
                              "t": _n("CLIPTextEncodeFlux", clip=["clip", 0], clip_l=CAPTION_A, t5xxl=CAPTION_A,
                                      guidance=3.5),
                              "b": _n("X2IBlendConditioning", x2i=["A", 0], other=["t", 0], x2i_weight=0.5)}, [])
    for label, cond in (("only_A_1", "A"), ("only_T_1", "T")):
        add(label, {"ks": ksampler(["unet", 0], [cond, 0], ["negA", 0], ["empty", 0], steps=1)}, ["ks"])
    return prompts, capture


def _rename(node: dict, label: str, local: dict) -> dict:
    """Links to a cell's own nodes get the cell's prefix (shared nodes keep their ids)."""
    ins = {}
    for k, v in node["inputs"].items():
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in local:
            v = [f"{label}.{v[0]}", v[1]]
        ins[k] = v
    return {"class_type": node["class_type"], "inputs": ins}


if __name__ == "__main__":
    print(readme_table())
