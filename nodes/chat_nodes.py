"""Multi-turn chats and reasoning -> image.

``X2I Chat Turn`` nodes build an ``X2I_CHAT`` value (an immutable tuple of
turns, so ComfyUI's caching and branching stay correct); ``X2I MLLM Encode``
reads the whole conversation.  ``X2I MLLM Reason`` lets the MLLM answer first
and encodes the answer.
"""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..x2i_core.mllm.base import ChatTurn, EncodeRequest
from .common import (
    CATEGORY,
    PRESET_OPTIONS,
    PRESET_TOOLTIP,
    NodeError,
    check_finite,
    media_inputs,
    node_media,
    run_mllm,
    search_aliases,
)
from .types import CHAT, HIDDEN, MLLM


class X2IChatTurn(io.ComfyNode):
    DISPLAY = "X2I Chat Turn"  # the name users see, and every error's prefix

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IChatTurn", **search_aliases("X2IChatTurn"),
            display_name=cls.DISPLAY,
            category=f"{CATEGORY}/chat",
            description="Adds one turn (text and media) to a conversation. Chain turns, then connect the chat to "
                        "X2I MLLM Encode: the MLLM reads the whole conversation.",
            inputs=[
                io.Combo.Input("role", options=["user", "assistant"], default="user",
                               tooltip="Who speaks in this turn. Media belong in user turns."),
                io.String.Input("text", multiline=True, default="", tooltip="What is said in this turn."),
                *media_inputs(resolution=False),
                CHAT.Input("chat", optional=True, tooltip="The conversation so far (empty = start a new one)."),
            ],
            outputs=[CHAT.Output(display_name="chat", tooltip="The conversation with this turn appended.")],
        )

    @classmethod
    def execute(cls, role="user", text="", video_fps=1.0, max_frames=768, frames_fps=24.0, image=None, video=None,
                frames=None, audio=None, chat=None) -> io.NodeOutput:
        node = cls.DISPLAY
        media = node_media(node, text, image, video, frames, audio, video_fps=video_fps, max_frames=max_frames,
                           frames_fps=frames_fps, empty="the turn is empty - type its text or connect an image, "
                                                        "video or audio")
        if role == "assistant" and any(v is not None for v in media.values()):
            raise NodeError(f"{node}: an assistant turn cannot carry media; put images/video/audio in a user turn")
        turn = ChatTurn(role, text if (text or "").strip() else None, **media)
        return io.NodeOutput(tuple(chat or ()) + (turn,))


ANSWER_MODES = {"answer states": "states", "answer text": "text", "reference multi-turn": "multiturn"}


class X2IMLLMReason(io.ComfyNode):
    DISPLAY = "X2I MLLM Reason"  # the name users see, and every error's prefix

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IMLLMReason", **search_aliases("X2IMLLMReason"),
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description="Reasoning -> image: the MLLM first answers the prompt (e.g. a riddle, a question about an "
                        "image), then the answer is encoded for the AlignNet. The answer is also output as text.",
            inputs=[
                MLLM.Input("mllm", tooltip="From X2I MLLM Loader."),
                io.String.Input("text", multiline=True, default="", tooltip="The question or task, any language."),
                io.Int.Input("max_new_tokens", default=128, min=1, max=4096,
                             tooltip="Longest answer in tokens (reference: 128)."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy (deterministic); above 0 samples with this temperature."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Sampling seed (used when temperature > 0)."),
                io.Combo.Input("answer_mode", options=list(ANSWER_MODES), default="answer states",
                               tooltip="answer states (reference 'use answer'): the hidden states of the answer "
                                       "tokens, in the context of the question. answer text: the answer re-encoded "
                                       "alone as a new prompt with 'preset'. reference multi-turn: the reference's "
                                       "multi-turn script - the conversation (connect 'chat'; every user turn = "
                                       "its image at 256x256 + the instruction dict) is answered with the model's "
                                       "own generation settings (temperature/seed unused), and the states of the "
                                       "prompt followed by the answer's go to the AlignNet; put the answer into the "
                                       "chat as an assistant turn for the next turn."),
                io.Combo.Input("preset", options=PRESET_OPTIONS, default=PRESET_OPTIONS[0],
                               tooltip="Used by 'answer text' only. " + PRESET_TOOLTIP),
                *media_inputs(),
                CHAT.Input("chat", optional=True,
                           tooltip="The conversation so far, for 'reference multi-turn' (this node's text and media "
                                   "are the new user turn)."),
            ],
            outputs=[HIDDEN.Output(display_name="hidden", tooltip="Hidden states of the answer."),
                     io.String.Output(display_name="answer", tooltip="The MLLM's answer as text.")],
        )

    @classmethod
    def execute(cls, mllm, text="", max_new_tokens=128, temperature=0.0, seed=0, answer_mode="answer states",
                preset=PRESET_OPTIONS[0], image_resolution=0, video_resolution=0, video_fps=1.0, max_frames=768,
                frames_fps=24.0, image=None, video=None, frames=None, audio=None, chat=None) -> io.NodeOutput:
        node = cls.DISPLAY
        check_finite(node, temperature=temperature)
        if answer_mode not in ANSWER_MODES:
            raise NodeError(f"{node}: answer_mode {answer_mode!r}; expected one of {list(ANSWER_MODES)}")
        media = node_media(node, text, image, video, frames, audio, video_fps=video_fps, max_frames=max_frames,
                           frames_fps=frames_fps,
                           video_resolution=None if ANSWER_MODES[answer_mode] == "multiturn" else video_resolution,
                           empty="the question is empty - type some text or connect an image, video or audio")
        req = EncodeRequest(text=text if (text or "").strip() else None, history=tuple(chat or ()), **media)
        with run_mllm(mllm, node):
            if ANSWER_MODES[answer_mode] == "multiturn":
                answer, hs = mllm.encoder.reference_multi_turn(req, max_new_tokens=max_new_tokens,
                                                               image_size=image_resolution or None)
            else:
                if chat:
                    raise NodeError(f"{node}: a chat is connected, but answer_mode '{answer_mode}' answers one "
                                    "question; use 'reference multi-turn' or disconnect the chat")
                answer, hs = mllm.encoder.generate_answer(
                    req, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                    image_size=image_resolution or None, video_size=video_resolution or None,
                    answer=ANSWER_MODES[answer_mode], preset=preset)
        hs.hidden = hs.hidden.to(mm.intermediate_device())
        hs.source_path = mllm.path
        return io.NodeOutput(hs, answer, ui={"text": [answer]})


NODES = [X2IChatTurn, X2IMLLMReason]
