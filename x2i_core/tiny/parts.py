"""Pieces shared by the tiny-model builders (:mod:`x2i_core.tiny.models`, :mod:`x2i_core.tiny.families`): the
tiny Qwen-style tokenizer, random initialisation with a visible spread, and building a folder in a
temporary sibling that is renamed into place when complete."""

from __future__ import annotations

import os
import shutil

import torch

from ..io import make_temp_dir
from ..prompt import QWEN25VL_CHAT_TEMPLATE

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer split pattern (part of the tokenizer format).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = [
    "A red fox jumps over a lazy dog in the snowy forest at dawn.",
    "A photo of a cat sitting on a wooden table next to a cup of coffee.",
    "An oil painting of a lighthouse on a rocky coast under a stormy sky.",
    "A futuristic city skyline at night with neon lights and flying cars.",
    "Text input Instruction editing description image input yes no",
    "{'Text input': 'a dog', 'Instruction editing description': 'no', 'image input': 'no'}",
    "You are a helpful assistant. user assistant system Picture Video",
    "Render the text on the screenshot; describe the image; combine these pictures.",
    "一只可爱的小猫坐在窗台上，阳光明媚。 Un chat mignon assis sur le rebord de la fenêtre.",
    "Ein Hund läuft am Strand. Un perro corre en la playa. 海辺を走る犬。",
    "0123456789 , . ! ? : ; ' \" ( ) [ ] { } - _ + = / \\ * & % $ # @",
]


def build_tokenizer(out_dir: str, vocab_size: int = 1024, special_tokens: list[str] | None = None,
                    chat_template: str | None = None, extra_special_tokens: dict[str, str] | None = None,
                    eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>"):
    """Train a byte-level BPE on the built-in corpus and wrap it as a Qwen2 fast tokenizer."""
    special_tokens = special_tokens or QWEN_SPECIAL_TOKENS
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    kwargs = {"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=eos_token, pad_token=pad_token,
        unk_token=None, errors="replace", clean_up_tokenization_spaces=False,
        additional_special_tokens=[t for t in special_tokens if t not in (eos_token, pad_token)], **kwargs,
    )
    _set_special_tokens(fast, special_tokens)
    fast.model_max_length = 32768
    fast.chat_template = chat_template or QWEN25VL_CHAT_TEMPLATE
    return fast


def _set_special_tokens(fast, special_tokens: list[str]) -> None:
    """The tokenizer's special-token list becomes exactly ``special_tokens`` (ids in that order after the vocabulary).
    transformers 5 renamed the keyword (``replace_additional_special_tokens`` -> ``replace_extra_special_tokens``)."""
    import inspect

    params = inspect.signature(fast.add_special_tokens).parameters
    key = next(k for k in ("replace_additional_special_tokens", "replace_extra_special_tokens") if k in params)
    fast.add_special_tokens({"additional_special_tokens": special_tokens}, **{key: True})


def _bpe(special: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _unigram(special: list[str], vocab_size: int = 512):
    """A Unigram (SentencePiece-style) tokenizer with T5's Metaspace pre-tokenizer, as T5 tokenizers are saved:
    ``special`` first (ids 0, 1, 2, ...; the last is the unknown token).  The pieces are those of a BPE trained on
    the corpus (deterministic, unlike tokenizers' Unigram trainer), scored by their BPE rank."""
    import math

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[])
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    pieces = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    vocab = [(t, 0.0) for t in special] + [(p, -math.log(2.0 + i)) for i, (p, _) in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=len(special) - 1, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(special)
    return tok


def _spread(model, seed: int, std: float = 0.05) -> None:
    """Random init with a larger spread so layers differ visibly in tests."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


class _staging:
    """Build a folder in a temporary sibling and rename it into place when complete."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp = make_temp_dir(".tmp-" + os.path.basename(self.out_dir) + "-", parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.out_dir):
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return False


def shaped_qwen25vl_config(ids: dict, vocab_size: int, text: dict, max_positions: int = 32768):
    """A Qwen2.5-VL config whose text decoder has the widths in ``text`` (a real family member's, from the
    benchmarks' shape table) and a one-block vision tower; ``ids``: the special tokens' ids."""
    from transformers import Qwen2_5_VLConfig

    half = text["hidden_size"] // text["num_attention_heads"] // 2
    special = dict(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=max_positions, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                         **special, **text),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, **special,
    )
