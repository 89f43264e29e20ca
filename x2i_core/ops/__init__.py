"""Kernels, apart from where they are used: the distillation loss (``kl``: eager reference, row-wise and fused
Triton with explicit gradients).  The trainer calls :func:`kl.distill_loss`; nothing here knows a trainer."""
