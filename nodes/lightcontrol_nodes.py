"""X2I LightControl Loader: LightControl as a stock ComfyUI ``CONTROL_NET`` (the control itself is in
``comfy_lightcontrol.py``)."""

from __future__ import annotations

from comfy_api.latest import io

from . import paths
from .comfy_lightcontrol import load_lightcontrol_net
from .common import CATEGORY, search_aliases, user_errors


class X2ILightControlLoader(io.ComfyNode):
    DISPLAY = "X2I LightControl Loader"  # the name users see, and every error's prefix

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2ILightControlLoader", **search_aliases("X2ILightControlLoader"),
            display_name=cls.DISPLAY,
            category=f"{CATEGORY}/loaders",
            description="Loads X2I LightControl (per-double-block modules that keep instruction edits faithful to "
                        "the source image) as a CONTROL_NET for the stock Apply ControlNet node.",
            inputs=[io.Combo.Input("lightcontrol_name", options=paths.list_x2i_files("lightcontrol"),
                                   tooltip="A LightControl file in models/x2i (ours or the published "
                                           "diffusion_pytorch_model.bin, read weights-only). AlignNet files are not "
                                           "listed (each file's own header says what it is).")],
            outputs=[io.ControlNet.Output(display_name="control_net",
                                          tooltip="Use with Apply ControlNet: image = the source image to edit.")],
        )

    @classmethod
    def execute(cls, lightcontrol_name) -> io.NodeOutput:
        with user_errors(cls.DISPLAY):
            return io.NodeOutput(load_lightcontrol_net(paths.resolve_x2i_file(lightcontrol_name, "lightcontrol"),
                                                       lightcontrol_name))


NODES = [X2ILightControlLoader]
