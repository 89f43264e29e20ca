"""``torch.distributed`` for the trainers (env:// as torchrun sets it; gloo on CPU, nccl on CUDA) and the
per-(seed, step, sample) generators that make resumed and multi-rank runs draw identical numbers."""

from __future__ import annotations

import os

import torch


# -- distributed -------------------------------------------------------------------
class Dist:
    """Rank/world info; initialises torch.distributed when launched by torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def step_generator(seed: int, step: int, index: int, device="cpu") -> torch.Generator:
    """A generator for one sample of one step, independent of ranks and resumes."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) * 1_000_003 + int(index))
    return g
