"""Kernels, apart from where they are used: the distillation loss (``kl``: eager reference, row-wise and fused
Triton with explicit gradients) and block-sparse prefill attention (``sparse_prefill``: CritiPrefill block
selection, log-sum-exp attention and merging).  The trainer calls :func:`kl.distill_loss`, the MLLM's
transformers hook (``x2i_core.mllm.critiprefill``) calls :func:`sparse_prefill.sparse_attention`; nothing here
knows a trainer or transformers."""
