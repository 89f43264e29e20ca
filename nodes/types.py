"""Custom socket types of the pack, declared once and reused by every node."""

from comfy_api.latest import io

MLLM = io.Custom("X2I_MLLM")
HIDDEN = io.Custom("X2I_HIDDEN")
ALIGNNET = io.Custom("X2I_ALIGNNET")
CHAT = io.Custom("X2I_CHAT")
