"""LightControl through ComfyUI's own code: our CONTROL_NET object, its residuals, and FLUX with them.

Run in a subprocess: ``python tools/comfy_lightcontrol_probe.py SPEC.json`` with SPEC
``{comfy_dir, base, unet, lightcontrol_name, inputs, out}``; ``inputs`` holds x [B,16,h,w],
sigma, seq, pooled, guidance and image [B, 8h, 8w, 3] (ComfyUI IMAGE).  Writes to ``out``:
``v_plain`` (no control), ``v_lc`` (LightControl strength 1), ``r_<i>`` (its residuals),
``chain_<i>`` (two LightControls chained), ``v_late`` (start 0.9: inactive at sigma 0.6) and
``v_half`` (strength 0.5).
"""

import json
import os
import sys


def main(spec_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.comfy_inprocess import boot_in_process

    spec = boot_in_process(spec_path)
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management as mm
    import comfy.sd
    import nodes

    loader = nodes.NODE_CLASS_MAPPINGS["X2ILightControlLoader"]
    cnet = loader.execute(lightcontrol_name=spec["lightcontrol_name"]).args[0]
    inp = load_file(spec["inputs"])
    model = comfy.sd.load_diffusion_model(spec["unet"], model_options={"dtype": torch.float32})
    mm.load_models_gpu([model] + cnet.get_models())
    ms = model.model.model_sampling
    x, sigma = inp["x"], inp["sigma"]
    hint = inp["image"].movedim(-1, 1)

    def control_for(strength, start=0.0, end=1.0, chain=False):
        c = cnet.copy().set_cond_hint(hint, strength, (start, end))
        if chain:
            first = cnet.copy().set_cond_hint(hint, strength, (start, end))
            c.set_previous_controlnet(first)
        c.pre_run(model.model, lambda p: ms.percent_to_sigma(p))
        return c.get_control(x, sigma, {}, 1, {})

    def run(control):
        with torch.no_grad():
            return model.model.diffusion_model(x, sigma, context=inp["seq"], y=inp["pooled"],
                                               guidance=inp["guidance"], control=control).float()

    out = {"v_plain": run(None)}
    ctl = control_for(1.0)
    out["v_lc"] = run(ctl)
    for i, r in enumerate(ctl["input"]):
        out[f"r_{i}"] = r.float().contiguous()
    for i, r in enumerate(control_for(1.0, chain=True)["input"]):
        out[f"chain_{i}"] = r.float().contiguous()
    late = control_for(1.0, start=0.9)
    out["v_late"] = run(late)
    out["v_half"] = run(control_for(0.5))
    save_file({k: v.contiguous() for k, v in out.items()}, spec["out"])
    with open(spec["out"] + ".json", "w", encoding="utf-8") as fh:
        json.dump({"late_is_none": late is None, "managed": [type(m.model).__name__ for m in cnet.get_models()]}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
