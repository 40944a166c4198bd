"""CLIP's text side for question-conditioned methods (CDPruner): the text tower and the joint-space projections.

A LLaVA model keeps only CLIP's vision tower; CDPruner also needs the text tower of the *same* CLIP and its
``visual_projection``, loaded from the CLIP checkpoint the LLaVA tower came from (``model.text_tower.source``:
``openai/clip-vit-large-patch14-336`` for LLaVA-1.5; a local directory such as ``bench:tiny-llava-synth/clip-text``
for the embedded model). As the official ``CLIPVisionTower.load_text_tower``: ``CLIPTokenizerFast``,
``CLIPTextModelWithProjection`` and ``CLIPVisionModelWithProjection(...).visual_projection``, all from that one
checkpoint, in float32 (the official code loads them without a dtype).

Quantities served to methods (``VisionContext.extras``):

``clip_image_embeds``  ``(B, N, C)`` float32: ``visual_projection(post_layernorm(h[L][:, 1:]).float())``, ``h[L]``
                       the LLaVA tower's feature layer (``vision_feature_layer``, -2), its own ``post_layernorm``
``clip_text_embeds``   ``(B, M, C)`` float32 ``text_embeds`` of each sample's question chunks (rows past the
                       sample's chunk count are zero padding)
``clip_text_chunks``   ``(B,)`` chunk counts

The question: the user text of the prompt (``batch["texts"]``, what the benchmark asked, image tag removed) minus
the answer-format post-prompt, as the official evaluation scripts remove it (``str.replace`` of
:data:`POST_PROMPTS`). It is tokenised without truncation, right-padded with id 0 / mask 0 to a multiple of the
tower's ``max_position_embeddings`` (77) and cut into chunks of that length; the tower runs on one sample's
chunks at a time (as the official batch-1 code does), so a sample's embeddings never depend on its neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from bench.errors import ConfigError, IncompatibleMethodError, MissingWeightsError

#: Answer-format post-prompts the official evaluation removes from the question before the text tower
#: (``model_vqa_loader.py``, ``model_vqa_science.py``), and SynthVQA's own one (the same role).
POST_PROMPTS = (
    "\nAnswer the question using a single word or phrase.",
    "\nAnswer with the option's letter from the given choices directly.",
    "\nAnswer the question using a single word.",
)

TEXT_KEYS = ("clip_image_embeds", "clip_text_embeds", "clip_text_chunks")


def question_text(user_text: str) -> str:
    """The text the official code gives CLIP's text tower: the user text without the answer-format post-prompt."""
    q = user_text.replace("<image>", "").strip()
    for p in POST_PROMPTS:
        q = q.replace(p, "")
    return q


def needs_text(method) -> bool:
    """Whether ``method`` asks for the CLIP text side."""
    return any(k in TEXT_KEYS for k in getattr(method, "needs", ()))


class ClipTextSide:
    """Tokenizer, text tower and ``visual_projection`` of one CLIP checkpoint (loaded on first use).

    Parameters
    ----------
    source : str
        Hub id or local directory of a CLIP checkpoint (``CLIPModel`` layout: ``text_model.*``,
        ``text_projection``, ``vision_model.*``, ``visual_projection``), plus its tokenizer.
    device : torch.device
    download : bool
        Allow fetching from the hub.
    """

    def __init__(self, source: str, device: torch.device, download: bool = False) -> None:
        self.source, self.device, self.download = source, device, download
        self.tokenizer = self.text_tower = self.visual_projection = None

    @classmethod
    def random(cls, config, vision_width: int, device: torch.device, seed: int = 0) -> "ClipTextSide":
        """Random weights of the real shapes (``model.weights=random``: efficiency-only runs) from a ``CLIPConfig``;
        ``visual_projection`` maps the LLaVA tower's width (``vision_width``, the CLIP vision width for the real
        models) to the joint space. The tokenizer is the stand-in CLIP BPE of ``bench.tiny_clip_text`` (it only
        sets the chunk count)."""
        from transformers import CLIPTextModelWithProjection

        from bench.tiny_clip_text import build_clip_tokenizer

        side = cls("random-init", device)
        torch.manual_seed(seed)
        side.tokenizer = build_clip_tokenizer()
        side.text_tower = CLIPTextModelWithProjection(config.text_config).to(device).eval()
        side.visual_projection = torch.nn.Linear(vision_width, config.projection_dim, bias=False).to(device).eval()
        side.text_tower.requires_grad_(False)
        side.visual_projection.requires_grad_(False)
        side.max_position_embeddings = int(config.text_config.max_position_embeddings)
        return side

    def load(self) -> "ClipTextSide":
        if self.text_tower is not None:
            return self
        from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionModelWithProjection

        from transformers.utils import logging as hf_logging

        local = Path(self.source).is_dir()
        kw = {"local_files_only": not self.download, "dtype": torch.float32}
        level = hf_logging.get_verbosity()
        # each class reads only its half of the CLIP checkpoint: its load report lists the other half as unexpected
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = CLIPTokenizerFast.from_pretrained(self.source, local_files_only=not self.download)
            self.text_tower = CLIPTextModelWithProjection.from_pretrained(self.source, **kw).to(self.device).eval()
            # the official load_text_tower takes visual_projection from CLIPVisionModelWithProjection of the same id
            vision = CLIPVisionModelWithProjection.from_pretrained(self.source, **kw)
            self.visual_projection = vision.visual_projection.to(self.device).eval()
            del vision
        except OSError as e:
            where = f"at {self.source}" if local else f"for {self.source!r} in the local Hugging Face cache"
            raise MissingWeightsError(
                f"CLIP text tower {where} cannot be loaded ({str(e).splitlines()[0]}). CDPruner needs the text tower and "
                f"visual_projection of the CLIP checkpoint the LLaVA vision tower comes from: download it "
                f"(`hf download {self.source}`), point model.text_tower.source at a local copy, or pass model.download=true."
            ) from None
        finally:
            hf_logging.set_verbosity(level)
        self.text_tower.requires_grad_(False)
        self.visual_projection.requires_grad_(False)
        self.max_position_embeddings = int(self.text_tower.config.max_position_embeddings)
        return self

    @property
    def projection_dim(self) -> int:
        return int(self.visual_projection.out_features)

    @torch.no_grad()
    def encode_question(self, question: str) -> torch.Tensor:
        """One question -> ``(M, C)`` float32 ``text_embeds`` of its ``M`` 77-token chunks (official chunking)."""
        self.load()
        inputs = self.tokenizer(text=question, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        seg = (length - 1) // self.max_position_embeddings + 1
        pad = self.max_position_embeddings * seg - length
        inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], pad))], dim=1).reshape(-1, self.max_position_embeddings).to(self.device)
                  for k, v in inputs.items()}
        return self.text_tower(**inputs).text_embeds.float()

    @torch.no_grad()
    def encode_questions(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample (one tower call each) -> ``(B, M, C)`` zero-padded embeddings and ``(B,)`` chunk counts."""
        embs = [self.encode_question(q) for q in questions]
        m = max(e.shape[0] for e in embs)
        out = embs[0].new_zeros((len(embs), m, embs[0].shape[1]))
        for i, e in enumerate(embs):
            out[i, : e.shape[0]] = e
        return out, torch.tensor([e.shape[0] for e in embs], dtype=torch.long)

    @torch.no_grad()
    def image_embeds(self, vision_model, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + N, D_vis)`` feature-layer hidden states -> ``(B, N, C)`` float32 joint-space embeddings
        (``post_layernorm`` of the LLaVA tower in its dtype, then ``.float()`` and the float32 projection)."""
        self.load()
        return self.visual_projection(vision_model.post_layernorm(hidden[:, 1:]).float())

    def tower_flops(self, chunks: int) -> int:
        """FLOPs (2 x multiply-adds) of the text tower on ``chunks`` 77-token chunks: every layer's q/k/v/o and
        MLP products and its attention (scores and weighted values), plus ``text_projection`` of the pooled token."""
        c = self.text_tower.config
        t, d = self.max_position_embeddings, c.hidden_size
        per_layer = 2 * t * 4 * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * c.intermediate_size
        return chunks * (c.num_hidden_layers * per_layer + 2 * d * self.projection_dim)


def build_text_extras(side: ClipTextSide, vision_model, hidden_states, feature_layer: int, texts: list[str] | None,
                      needs) -> dict[str, Callable[[], Any]]:
    """Lazy closures for the text-side keys of ``needs`` (computed once each)."""
    cache: dict[str, Any] = {}

    def questions():
        if texts is None:
            raise IncompatibleMethodError("this method needs the question text (batch['texts']), which this batch does not carry")
        if "q" not in cache:
            emb, chunks = side.encode_questions([question_text(t) for t in texts])
            cache["q"] = (emb, chunks)
        return cache["q"]

    def image():
        if hidden_states is None:
            raise IncompatibleMethodError("clip_image_embeds needs the vision tower's hidden states")
        if "i" not in cache:
            cache["i"] = side.image_embeds(vision_model, hidden_states[feature_layer])
        return cache["i"]

    make = {"clip_image_embeds": image, "clip_text_embeds": lambda: questions()[0], "clip_text_chunks": lambda: questions()[1]}
    return {k: make[k] for k in needs if k in make}


def text_tower_source(cfg: dict | None) -> tuple[str | None, dict[str, str]]:
    """``model.text_tower`` (``{source, sha256, config_file}`` or ``null``) -> ``(source or None, pins)``; the adapter
    resolves ``bench:<asset>`` sources (``config_file``: the architecture for ``model.weights=random``)."""
    if cfg is None:
        return None, {}
    if not isinstance(cfg, dict) or not cfg.get("source"):
        raise ConfigError(f"model.text_tower must be null or a mapping with a 'source' (a CLIP checkpoint), got {cfg!r}")
    pins = cfg.get("sha256") or {}
    if not isinstance(pins, dict):
        raise ConfigError(f"model.text_tower.sha256 must be a mapping {{file name: sha256}}, got {pins!r}")
    return str(cfg["source"]), dict(pins)
