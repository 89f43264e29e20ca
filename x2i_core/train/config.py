"""Typed trainer configs: one dataclass per trainer (sections are dataclasses too) and one loader.

``load_config(Schema, path, overrides)`` reads a YAML file and ``key.sub=value`` overrides over the
schema's defaults and returns a ``Schema`` instance whose every field has its declared type:

* unknown keys are refused with the known ones listed (per section);
* numbers are numbers (YAML reads ``1e-4`` as text; a float field takes it), whole numbers stay whole;
* booleans accept yes/no, true/false, on/off, 1/0; an ``X | None`` field takes every spelling of "off";
* settings with a fixed set of values (:func:`choice`) map their aliases and "off" spellings to one value.

Fields are read as attributes (``cfg.train.lr``); sections also answer ``cfg["train"]["lr"]`` for scripts
written against the earlier dict configs.  ``to_dict()`` gives the plain mapping written to ``config.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

from ..errors import X2IInputError

# Spellings of "off", in a YAML file or on the command line (YAML reads no/off/false as False, null/~ as None).
OFF_WORDS = ("no", "false", "none", "off", "null")


def choice(default: str, values: tuple[str, ...], off: str | None = None, aliases: dict | None = None):
    """A text setting with a fixed set of ``values`` (plus ``off``, the value every "off" spelling maps to,
    and ``aliases``: other words for a value)."""
    return dataclasses.field(default=default, metadata={"choice": (off, tuple(values), dict(aliases or {}))})


@dataclasses.dataclass
class Section:
    """A group of typed settings."""

    def __getitem__(self, key: str):
        if key not in self.field_names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.field_names() else default

    def __contains__(self, key: str) -> bool:
        return key in self.field_names()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def section(cls, **defaults):
    """A section field whose defaults differ from the section class's own (e.g. ``checkpoint.every``); each
    config gets its own copy of them."""
    return dataclasses.field(default_factory=lambda: cls(**copy.deepcopy(defaults)))


# -- sections every trainer has ------------------------------------------------------
@dataclasses.dataclass
class TrainSection(Section):
    steps: int = 1000
    batch_size: int = 1             # global: split over the processes
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    mixed_precision: str = choice("no", ("bf16", "fp16"), off="no", aliases={"fp32": "no"})
    gradient_accumulation: int = 1


@dataclasses.dataclass
class CheckpointSection(Section):
    every: int = 500
    keep_last: int = 3
    resume: str = choice("auto", ("auto",), off="never", aliases={"never": "never"})


@dataclasses.dataclass
class LogSection(Section):
    every: int = 1
    tensorboard: bool = False


@dataclasses.dataclass
class SamplesSection(Section):
    """Sample images from fixed prompts during training."""

    every: int = 0                  # every N optimizer steps (0: never)
    prompts: list[str] = dataclasses.field(default_factory=list)
    steps: int = 4                  # sampling steps
    size: int = 256                 # square side in pixels


@dataclasses.dataclass
class FluxTrainSection(TrainSection):
    """The flow-matching settings of the FLUX trainers (LoRA, LightControl)."""

    guidance: float = 3.5           # fed to FLUX's guidance embedder
    sigma_mean: float = 0.0         # logit-normal sigmas: sigmoid(N(mean, std))
    sigma_std: float = 1.0


# -- the loader ----------------------------------------------------------------------
C = TypeVar("C", bound=Section)


def load_config(schema: type[C], path: str | None = None, overrides: list[str] | None = None) -> C:
    """The schema's defaults, updated by the YAML file at ``path`` and then by ``key.sub=value`` overrides."""
    cfg = build(schema(), _read_yaml(path) if path else {}, "")
    for item in overrides or []:
        if "=" not in item:
            raise X2IInputError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        *parents, leaf = key.split(".")
        data: dict = {leaf: _parse_value(raw)}
        for p in reversed(parents):
            data = {p: data}
        cfg = build(cfg, data, "", override=key)
    return cfg


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise X2IInputError(f"config file '{path}' does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise X2IInputError(f"config file '{path}' is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise X2IInputError(f"config file '{path}' must hold a mapping of settings")
    return data


def _parse_value(raw: str):
    import yaml

    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def build(base: C, data: dict, prefix: str, override: str | None = None) -> C:
    """``base`` with the settings in ``data`` (a nested mapping) applied, each checked and typed."""
    hints = typing.get_type_hints(type(base))
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for name, value in data.items():
        if name not in fields:
            where = f"override key {override!r}" if override else f"config key '{prefix}{name}'"
            raise X2IInputError(f"{where} is unknown; known{' here' if override else ''}: {sorted(fields)}")
        current, key = getattr(base, name), f"{prefix}{name}"
        if isinstance(current, Section):
            if not isinstance(value, dict):
                raise X2IInputError(f"{override or key!r}: '{key}' is a section of settings "
                                    f"({', '.join(current.field_names())}), not a value")
            changes[name] = build(current, value, key + ".", override)
        else:
            changes[name] = _typed(key, value, hints[name], fields[name].metadata.get("choice"))
    return dataclasses.replace(base, **changes)


def _is_off(value) -> bool:
    return value is False or value is None or (isinstance(value, str) and value.strip().lower() in OFF_WORDS)


def _typed(key: str, value, hint, spec):
    if spec is not None:
        return _choice(key, value, *spec)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if _is_off(value):
            return None
        rest = [a for a in args if a is not type(None)]
        return _typed(key, value, rest[0], None)
    if hint is bool:
        return _as_bool(key, value)
    if hint is int:
        return _as_number(key, value, int)
    if hint is float:
        return _as_number(key, value, float)
    if hint is str:
        if isinstance(value, str):
            return value
        raise X2IInputError(f"{key} {value!r}: expected text")
    if typing.get_origin(hint) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise X2IInputError(f"{key} {value!r}: expected a list")
        return [_typed(f"{key}[{i}]", v, typing.get_args(hint)[0], None) for i, v in enumerate(items)]
    return value


def _as_number(key: str, value, kind: type) -> Any:
    if not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, (int, float)):
                if kind is float:
                    return float(number)
                if float(number).is_integer():
                    return int(number)
        except ValueError:
            pass
    raise X2IInputError(f"{key} {value!r}: expected {'a number' if kind is float else 'a whole number'}")


def _choice(key: str, value, off: str | None, values: tuple[str, ...], aliases: dict):
    word = value.strip().lower() if isinstance(value, str) else value
    if off is not None and _is_off(word):
        return off
    if word in values or word in aliases:
        return aliases.get(word, word)
    spelled = [*values]
    if off is not None:
        spelled.insert(0, f"{off} (or {' / '.join(w for w in OFF_WORDS + tuple(aliases) if w != off)})")
    raise X2IInputError(f"{key} {value!r}: expected one of {', '.join(spelled)}")


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if value is not None else "none"
    if word in ("yes", "true", "on", "1"):
        return True
    if word in OFF_WORDS or word == "0":
        return False
    raise X2IInputError(f"{key} {value!r}: expected true or false (also yes/no, on/off, 1/0)")


__all__ = ["CheckpointSection", "FluxTrainSection", "LogSection", "OFF_WORDS", "SamplesSection", "Section",
           "TrainSection", "build", "choice", "load_config", "section"]
