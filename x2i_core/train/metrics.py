"""Per-step metrics (a CSV rewritten on resume so it continues exactly, optional TensorBoard) and the
run reports."""

from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any

from ..io import atomic_write_json

log = logging.getLogger("x2i")


# -- metrics ------------------------------------------------------------------------
class MetricsLog:
    """A CSV of per-step metrics that resumes exactly (rows after the resume step are dropped)."""

    def __init__(self, output_dir: str, fields: list[str], resume_step: int | None, enabled: bool = True,
                 tensorboard: bool = False):
        self.path = os.path.join(output_dir, "metrics.csv")
        self.fields = ["step", *fields]
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.fh, fieldnames=self.fields)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.csv only")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.writer.writerow({"step": step, **{k: (repr(v) if isinstance(v, float) else v) for k, v in values.items()}})
        self.fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(output_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(output_dir, "metrics.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_eval_report(output_dir: str, start: float | None, end: float, **extra) -> None:
    """``eval.json``: the fixed-noise loss before training (kept from the first run on resume) and now."""
    path = os.path.join(output_dir, "eval.json")
    prev = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            prev = json.load(fh)
    write_json(path, {"fixed_noise_loss_start": start if start is not None else prev.get("fixed_noise_loss_start"),
                      "fixed_noise_loss_end": end, **extra})


def write_json(path: str, data: Any) -> None:
    atomic_write_json(path, data)
