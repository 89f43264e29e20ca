"""Trainer configs: a YAML file and ``key.sub=value`` overrides over a dict of defaults; unknown keys are
refused with the known ones listed, and the spellings of "off" and of choices are normalised."""

from __future__ import annotations

import copy
import os
from typing import Mapping

from ..errors import X2IInputError


# -- config ---------------------------------------------------------------------
def deep_update(base: dict, other: Mapping) -> dict:
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_config(defaults: Mapping, path: str | None = None, overrides: list[str] | None = None) -> dict:
    import yaml

    cfg = copy.deepcopy(dict(defaults))
    if path:
        if not os.path.isfile(path):
            raise X2IInputError(f"config file '{path}' does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise X2IInputError(f"config file '{path}' is not valid YAML ({exc})") from exc
        if not isinstance(data, Mapping):
            raise X2IInputError(f"config file '{path}' must hold a mapping of settings")
        _check_keys(defaults, data, "")
        deep_update(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise X2IInputError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = cfg
        parts = key.split(".")
        ref = defaults
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise X2IInputError(f"override key {key!r}: {p!r} is not a section")
            node = node[p]
            ref = ref.get(p, {}) if isinstance(ref, Mapping) else {}
        if isinstance(ref, Mapping) and ref and parts[-1] not in ref:
            raise X2IInputError(f"override key {key!r} is unknown; known here: {sorted(ref)}")
        node[parts[-1]] = value
    _normalise(defaults, cfg, "")
    return cfg


# Spellings of "off", in a YAML file or on the command line (YAML reads no/off/false as False, null/~ as None).
OFF_WORDS = ("no", "false", "none", "off", "null")
# Settings with a fixed set of values, one of which means off: key -> (canonical off value, other values, aliases).
CHOICES = {
    "train.mixed_precision": ("no", ("bf16", "fp16"), {"fp32": "no"}),
    "checkpoint.resume": ("never", ("auto",), {"never": "never"}),
}


def _is_off(value) -> bool:
    return value is False or value is None or (isinstance(value, str) and value.strip().lower() in OFF_WORDS)


def _normalise(defaults: Mapping, cfg: dict, prefix: str) -> None:
    """One spelling per value: booleans from yes/no/true/false/on/off/1/0, the listed choices (each with
    its "off" spellings), and ``None`` for an off-spelling of a setting that defaults to ``None``."""
    for k, default in defaults.items():
        key, value = f"{prefix}{k}", cfg.get(k)
        if isinstance(default, Mapping) and default and isinstance(value, dict):
            _normalise(default, value, key + ".")
        elif key in CHOICES:
            off, values, aliases = CHOICES[key]
            word = value.strip().lower() if isinstance(value, str) else value
            if _is_off(word):
                cfg[k] = off
            elif word in values or word in aliases:
                cfg[k] = aliases.get(word, word)
            else:
                spelled = ", ".join([f"{off} (or {' / '.join(w for w in OFF_WORDS + tuple(aliases) if w != off)})",
                                     *values])
                raise X2IInputError(f"{key} {value!r}: expected one of {spelled}")
        elif isinstance(default, bool):
            cfg[k] = _as_bool(key, value)
        elif default is None and _is_off(value):
            cfg[k] = None


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if value is not None else "none"
    if word in ("yes", "true", "on", "1"):
        return True
    if word in OFF_WORDS or word == "0":
        return False
    raise X2IInputError(f"{key} {value!r}: expected true or false (also yes/no, on/off, 1/0)")


def _check_keys(defaults: Mapping, data: Mapping, prefix: str) -> None:
    for k, v in data.items():
        if k not in defaults:
            raise X2IInputError(f"config key '{prefix}{k}' is unknown; known: {sorted(defaults)}")
        if isinstance(v, Mapping) and isinstance(defaults[k], Mapping) and defaults[k]:
            _check_keys(defaults[k], v, f"{prefix}{k}.")
