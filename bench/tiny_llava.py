"""The embedded tiny LLaVA-1.5 (issue 3): config, tokenizer and processor builders, shared helpers.

The model is a plain ``transformers.LlavaForConditionalGeneration`` (CLIP vision tower at 336 px / patch 14,
features from layer -2 with the CLS token dropped, 2-layer GELU MLP projector, Llama LM) with a word-level
tokenizer over SynthVQA's vocabulary.  The shipped weights live in ``bench/assets/tiny-llava-synth/`` and load
with the same calls as ``llava-hf/llava-1.5-7b-hf``::

    model = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_PATH)
    processor = AutoProcessor.from_pretrained(TINY_LLAVA_PATH)

This module must not import lmms-eval, hydra, wandb or datasets (the GPU machine has none of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.synthvqa.generator import IMAGE_SIZE, POST_PROMPT, VOCAB, words

TINY_LLAVA_PATH = Path(__file__).resolve().parent / "assets" / "tiny-llava-synth"

PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24
NUM_PATCHES = GRID * GRID  # 576
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's, as in llava-1.5
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TEMPLATE_WORDS = ["user", "assistant", ":"]
# words only the training script's auxiliary questions use ("is the red star left or right?"): in the vocabulary
# only of a model trained with them (``extra_words``), appended after SynthVQA's words so no benchmark id moves,
# and absent otherwise so a recipe without them rebuilds exactly the same initial weights
TRAINING_WORDS = ["or"]

# llava-hf/llava-1.5-7b-hf's chat template without the {% generation %} markers:
# renders [image, text q] + generation prompt as "USER: <image>\n{q} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Default sizes (chosen by CPU timing: the full 1000-question test split must run in <= 90 s on 2 cores).
DEFAULT_SIZES: dict[str, int] = {
    "vision_hidden": 64,
    "vision_layers": 6,
    "vision_heads": 4,
    "vision_mlp": 256,
    "text_hidden": 128,
    "text_layers": 3,
    "text_heads": 4,
    "text_mlp": 384,
}


def vocab_list(extra_words: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Token strings in id order: specials first, then template words, then SynthVQA's vocabulary, then
    ``extra_words`` (e.g. :data:`TRAINING_WORDS`)."""
    out = list(SPECIAL_TOKENS)
    for w in TEMPLATE_WORDS + list(VOCAB) + list(extra_words):
        if w not in out:
            out.append(w)
    return out


def build_tokenizer(vocab: dict[str, int] | None = None, model_max_length: int = 1024, extra_words=()):
    """Word-level ``PreTrainedTokenizerFast`` (lowercasing; whitespace + punctuation split; ``<s>`` prepended).

    ``vocab`` (word -> id, with ``<s> </s> <unk> <pad> <image>``) defaults to the tiny model's own;
    ``benchmarks/bench_throughput.py`` passes a stand-in vocabulary laid out on a real model's ids."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or {w: i for i, w in enumerate(vocab_list(extra_words))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=model_max_length,
    )
    return fast


def build_processor(tokenizer=None):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(sizes: dict[str, int] | None = None, extra_words=()):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = {**DEFAULT_SIZES, **(sizes or {})}
    vocab = vocab_list(extra_words)
    ids = {w: i for i, w in enumerate(vocab)}
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_mlp"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=s["vision_hidden"],
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_mlp"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_heads"],
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_token_index=ids["<image>"],
        image_seq_length=NUM_PATCHES,
        multimodal_projector_bias=True,
    )
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = ids["<s>"], ids["</s>"], ids["<pad>"]
    return cfg


def build_model(sizes: dict[str, int] | None = None, seed: int = 0, extra_words=()):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(sizes, extra_words))
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        model.config.bos_token_id,
        model.config.eos_token_id,
        model.config.pad_token_id,
    )
    gc.do_sample = False
    gc.max_new_tokens = 8
    return model


def prompt_text(question: str, post_prompt: str = POST_PROMPT) -> str:
    """The rendered chat prompt, identical to ``processor.apply_chat_template`` for one image + text."""
    return f"USER: <image>\n{question}{post_prompt} ASSISTANT:"


def pixel_tensor(images: list[Any]) -> torch.Tensor:
    """(B, 3, 336, 336) float pixels, equal to the processor's for 336x336 RGB images."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def first_word(text: str) -> str:
    w = words(text)
    w = [x for x in w if x.isalnum()]
    return w[0] if w else ""


# ------------------------------------------------------------------------------------ analysis helpers
def patch_centres(grid: int = GRID) -> np.ndarray:
    """``(grid * grid, 2)`` float32 patch-centre (x, y) in [-1, 1], raster order (the CLIP patch order)."""
    c = (np.arange(grid) + 0.5) / grid * 2 - 1
    return np.stack(np.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2).astype(np.float32)


def object_patch_mask(objects: list[dict[str, Any]]) -> np.ndarray:
    """(576,) bool: patches (raster order) whose 14x14 cell overlaps any object's bbox."""
    m = np.zeros((GRID, GRID), dtype=bool)
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        c0, c1 = max(0, x0 // PATCH_SIZE), min(GRID - 1, (x1 - 1) // PATCH_SIZE)
        r0, r1 = max(0, y0 // PATCH_SIZE), min(GRID - 1, (y1 - 1) // PATCH_SIZE)
        m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m.reshape(-1)


def cls_attention(model, pixel_values: torch.Tensor, layer: int = -2):
    """CLS-query attention probabilities of one CLIP layer, computed from that layer's own q/k projections.

    Returns ``(attn, vision_outputs)`` with attn of shape (B, heads, 577) (key 0 is CLS itself) -- the
    CLS row of eager ``output_attentions[layer]`` -- and the tower's outputs (hidden states included).
    """
    vt = model.model.vision_tower
    mod = getattr(vt, "vision_model", vt).encoder.layers[layer].self_attn
    cap: dict[str, torch.Tensor] = {}

    def hook(_m, args, kwargs):
        cap["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = vt(pixel_values, output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
    h = cap["h"]
    b, n, _ = h.shape
    q = mod.q_proj(h[:, :1]).view(b, 1, mod.num_heads, mod.head_dim).transpose(1, 2)
    k = mod.k_proj(h).view(b, n, mod.num_heads, mod.head_dim).transpose(1, 2)
    attn = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * mod.scale, dim=-1)[:, :, 0]
    return attn, out
