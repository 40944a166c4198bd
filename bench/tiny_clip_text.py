"""The embedded tiny model's CLIP text side (``bench/assets/tiny-llava-synth/clip-text``), for CDPruner.

A ``CLIPModel`` checkpoint laid out like ``openai/clip-vit-large-patch14-336``: ``vision_model`` is a copy of the
tiny LLaVA's frozen vision tower, ``text_model`` + ``text_projection`` + ``visual_projection`` are trained by
``scripts/train_tiny_clip_text.py`` so that SynthVQA questions and the feature layer's patch tokens meet in one
joint space. The tokenizer is a CLIP byte-level BPE (``<|startoftext|>`` ... ``<|endoftext|>``, ``</w>`` word ends)
whose merges spell SynthVQA's words whole; any other text falls back to byte tokens, as CLIP's does.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_TEXT_PATH = Path(__file__).resolve().parent / "assets" / "tiny-llava-synth" / "clip-text"
TEXT_SIZES = {"hidden": 64, "layers": 2, "heads": 4, "mlp": 256, "projection": 64}


def build_clip_tokenizer(words: list[str] | None = None):
    """A ``CLIPTokenizerFast`` whose BPE merges build each of ``words`` (default: SynthVQA's vocabulary) whole."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizerFast

    from bench.synthvqa.generator import VOCAB

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    have, merges = set(vocab), []
    for w in sorted(set(words or VOCAB)):
        if len(w) < 2 or not w.isalnum():
            continue
        cur = w[0]
        for k, c in enumerate(w[1:], 1):
            nxt = c + ("</w>" if k == len(w) - 1 else "")
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            if cur not in have:
                vocab.append(cur)
                have.add(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end token has the largest id, as in CLIP (pooling by argmax)
    return CLIPTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def build_clip(vision_config, vocab_size: int, sizes: dict[str, int] | None = None, seed: int = 0):
    """A random ``CLIPModel`` whose vision side has ``vision_config`` (the tiny LLaVA's tower) and a small text side."""
    from transformers import CLIPConfig, CLIPModel

    s = {**TEXT_SIZES, **(sizes or {})}
    text = dict(vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], max_position_embeddings=77, projection_dim=s["projection"],
                bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=1)  # eos 2: CLIP's legacy pooling at argmax(ids)
    vision = {**vision_config.to_dict(), "projection_dim": s["projection"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection"])
    torch.manual_seed(seed)
    return CLIPModel(config).eval()
