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


@dataclass
class ImageBlock:
    """Where one image's visual tokens sit in one sample, and how they are laid out.

    Attributes
    ----------
    start : int
        Index of the block's first token in the sample's (unpadded) prompt.
    length : int
        Tokens of the block in the LLM sequence (image placeholders, LLaVA-NeXT's newline tokens included).
    grids : list[tuple[int, int]]
        ``(H, W)`` of each raster segment of the block, in sequence order: one for LLaVA-1.5 and
        Qwen2.5-VL (the merged 2x2 grid), two for an anyres LLaVA-NeXT image (base tile, then the
        unpadded high-resolution grid).
    tiles : int
        Crops the vision tower encoded for this image (1, or LLaVA-NeXT's base + anyres tiles).
    """

    start: int
    length: int
    grids: list[tuple[int, int]]
    tiles: int = 1


@dataclass
class FlopsDescription:
    """What the analytic FLOPs model needs to know about one family (:meth:`ModelAdapter.flops_description`).

    ``vision_tokens_per_tile`` counts tokens inside the tower per encoded tile (CLIP: ``1 + N`` with the
    CLS; Qwen2.5-VL: patches before the 2x2 merger); ``vision_window`` is the window size in patches of
    windowed-attention layers (0: every layer attends globally) and ``vision_full_layers`` the layers
    that attend over the whole image. ``llm_kv_heads < llm_heads`` is grouped-query attention.
    """

    family: str
    vision_layers: int
    vision_width: int
    vision_mlp: int
    vision_tokens_per_tile: int
    vision_window: int
    vision_full_layers: tuple[int, ...]
    projector: str
    llm_layers: int
    llm_width: int
    llm_mlp: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab: int
    #: inputs of the patch embedding per patch (``C p^2``; Qwen2.5-VL's temporal patches ``C T p^2``)
    vision_patch_dim: int = 0
    vision_heads: int = 0
    #: [CLS] tokens per tile (CLIP: 1)
    vision_cls: int = 0
    #: weight matrices of a tower MLP (CLIP: fc1, fc2 = 2; Qwen2.5-VL's SwiGLU: gate, up, down = 3)
    vision_mlp_matrices: int = 2
    #: patches per side merged into one LLM token (Qwen2.5-VL's merger: 2)
    vision_merge: int = 1
    #: the projector's ``(in, out)`` matrices applied to every LLM visual token it outputs
    projector_dims: tuple[tuple[int, int], ...] = ()


class ModelAdapter(abc.ABC):
    """The contract between the harness and one model family: *where and how* a method's choice is applied.

    The runner, the lmms-eval model (``bench.lmms_model``), the measurement code (``bench.measure``) and the
    in-LLM hooks (``bench.models.llm_pruning``) use these members and nothing else of a model; every
    family constant (token counts, image sizes, vocabulary caps, module paths, norm classes) lives behind
    them. Members, by concern:

    * loading and identity: :attr:`name`, :attr:`device`, :attr:`dtype`, :attr:`attn_implementation`,
      :attr:`weights`, :meth:`load`, :meth:`fingerprint`, :meth:`weights_revision`, :attr:`model`,
      :attr:`processor`, :attr:`config`;
    * prompts: :meth:`chat_prompt` (the processor's chat template), :meth:`process` (images + prompts ->
      a processor batch), :meth:`probe_batch` (a synthetic batch of the family's real shapes);
    * the visual layout: :attr:`grid`, :attr:`has_cls`, :attr:`image_token_id`, :meth:`visual_layout`;
    * running: :meth:`check_method`, :meth:`prepare`, :meth:`prefill`, :meth:`generate`, :meth:`position_ids`,
      :meth:`next_position_ids`, and the stages of ``prepare`` timed alone: :meth:`vision_stage`, :meth:`selection_stage`;
    * pruning hooks: :attr:`supported_stages`, :meth:`llm_pruning`, :attr:`language_model`,
      :attr:`decoder_layers`, :meth:`is_llama_rms_norm`, :meth:`replays_selection`;
    * costs: :meth:`kv_cache_bytes`, :meth:`llm_weight_bytes`, :meth:`flops_description`.

    In-LLM methods (``stage == "in_llm"``) are applied by hooks on decoder layers that an adapter installs
    in :meth:`llm_pruning`; an adapter refuses stages and methods it does not support in :meth:`check_method`
    (:class:`bench.errors.IncompatibleMethodError`, exit code 2).
    """

    #: Method stages this adapter can apply.
    supported_stages: frozenset[str] = frozenset({"none", "pre_llm"})
    #: Family name used in records and the README's method x family table.
    family: str = ""

    name: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    weights: str
    model: Any
    processor: Any

    # ------------------------------------------------------------------ loading and identity
    @abc.abstractmethod
    def load(self) -> "ModelAdapter":
        """Load weights (or build random ones for ``weights=random``) and the processor. Idempotent."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Identity of the weights that goes into the run id."""

    @abc.abstractmethod
    def weights_revision(self) -> str:
        """Content hash or hub snapshot of the weights actually loaded (provenance)."""

    def weights_format(self) -> str | None:
        """What :meth:`load` reads (``safetensors``, ``pickle``, ``random-init``, ...), for the record; None: not known."""
        return None

    @property
    def config(self):
        """The loaded model's transformers config."""
        return self.model.config

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, text: str) -> str:
        """One image followed by ``text`` in a user turn, rendered with the processor's chat template and
        the generation prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def process(self, images: list, prompts: list[str]) -> dict[str, torch.Tensor]:
        """A left-padded processor batch of one image per prompt."""
        if self.processor is None:
            raise RuntimeError(f"model {self.name!r} has no processor (random weights?); it cannot answer benchmark questions")
        return dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))

    @abc.abstractmethod
    def probe_batch(self, batch_size: int = 1, seed: int = 0, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """A synthetic processor-shaped batch at the family's real shapes (seeded ids and pixels): the input of
        efficiency measurements without a benchmark sample. ``size``: the image's ``(H, W)`` in pixels (default:
        the family's reference resolution); a family with one fixed input resolution refuses any other
        (:class:`bench.errors.ConfigError`)."""

    # ------------------------------------------------------------------ visual layout
    @property
    @abc.abstractmethod
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` patch grid of one image's visual tokens at the family's reference resolution (per tile for
        LLaVA-NeXT); a sample's actual layout is :meth:`visual_layout`."""

    @property
    @abc.abstractmethod
    def has_cls(self) -> bool:
        """Whether the vision tower has a CLS token."""

    @property
    @abc.abstractmethod
    def image_token_id(self) -> int:
        """Id of the image placeholder token in prompts."""

    @property
    def pad_token_id(self) -> int:
        if self.processor is not None and self.processor.tokenizer.pad_token_id is not None:
            return self.processor.tokenizer.pad_token_id
        cfg = self.config
        pad = getattr(cfg, "pad_token_id", None) or getattr(getattr(cfg, "text_config", cfg), "pad_token_id", None)
        return 0 if pad is None else pad

    @abc.abstractmethod
    def visual_layout(self, batch: dict[str, torch.Tensor]) -> list[list[ImageBlock]]:
        """Per sample of a processor batch, its images' :class:`ImageBlock` (before pruning)."""

    # ------------------------------------------------------------------ running
    @abc.abstractmethod
    def check_method(self, method) -> None:
        """Raise :class:`bench.errors.IncompatibleMethodError` (exit 2, with the reason) for a method this family
        cannot run."""

    @abc.abstractmethod
    def prepare(self, batch: dict[str, torch.Tensor], method, sample_seeds: torch.Tensor) -> PreparedBatch:
        """Encode images, apply ``method`` and build the LLM inputs for one processed batch."""

    @abc.abstractmethod
    def prefill(self, prepared: PreparedBatch, method=None):
        """One LLM prefill with the KV cache on, positions as ``generate`` uses them; returns the model output."""

    @abc.abstractmethod
    def generate(self, prepared: PreparedBatch, max_new_tokens: int = 16, method=None, **gen_kwargs) -> torch.Tensor:
        """Greedy generation from prepared inputs; returns ``(B, T_new)`` new token ids."""

    def position_ids(self, prepared: PreparedBatch) -> torch.Tensor:
        """Position ids of a prepared prompt as :meth:`prefill` and :meth:`generate` use them: ``(B, T)`` from the
        attention mask's cumulative sum, or the adapter's own (``extras["position_ids"]``: original 1-D ids kept,
        or Qwen2.5-VL's ``(3, B, T)`` M-RoPE positions)."""
        pos = prepared.extras.get("position_ids")
        if pos is None:
            pos = (prepared.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos

    def next_position_ids(self, prepared: PreparedBatch, step: int = 0) -> torch.Tensor:
        """Position of decode step ``step`` (0: the first generated token): the prompt's largest position + 1 +
        ``step`` in every dimension, as ``generate`` continues; ``(B, 1)`` or ``(3, B, 1)``."""
        return self.position_ids(prepared).amax(dim=-1, keepdim=True) + 1 + step

    def vision_stage(self, batch: dict[str, torch.Tensor]):
        """The vision side of :meth:`prepare` alone on a processor batch (tower + projector, no method): what the
        per-stage latency times as ``vision_encoder``."""
        raise NotImplementedError(f"{type(self).__name__} does not time its vision stage alone")

    def selection_stage(self, batch: dict[str, torch.Tensor], method, sample_seeds: torch.Tensor):
        """A zero-argument callable running ``method``'s selection alone as :meth:`prepare` runs it, on the vision
        stage's outputs computed once beforehand (timed as ``selection``); ``None`` when the method selects
        inside a stage (the tower or the LLM)."""
        return None

    # ------------------------------------------------------------------ pruning hooks
    @property
    def num_llm_layers(self) -> int:
        """Number of decoder layers of the language model."""
        return len(self.decoder_layers)

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm; no ``lm_head``)."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def is_llama_rms_norm(self, norm: torch.nn.Module) -> bool:
        """Whether ``norm`` computes ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` (the fused path of
        ``bench.models.llm_pruning.rms_norm`` reproduces exactly that)."""
        return False

    def llm_pruning(self, method, prepared: PreparedBatch):
        """Context manager applying an ``in_llm`` method inside the decoder; a null context otherwise."""
        import contextlib

        if getattr(method, "stage", None) == "in_llm":
            from bench.errors import IncompatibleMethodError

            raise IncompatibleMethodError(f"{type(self).__name__} does not implement in-LLM pruning")
        return contextlib.nullcontext(None)

    def replays_selection(self, method) -> bool:
        """Whether this adapter replays ``method``'s selection from a CUDA graph (default: never); an adapter
        that says yes also provides ``graphed_selection(method)``, the replay itself."""
        return False

    # ------------------------------------------------------------------ costs
    @staticmethod
    def kv_cache_bytes(cache) -> list[int]:
        """Bytes held by each layer's keys and values in a transformers cache, read from the tensors."""
        layers = getattr(cache, "layers", None)
        out = []
        if layers is not None:
            for layer in layers:
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                out.append(sum(t.numel() * t.element_size() for t in (k, v) if isinstance(t, torch.Tensor)))
            return out
        for k, v in cache:  # legacy tuple-of-tuples caches
            out.append(k.numel() * k.element_size() + v.numel() * v.element_size())
        return out

    def llm_weight_bytes(self) -> int:
        """Bytes of the LLM's weights a prefill reads (decoder stack + ``lm_head``): the roofline's memory floor."""
        params = {id(p): p for p in self.language_model.parameters()}
        params.update({id(p): p for p in self.lm_head.parameters()})
        return sum(p.numel() * p.element_size() for p in params.values())

    @abc.abstractmethod
    def flops_description(self) -> FlopsDescription:
        """The family's architecture as the analytic FLOPs model reads it."""
