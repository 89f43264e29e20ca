"""ComfyUI entry point of the X2I node pack (V3 schema: ``comfy_entrypoint``).

Only ComfyUI imports this file.  The library lives in ``x2i_core`` and never
imports ComfyUI; the ComfyUI layer (sockets, widgets, model management) lives
in ``nodes``.
"""

# The node help pages (web/docs/<NodeId>.md, written by tools/make_node_docs.py) and the pack's icon, served by
# the host at /extensions/<pack folder>/; there is no frontend JavaScript.
WEB_DIRECTORY = "./web"

if __package__:  # imported as the pack (ComfyUI); pytest may also import this file alone when the
    from .nodes import comfy_entrypoint  # checkout's folder name is not a valid package name

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
