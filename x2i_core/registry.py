"""Facts about the MLLMs X2I knows: families, hidden-state dimensions, released AlignNets.

The one place for them: the loader (``x2i_core.mllm.load_mllm``) detects families from
:data:`MLLM_FAMILIES`, AlignNet presets come from :data:`KNOWN_MLLMS`, and the nodes' tooltips, the CLI help
and the ComfyUI-native text encoders (``nodes/comfy_qwen.py``) read both; :func:`check_fits` is the one
compatibility check (one error type, :class:`~x2i_core.errors.X2IShapeError`).

``(C, H)`` - hidden-state channels (decoder layers + 1) and width - does not identify an MLLM: Qwen2.5-VL-3B
and InternVL2.5-4B are both (37, 2048); Qwen2.5-VL-7B, MiniCPM-o-2.6 and Qwen2.5-Omni-7B all (29, 3584).
So an AlignNet records the MLLM it was trained for (:class:`Provenance`, written by the distillation trainer and
kept by ``convert-alignnet`` for a recognised release), released files are recognised by name and config, and a
file that says nothing is matched by ``(C, H)`` with a warning naming every candidate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

from .errors import X2IFileError, X2IShapeError

log = logging.getLogger("x2i")


@dataclasses.dataclass(frozen=True)
class KnownMLLM:
    name: str                    # the model's release name
    family: str                  # the encoder family (``ChatEncoder.family``)
    channels: int                # C = decoder layers + 1
    hidden: int                  # H
    alignnet: str | None = None  # fusion of the released AlignNet ("conv" / "scale"), None = none released
    files: tuple[str, ...] = ()  # names of the released AlignNet files


KNOWN_MLLMS: tuple[KnownMLLM, ...] = (
    KnownMLLM("Qwen2.5-VL-3B-Instruct", "qwen2.5-vl", 37, 2048, "conv", ("qwen2.5-vl-3b_proj.pt",)),
    KnownMLLM("Qwen2.5-VL-7B-Instruct", "qwen2.5-vl", 29, 3584, "conv", ("qwen2.5-vl-7b_proj.pt",)),
    KnownMLLM("InternVL2.5-1B", "internvl", 25, 896, "scale"),
    KnownMLLM("InternVL2.5-4B", "internvl", 37, 2048, "conv"),
    KnownMLLM("MiniCPM-o-2.6", "minicpm-o", 29, 3584, "conv"),
    KnownMLLM("Qwen2.5-Omni-7B", "qwen2.5-omni", 29, 3584),
    KnownMLLM("Qwen2.5-Omni-3B", "qwen2.5-omni", 37, 2048),
)


@dataclasses.dataclass(frozen=True)
class MLLMFamily:
    """An encoder family: how a model folder is recognised (config.json ``model_type``) and loaded."""

    id: str                          # ``ChatEncoder.family`` ("qwen2.5-vl"); ``KnownMLLM.family``; provenance
    display: str                     # ``ChatEncoder.display``, the name in messages ("Qwen2.5-VL")
    model_types: tuple[str, ...]     # config.json model_type values this family loads
    module: str                      # module in x2i_core.mllm
    encoder: str                     # encoder class in that module
    remote_code: bool                # loading needs Python shipped in the model folder (trust_remote_code)
    description: str                 # what it is, for messages ("Qwen2.5-VL-3B/7B-Instruct")
    modalities: frozenset[str]       # what the encoder takes: text, image, video, audio
    folder: str = ""                 # the folder format users need, where it matters ("-hf")
    remote_code_option: bool = False  # loads from its files alone, and can run the folder's own code if asked

    @property
    def label(self) -> str:
        """The family as lists of supported folders name it ("InternVL -hf")."""
        return f"{self.display} {self.folder}" if self.folder else self.display

    @property
    def releases(self) -> tuple[KnownMLLM, ...]:
        return tuple(m for m in KNOWN_MLLMS if m.family == self.id)


_VISUAL = frozenset({"text", "image", "video"})

MLLM_FAMILIES: tuple[MLLMFamily, ...] = (
    MLLMFamily("qwen2.5-vl", "Qwen2.5-VL", ("qwen2_5_vl",), "qwen25vl", "Qwen25VLEncoder", False,
               "Qwen2.5-VL-3B/7B-Instruct", _VISUAL),
    MLLMFamily("qwen2.5-omni", "Qwen2.5-Omni", ("qwen2_5_omni", "qwen2_5_omni_thinker"), "qwen25omni",
               "Qwen25OmniEncoder", False, "Qwen2.5-Omni-3B/7B (thinker)", _VISUAL | {"audio"}),
    MLLMFamily("internvl", "InternVL", ("internvl",), "internvl", "InternVLEncoder", False,
               "InternVL2.5/3 (-hf transformers format)", _VISUAL, folder="-hf"),
    MLLMFamily("minicpm-o", "MiniCPM-o", ("minicpmo",), "minicpmo", "MiniCPMOEncoder", False,
               "MiniCPM-o-2.6 (read from its files; its remote code is optional)", _VISUAL | {"audio"},
               remote_code_option=True),
)


def family(family_id: str) -> MLLMFamily:
    """The family with this id (``ChatEncoder.family``); KeyError if there is none."""
    for f in MLLM_FAMILIES:
        if f.id == family_id:
            return f
    raise KeyError(family_id)


def family_of_model_type(model_type: str | None) -> MLLMFamily | None:
    """The family that loads a config.json ``model_type``, or None."""
    return next((f for f in MLLM_FAMILIES if model_type in f.model_types), None)


def families_with(modality: str | None = None, remote_code: bool | None = None,
                  remote_code_option: bool | None = None) -> tuple[MLLMFamily, ...]:
    """The families taking ``modality`` and/or with these remote-code flags (None = any), in registry order."""
    return tuple(f for f in MLLM_FAMILIES if (modality is None or modality in f.modalities)
                 and (remote_code is None or f.remote_code == remote_code)
                 and (remote_code_option is None or f.remote_code_option == remote_code_option))


def labels(families=MLLM_FAMILIES, sep: str = ", ", last: str | None = None) -> str:
    """``"Qwen2.5-VL, Qwen2.5-Omni, InternVL -hf, MiniCPM-o"`` (``last``: the separator before the last one)."""
    names = [f.label for f in families]
    if last is None or len(names) < 2:
        return sep.join(names)
    return f"{sep.join(names[:-1])}{last}{names[-1]}"


def release(name: str) -> KnownMLLM:
    """The known MLLM with this release name; KeyError if there is none."""
    for m in KNOWN_MLLMS:
        if m.name == name:
            return m
    raise KeyError(name)


def candidates(channels: int, hidden: int) -> list[KnownMLLM]:
    return [m for m in KNOWN_MLLMS if (m.channels, m.hidden) == (int(channels), int(hidden))]


def describe_dims(channels: int, hidden: int) -> str:
    """``"Qwen2.5-VL-3B-Instruct or InternVL2.5-4B (C=37 layers+1, H=2048)"``."""
    dims = f"C={channels} layers+1, H={hidden}"
    names = [m.name for m in candidates(channels, hidden)]
    if not names:
        return f"an MLLM with {dims}"
    return f"{' or '.join(names)} ({dims})"


def released_file(path: str | os.PathLike, channels: int, hidden: int, fusion: str) -> KnownMLLM | None:
    """The release a file is, by its name and config (both must agree), or None."""
    name = os.path.basename(os.fspath(path)).lower()
    for m in KNOWN_MLLMS:
        if name in m.files and (m.channels, m.hidden, m.alignnet) == (channels, hidden, fusion):
            return m
    return None


@dataclasses.dataclass(frozen=True)
class Provenance:
    """The MLLM side an AlignNet was trained on (stored in its safetensors metadata as ``x2i_mllm``)."""

    family: str | None          # encoder family, e.g. "qwen2.5-vl"
    model: str | None           # model name (release name or folder name)
    channels: int
    hidden: int
    preset: str | None = None   # prompt convention it was trained with
    pad_rows: str | None = None  # left-pad row semantics it was trained with ("reference" / "constant")
    source: str = "trained"     # "trained" (our distillation) or "released" (a recognised release file)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Provenance":
        try:
            data = json.loads(text)
            return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls) if f.name in data})
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise X2IFileError(f"{where}: metadata 'x2i_mllm' is not a valid MLLM record ({exc})") from exc

    @classmethod
    def of_release(cls, m: KnownMLLM) -> "Provenance":
        # The released AlignNets were distilled on the training preset, on CUDA with transformers 4.49.
        return cls(m.family, m.name, m.channels, m.hidden, "training", "reference", "released")

    def describe(self) -> str:
        family = f"{self.family}, " if self.family else ""
        return f"{self.model or 'an unnamed MLLM'} ({family}C={self.channels} layers+1, H={self.hidden})"


@dataclasses.dataclass(frozen=True)
class MLLMIdentity:
    """What an encoder (or its hidden states) says about the MLLM behind it."""

    family: str | None
    model: str | None
    channels: int
    hidden: int

    def describe(self) -> str:
        fam = f"{self.family} " if self.family else ""
        return f"{fam}MLLM '{self.model}' (C={self.channels} layers+1, H={self.hidden})"


def identity_of(encoder) -> MLLMIdentity:
    path = getattr(encoder, "path", None)
    model = os.path.basename(os.path.normpath(path)) if path else getattr(encoder, "name", None)
    return MLLMIdentity(getattr(encoder, "family", None), model, int(encoder.channels), int(encoder.hidden_size))


def check_fits(provenance: Provenance | None, channels: int, hidden: int, mllm: MLLMIdentity,
               alignnet_name: str = "AlignNet", pad_rows: str | None = None) -> None:
    """One compatibility check for every caller: dimensions first, then the recorded family, then (for
    left-padded hidden states, ``pad_rows``) the pad-row semantics it was trained with.  Raises
    :class:`~x2i_core.errors.X2IShapeError` naming both sides."""
    if (channels, hidden) != (mllm.channels, mllm.hidden):
        trained = provenance.describe() if provenance is not None else describe_dims(channels, hidden)
        raise X2IShapeError(
            f"{alignnet_name} fits {trained}, but the loaded {mllm.describe()} does not; load the AlignNet "
            f"trained for this MLLM ({describe_dims(mllm.channels, mllm.hidden)})")
    if provenance is not None and provenance.family and mllm.family and provenance.family != mllm.family:
        raise X2IShapeError(
            f"{alignnet_name} was trained for {provenance.describe()}, but the loaded MLLM is {mllm.describe()}: "
            "same dimensions, different model - its hidden states mean something else. Load the AlignNet "
            f"trained for {mllm.family}, or the {provenance.family} MLLM this AlignNet belongs to")
    if provenance is not None and provenance.pad_rows and pad_rows and provenance.pad_rows != pad_rows:
        raise X2IShapeError(
            f"{alignnet_name} was trained with pad_rows '{provenance.pad_rows}', but these hidden states were "
            f"encoded with pad_rows '{pad_rows}'; encode with pad_rows='{provenance.pad_rows}' (the pad_rows "
            "option of the encode node / --pad-rows)")


def warn_if_ambiguous(channels: int, hidden: int, where: str) -> None:
    """A file that records no MLLM: say which MLLMs its dimensions could belong to."""
    found = candidates(channels, hidden)
    if len(found) > 1:
        log.warning("%s records no MLLM and its dimensions fit several: %s; make sure it is used with the one it "
                    "was trained for (files written by x2i record it)", where, ", ".join(m.name for m in found))


def provenance_from_metadata(meta: Mapping[str, Any] | None, where: str) -> Provenance | None:
    if meta and meta.get("x2i_mllm"):
        return Provenance.from_json(meta["x2i_mllm"], where)
    return None


__all__ = ["KNOWN_MLLMS", "KnownMLLM", "MLLM_FAMILIES", "MLLMFamily", "MLLMIdentity", "Provenance", "candidates",
           "check_fits", "describe_dims", "families_with", "family", "family_of_model_type", "identity_of", "labels",
           "provenance_from_metadata", "release", "released_file", "warn_if_ambiguous"]
