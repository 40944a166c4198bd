"""The model-adapter interface: *where and how* a method's choice is applied to a model."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PreparedBatch:
    """LLM inputs after visual-token pruning, ready for ``generate``/``forward``.

    Attributes
    ----------
    input_ids : torch.LongTensor
        ``(B, T)`` left-padded ids, each sample holding exactly its kept number of image tokens.
    inputs_embeds : torch.Tensor
        ``(B, T, D)`` embeddings with the (pruned) visual features scattered at the image tokens.
    attention_mask : torch.LongTensor
        ``(B, T)``; 0 on left padding.
    visual_tokens_in : list[int]
        Visual tokens per sample before pruning.
    visual_tokens_kept : list[int]
        Visual tokens per sample that reach the LLM.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    visual_tokens_in: list[int]
    visual_tokens_kept: list[int]
    extras: dict[str, Any] = field(default_factory=dict)

    def visual_tokens_per_layer(self, num_layers: int) -> list[list[int]]:
        """Per sample, the visual tokens entering each LLM decoder layer.

        In-LLM methods report it in ``extras["visual_tokens_per_layer"]`` (``(B, L)``); for pre-LLM
        methods every layer sees the tokens that entered the LLM.
        """
        vpl = self.extras.get("visual_tokens_per_layer")
        if vpl is not None:
            return [[int(x) for x in row] for row in vpl.tolist()]
        return [[int(k)] * num_layers for k in self.visual_tokens_kept]


class ModelAdapter(abc.ABC):
    """Loads one model family and applies pruning methods to it.

    Subclasses expose the vision geometry, encode images, and turn a processed batch plus a method
    into pruned LLM inputs. In-LLM methods (``stage == "in_llm"``) are applied by hooks on decoder
    layers that an adapter installs in :meth:`prune`; an adapter refuses stages it does not support.
    """

    #: Method stages this adapter can apply.
    supported_stages: frozenset[str] = frozenset({"none", "pre_llm"})

    @property
    @abc.abstractmethod
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` patch grid of one image's visual tokens."""

    @property
    @abc.abstractmethod
    def has_cls(self) -> bool:
        """Whether the vision tower has a CLS token."""

    @property
    @abc.abstractmethod
    def num_llm_layers(self) -> int:
        """Number of decoder layers of the language model."""

    @abc.abstractmethod
    def prepare(self, batch: dict[str, torch.Tensor], method, sample_seeds: torch.Tensor) -> PreparedBatch:
        """Encode images, apply ``method`` and build the LLM inputs for one processed batch."""

    @abc.abstractmethod
    def generate(self, prepared: PreparedBatch, **gen_kwargs) -> torch.Tensor:
        """Generate from prepared inputs; returns ``(B, T_new)`` new token ids."""

    def replays_selection(self, method) -> bool:
        """Whether this adapter replays ``method``'s selection from a CUDA graph (default: never); an adapter
        that says yes also provides ``graphed_selection(method)``, the replay itself."""
        return False
