"""FLOPs: counted (``FlopCounterMode``) and analytic (per architecture, following the tokens that
are actually present at every layer, plus each method's own scoring and selection work).

All numbers are FLOPs = 2 x multiply-adds, counting matrix products only (projections, attention's
``QK^T`` and ``AV`` over the full square, as SDPA computes it, MLPs, the patch-embedding convolution,
``lm_head``, and the matrix products a method runs to score or merge tokens) — the same operations
``torch.utils.flop_counter`` counts, so the two can be compared exactly. Norms, softmax, activations,
RoPE, top-k/sorting and other elementwise work are counted by neither.

Selection (:func:`selection_flops`: each method's ``selection_flops(cost)``, beside its rule in
``methods/<name>.py``, in terms of a :class:`CostModel`): recomputed CLIP ``q_proj``/``k_proj`` and CLS-row or full attention maps
(FasterVLM, VisionZip, VisPruner, HiPrune, PruMerge), DivPrune's ``N x N`` cosine matrix, VisPruner's
de-duplication rounds, VisionZip's key similarity and the projector on its kept tokens (the only ones it
projects, as the official code; the adapter skips projecting all ``N``, and so does PruMerge),
PruMerge's key similarity and neighbour merge, ToMe's bipartite similarity in every block (its
shrinking token counts are in the vision part), and for in-LLM methods the attention rows recomputed
from q/k at each stage (FastV, PyramidDrop, SparseVLM, TransPrune: with the ``k_proj``/``q_proj`` of
the layer when it has not run yet), SparseVLM's rater matrix, the Gram matrix of its recycling
candidates' distances and their cluster means. Work that is elementwise in the implementation is left
out by both counts (a few MFLOPs at LLaVA-1.5-7B shapes against TFLOPs): DART's cosine to its 8 pivots
(``2 * 8 * N * d``), TransPrune's token-transition norms, DivPrune's greedy min-updates.

``paper_convention`` gives the number most papers print instead (FastV section 4.2, reused by DART,
DivPrune and VisionZip): ``4nd^2 + 2n^2d + 2ndm`` **multiply-adds** (not x2) per LLM layer, LLM only,
``n`` = the prompt's text tokens + the visual tokens entering the layer, with a 2-matrix MLP. It
under-counts LLaMA's 3-matrix SwiGLU MLP and omits the vision tower, the projector, ``lm_head`` and
selection; it is reported so published numbers can be compared, and depends on the prompt length
(records state it: ``paper_convention_text_tokens``). Some papers use 3 MLP matrices (SparseVLM's and
PyramidDrop's counters: ``mlp_matrices=3``) or leave the text out (PyramidDrop: ``text_tokens=0``);
``tests/test_flops.py`` reproduces FastV's, PyramidDrop's and SparseVLM's published figures and names the
convention of each.

fvcore (``fvcore.nn.FlopCountAnalysis``) is the second counter the tests compare against: it counts
one multiply-add as one "flop" (so its numbers are half of these) and skips ops it has no handle for
(SDPA among them); ``tests/test_flops.py`` states what is compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode

_REGISTERED = False


def _register_cpu_sdpa() -> None:
    """torch has no FLOP formula for the CPU flash-attention kernel, so CPU counts silently missed
    every attention product; register the same formula the CUDA kernels use."""
    global _REGISTERED
    if _REGISTERED:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in _fc.flop_registry:

        @_fc.register_flop_formula(op)
        def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    _REGISTERED = True


def counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU SDPA attention."""
    _register_cpu_sdpa()
    return FlopCounterMode(display=False)


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` under the counter; returns ``(flops, fn's result)``."""
    with counter() as c:
        out = fn()
    return c.get_total_flops(), out


@dataclass
class Breakdown:
    """Analytic FLOPs of one sample's forward, by part (2 x multiply-adds)."""

    vision: int = 0
    projector: int = 0
    selection: int = 0
    llm: int = 0
    lm_head: int = 0
    per_llm_layer: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.selection + self.llm + self.lm_head

    def as_dict(self) -> dict[str, float]:
        return {"vision": self.vision, "projector": self.projector, "selection": self.selection, "llm": self.llm, "lm_head": self.lm_head, "total": self.total}


def _vision_flops(vc, tokens_per_layer: Sequence[int | tuple[int, int]] | None = None) -> int:
    """CLIP tower: patch embedding + encoder layers (HF runs all of them, feature layer or not).

    ``tokens_per_layer`` lists the layers that run, each as a token count or as ``(attention tokens,
    MLP tokens)`` when a layer merges between its attention and its MLP (ToMe); default: every layer
    on the full ``1 + N`` tokens.
    """
    d, m = vc.hidden_size, vc.intermediate_size
    grid = (vc.image_size // vc.patch_size) ** 2
    macs = grid * vc.num_channels * vc.patch_size**2 * d
    n_layers = vc.num_hidden_layers
    tokens = list(tokens_per_layer) if tokens_per_layer is not None else [grid + 1] * n_layers
    for entry in tokens:
        n, n_mlp = entry if isinstance(entry, tuple) else (entry, entry)
        macs += 4 * n * d * d + 2 * n * n * d + 2 * n_mlp * d * m
    return 2 * macs


def _llm_layer_macs(tc, s: int, ctx: int | None = None) -> int:
    """One Llama decoder layer on ``s`` new tokens attending over ``ctx`` keys (``ctx = s`` in prefill)."""
    d, m = tc.hidden_size, tc.intermediate_size
    head_dim = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    q_dim = tc.num_attention_heads * head_dim
    kv_dim = tc.num_key_value_heads * head_dim
    ctx = s if ctx is None else ctx
    proj = s * d * q_dim + 2 * s * d * kv_dim + s * q_dim * d
    attn = 2 * s * ctx * q_dim
    mlp = 3 * s * d * m  # SwiGLU: gate, up, down
    return proj + attn + mlp


def analytic_prefill(config, text_tokens: int, visual_per_layer: Sequence[int], n_visual_in: int | None = None, selection_flops: int = 0, logits_positions: int = 1, vision_tokens_per_layer: Sequence[int | tuple[int, int]] | None = None) -> Breakdown:
    """FLOPs of one sample's prefill for a LLaVA-style config.

    Parameters
    ----------
    config : LlavaConfig
    text_tokens : int
        Non-visual tokens of the prompt (system, question, template).
    visual_per_layer : sequence of int
        Visual tokens entering each LLM decoder layer (length ``num_hidden_layers``).
    n_visual_in : int, optional
        Visual tokens the projector maps (576 for LLaVA-1.5); default: the full grid.
    selection_flops : int
        The method's own scoring/selection cost.
    logits_positions : int
        Positions ``lm_head`` is applied to (1 in generation's prefill).
    vision_tokens_per_layer : sequence of int or (int, int), optional
        The CLIP layers that run and their tokens, when a method merges inside the tower (ToMe):
        see :func:`vision_blocks`.
    """
    vc, tc = config.vision_config, config.text_config
    grid = (vc.image_size // vc.patch_size) ** 2
    n_in = grid if n_visual_in is None else n_visual_in
    if len(visual_per_layer) != tc.num_hidden_layers:
        raise ValueError(f"visual_per_layer has {len(visual_per_layer)} entries for {tc.num_hidden_layers} layers")
    b = Breakdown()
    b.vision = _vision_flops(vc, vision_tokens_per_layer)
    b.projector = 2 * n_in * (vc.hidden_size * tc.hidden_size + tc.hidden_size * tc.hidden_size)
    b.selection = int(selection_flops)
    b.per_llm_layer = [2 * _llm_layer_macs(tc, text_tokens + int(v)) for v in visual_per_layer]
    b.llm = sum(b.per_llm_layer)
    b.lm_head = 2 * logits_positions * tc.hidden_size * tc.vocab_size
    return b


def analytic_decode(config, cache_per_layer: Sequence[int], new_tokens: int) -> int:
    """FLOPs of generating ``new_tokens`` after a prefill that left ``cache_per_layer`` keys per layer."""
    tc = config.text_config
    total = 0
    for step in range(new_tokens):
        for ctx in cache_per_layer:
            total += 2 * _llm_layer_macs(tc, 1, ctx + step + 1)
        total += 2 * tc.hidden_size * tc.vocab_size
    return total


def paper_convention(config, text_tokens: int, visual_per_layer: Sequence[int], mlp_matrices: int = 2) -> int:
    """The papers' FLOPs convention: multiply-adds of the LLM prefill, summed over the layers listed.

    Per layer ``4nd^2 + 2n^2d + mlp_matrices * ndm`` with ``n = text_tokens + visual`` (FastV section 4.2:
    ``mlp_matrices=2``; SparseVLM's and PyramidDrop's counters: 3). Multiply-adds, not FLOPs (= 2 x
    multiply-adds): the number papers print as "FLOPs".
    """
    tc = config.text_config
    d, m = tc.hidden_size, tc.intermediate_size
    total = 0
    for v in visual_per_layer:
        n = text_tokens + int(v)
        total += 4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * m
    return total


# ----------------------------------------------------------------------------------- selection
class NoSelectionFormula(NotImplementedError):
    """A method defines no ``selection_flops``: its analytic FLOPs cannot be computed (yet)."""


@dataclass(frozen=True)
class Shapes:
    """What a selection formula needs to know about one batch (all host ints).

    Attributes
    ----------
    batch : int
        Samples in the batch.
    n_visual : int
        ``N`` visual tokens per image out of the vision tower (576 for LLaVA-1.5).
    kept : tuple[int, ...]
        Visual tokens per sample that reached the LLM (rows of merged tokens included).
    seq_len : int
        Padded length of the LLM input (every row is computed at this length).
    vis_start : int
        First visual position of the earliest-starting sample (in-LLM query rows are a suffix from
        there, as ``bench.models.llm_pruning`` takes them).
    """

    batch: int
    n_visual: int
    kept: tuple[int, ...]
    seq_len: int
    vis_start: int
    vision_tokens: tuple[tuple[int, ...], ...] | None = None  # per sample, patches entering each block (FlowCut)
    #: the CLIP text side a method asked the adapter for (CDPruner): per sample, the question's 77-token chunks;
    #: the text tower's FLOPs over the batch; the width of CLIP's joint space (0: no text side ran)
    text_chunks: tuple[int, ...] | None = None
    text_tower_flops: int = 0
    clip_projection_dim: int = 0

    @classmethod
    def of(cls, config, prepared) -> Shapes:
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        spans = prepared.extras.get("image_spans")
        start = int(spans[:, 0].min()) if spans is not None else 0
        vt = prepared.extras.get("vision_tokens_per_layer")
        vt = tuple(tuple(int(t) for t in row) for row in vt) if vt is not None else None
        text = prepared.extras.get("clip_text") or {}
        return cls(len(prepared.visual_tokens_kept), n, tuple(int(k) for k in prepared.visual_tokens_kept), int(prepared.attention_mask.shape[1]), start, vt,
                   tuple(int(c) for c in text["chunks"]) if "chunks" in text else None, int(text.get("tower_flops", 0)), int(text.get("projection_dim", 0)))


def _has_cls(vc) -> bool:
    return getattr(vc, "model_type", "") in ("clip_vision_model", "clip")


def _projector_per_token(config) -> int:
    vc, tc = config.vision_config, config.text_config
    return 2 * (vc.hidden_size * tc.hidden_size + tc.hidden_size * tc.hidden_size)


def _head_dims(tc) -> tuple[int, int, int]:
    """``(D, q_dim, kv_dim)`` of the LLM's attention."""
    d = tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    return d, tc.num_attention_heads * head_dim, tc.num_key_value_heads * head_dim


def feature_blocks(config) -> int:
    """CLIP blocks up to and including LLaVA's feature layer (what the in-tower merging path runs)."""
    n = config.vision_config.num_hidden_layers
    return config.vision_feature_layer % (n + 1)


def _tome_blocks(config, method) -> list[tuple[int, int]] | None:
    """``(tokens at attention, tokens after the merge)`` per block ToMe runs; ``None``: unmerged path."""
    if method.prune_ratio == 0.0 and getattr(method, "r", None) is None:
        return None
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    cls_token = _has_cls(vc)
    t = n + int(cls_token)
    out = []
    for r in method.schedule(n, feature_blocks(config), cls_token):
        r_eff = max(0, min(int(r), (t - int(cls_token)) // 2))
        out.append((t, t - r_eff))
        t -= r_eff
    return out


def vision_blocks(config, method) -> list[tuple[int, int]] | None:
    """Tokens per CLIP layer for ``analytic_prefill``'s ``vision_tokens_per_layer`` (``None``: all layers, full)."""
    return _tome_blocks(config, method) if method.stage == "in_vision" and hasattr(method, "schedule") else None


def _vision_extras(config, needs) -> int:
    """Per image: ``bench.models.clip_extras`` recomputing ``q_proj``/``k_proj`` of each named layer
    (once per layer), the CLS attention row and/or the full attention map."""
    from bench.models.clip_extras import parse_key, resolve_layer

    vc = config.vision_config
    d, n_layers = vc.hidden_size, vc.num_hidden_layers
    s = (vc.image_size // vc.patch_size) ** 2 + int(_has_cls(vc))
    qk, cls_rows, full = set(), set(), set()
    for key in needs:
        kind, layer, ref = parse_key(key)
        if kind in ("projector", "hidden") or layer is None:  # the CLIP text side: counted by the method
            continue
        i = resolve_layer(layer, ref, n_layers) % n_layers
        qk.add(i)
        if kind == "cls_attn":
            cls_rows.add(i)
        elif kind == "attn_colmean":
            full.add(i)
    return len(qk) * 2 * (2 * s * d * d) + len(cls_rows) * 2 * s * d + len(full) * 2 * s * s * d


def _llm_stages(config, method, sh: Shapes):
    """Yield ``(index, stage, sequence length before it, visual tokens before it)`` in execution order."""
    n_layers = config.text_config.num_hidden_layers
    plan = list(method.plan(sh.n_visual, n_layers))
    n_vis = sh.n_visual
    for i, st in sorted(enumerate(plan), key=lambda x: (x[1].layer, x[0])):
        yield i, st, sh.seq_len - sh.n_visual + n_vis, n_vis
        n_vis = st.n_keep


def _rows_cost(config, t: int, rows: int, projected: bool) -> int:
    """Attention rows recomputed for ``rows`` queries over ``t`` keys; ``projected``: the layer's
    ``k_proj`` (all ``t``) and ``q_proj`` (the rows) are run again on its input."""
    d, q_dim, kv_dim = _head_dims(config.text_config)
    cost = 2 * q_dim * rows * t
    if projected:
        cost += 2 * t * d * kv_dim + 2 * rows * d * q_dim
    return cost


class CostModel:
    """What a method's ``selection_flops(cost)`` reads: the batch (:class:`Shapes`), the model's widths, and
    the cost of the model work a method asks for (tower extras, recomputed attention rows). Every count is
    FLOPs = 2 x multiply-adds; the method itself states its own matrix products in these terms, so no
    method reads a model config.
    """

    def __init__(self, config, shapes: Shapes) -> None:
        self.config, self.shapes = config, shapes
        vc, tc = config.vision_config, config.text_config
        self.batch, self.n_visual, self.kept = shapes.batch, shapes.n_visual, shapes.kept
        #: vision tower width, its heads' width and whether it has a CLS token
        self.vision_width = vc.hidden_size
        self.vision_head_dim = vc.hidden_size // vc.num_attention_heads
        self.has_cls = _has_cls(vc)
        #: LLM width (= the projected visual tokens' width) and its attention heads' width
        self.llm_width = tc.hidden_size
        self.llm_head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        #: the projector on one token
        self.projector_per_token = _projector_per_token(config)
        #: query rows after the image (the in-LLM methods' text rows, from the earliest image's end)
        self.after_image_rows = shapes.seq_len - shapes.vis_start - shapes.n_visual

    def vision_extras(self, needs) -> int:
        """Per image: the tower quantities ``needs`` names (``VisionContext`` keys), recomputed."""
        return _vision_extras(self.config, needs)

    def tome_blocks(self, method) -> list[tuple[int, int]] | None:
        """``(tokens at attention, tokens after the merge)`` per block an in-tower method runs; ``None``: unmerged."""
        return _tome_blocks(self.config, method)

    def llm_stages(self, method):
        """Yield ``(index, stage, sequence length before it, visual tokens before it)`` in execution order."""
        return _llm_stages(self.config, method, self.shapes)

    def attention_rows(self, t: int, rows: int, projected: bool) -> int:
        """Attention rows recomputed for ``rows`` queries over ``t`` keys; ``projected``: the layer's ``k_proj``
        (all ``t``) and ``q_proj`` (the rows) are run again on its input."""
        return _rows_cost(self.config, t, rows, projected)


def selection_flops(config, method, shapes: Shapes) -> int:
    """The method's own scoring/selection matrix products for the whole batch: its ``selection_flops``.

    Raises :class:`NoSelectionFormula` for a method without one (the base class's), so that a new method
    is not silently reported without its selection cost.
    """
    try:
        return int(method.selection_flops(CostModel(config, shapes)))
    except NotImplementedError as e:
        raise NoSelectionFormula(f"no selection-FLOPs formula for method {method.name!r}: define {type(method).__name__}.selection_flops") from e


def analytic_batch(config, method, prepared, with_selection: bool = True) -> Breakdown:
    """Analytic FLOPs of ``adapter.prepare`` + ``adapter.prefill`` for one prepared batch, summed over
    its samples (``per_llm_layer`` too). Every row is computed at the padded length, as the model runs
    it (padding positions cost like text); ``lm_head`` runs on the last position only.
    ``with_selection=False`` leaves ``selection`` at 0 (for a method without a formula)."""
    sh = Shapes.of(config, prepared)
    n_layers = config.text_config.num_hidden_layers
    rows = prepared.visual_tokens_per_layer(n_layers)
    blocks = vision_blocks(config, method)
    out = Breakdown(per_llm_layer=[0] * n_layers)
    for i in range(sh.batch):
        kept = sh.kept[i]
        if sh.vision_tokens is not None:  # cut inside the tower per image: the blocks that ran, CLS included
            blocks = [t + int(_has_cls(config.vision_config)) for t in sh.vision_tokens[i]]
        # the projector runs on all N tokens, on the tokens left in the tower, or not at all outside the method
        # (a method that projects only the tokens it keeps counts that in its selection_flops)
        n_in = 0 if (method.stage == "pre_llm" and method.projects_own_tokens) else (kept if blocks is not None else sh.n_visual)
        part = analytic_prefill(config, sh.seq_len - kept, rows[i], n_visual_in=n_in, vision_tokens_per_layer=blocks)
        out.vision += part.vision
        out.projector += part.projector
        out.llm += part.llm
        out.lm_head += part.lm_head
        out.per_llm_layer = [a + b for a, b in zip(out.per_llm_layer, part.per_llm_layer)]
    if with_selection:
        out.selection = selection_flops(config, method, sh)
    return out


# ----------------------------------------------------------------------------------- families
# The model below reads only the adapter's FlopsDescription and visual layout (bench/models/base.py), so
# every family is counted by one formula: tiles of a CLIP tower (LLaVA-NeXT's base + anyres crops) or
# Qwen2.5-VL's windowed tower, the projector or patch merger, and a grouped-query-attention LLM.


def llm_prefill_flops(desc, seq_len: int, batch: int = 1, logits_positions: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one LLM prefill of ``batch`` rows of ``seq_len`` tokens from a
    :class:`~bench.models.base.FlopsDescription`.

    Per layer: Q and O projections ``2 T D (H h)`` each, K and V ``2 T D (H_kv h)`` each (grouped-query
    attention reads fewer K/V heads), scores and values ``2 T^2 H h`` each (the full square: causal masking is
    not discounted, as SDPA kernels and ``FlopCounterMode`` count it), a SwiGLU MLP ``3 x 2 T D M``; plus the
    ``lm_head`` on ``logits_positions`` positions per row.
    """
    d, hd = desc.llm_width, desc.llm_head_dim
    t = int(seq_len)
    proj = 2 * t * d * hd * (2 * desc.llm_heads + 2 * desc.llm_kv_heads)
    attn = 2 * 2 * t * t * desc.llm_heads * hd
    mlp = 2 * 3 * t * d * desc.llm_mlp
    return batch * (desc.llm_layers * (proj + attn + mlp) + 2 * d * desc.vocab * logits_positions)


def _windows(h: int, w: int, win: int) -> list[int]:
    """Patches per attention window when an ``h x w`` patch grid is cut into ``win x win`` windows (edges smaller)."""
    rows = [min(win, h - r) for r in range(0, h, win)]
    cols = [min(win, w - c) for c in range(0, w, win)]
    return [a * b for a in rows for b in cols]


def vision_image_flops(desc, block, segments: Sequence[Sequence[int]] | None = None, merged: int | None = None) -> tuple[int, int]:
    """``(tower, projector)`` FLOPs of one image, from its :class:`~bench.models.base.ImageBlock`.

    * ``vision_window == 0`` (CLIP): ``block.tiles`` tiles of ``vision_tokens_per_tile`` tokens ([CLS] included),
      every layer attending over its tile; the projector runs on every tile's patches (LLaVA-NeXT projects all
      tiles, then unpads).
    * ``vision_window > 0`` (Qwen2.5-VL): one image of ``(m H) x (m W)`` patches for its merged ``H x W`` grid;
      layers in ``vision_full_layers`` attend over the whole image, the others within ``vision_window`` patch
      windows (the sum of the windows' squares); the merger runs on the ``H W`` merged tokens.
    * ``segments`` (a tower cut between blocks, FlowCut's ports): per block the lengths of its attention segments (the
      surviving patches of each window, or of the image; on CLIP each tile's tokens, [CLS] included, for the blocks
      that ran); the merger or projector runs on ``merged`` tokens.
    """
    d, m = desc.vision_width, desc.vision_mlp
    dense = lambda n: 2 * n * (4 * d * d + desc.vision_mlp_matrices * d * m)  # noqa: E731 - q, k, v, o + MLP per token
    proj_per_token = sum(2 * a * b for a, b in desc.projector_dims)
    if desc.vision_window == 0:
        t = desc.vision_tokens_per_tile
        patches = t - desc.vision_cls
        if segments is not None:  # FlowCut's LLaVA-NeXT port: per block the tokens of each tile; projector on the survivors
            tower = block.tiles * 2 * patches * desc.vision_patch_dim * d
            for segs in segments:
                tower += dense(sum(segs)) + 2 * 2 * d * sum(s * s for s in segs)
            return tower, int(merged) * proj_per_token
        per_tile = 2 * patches * desc.vision_patch_dim * d + desc.vision_layers * (dense(t) + 2 * 2 * t * t * d)
        return block.tiles * per_tile, block.tiles * patches * proj_per_token
    (gh, gw), mm = block.grids[0], desc.vision_merge
    ph, pw = gh * mm, gw * mm
    n = ph * pw
    if segments is not None:
        tower = 2 * n * desc.vision_patch_dim * d
        for segs in segments:
            tower += dense(sum(segs)) + 2 * 2 * d * sum(s * s for s in segs)
        return tower, int(merged) * proj_per_token
    windowed = sum(s * s for s in _windows(ph, pw, desc.vision_window))
    tower = 2 * n * desc.vision_patch_dim * d
    for layer in range(desc.vision_layers):
        tower += dense(n) + 2 * 2 * d * (n * n if layer in desc.vision_full_layers else windowed)
    return tower, gh * gw * proj_per_token


class DescriptionCostModel(CostModel):
    """:class:`CostModel` of a family read from its :class:`~bench.models.base.FlopsDescription` (no config):
    pre-LLM selections on the projected visual tokens; tower quantities are not modelled (refused there)."""

    def __init__(self, config, desc, shapes: Shapes) -> None:
        self.config, self.shapes = config, shapes
        self.batch, self.n_visual, self.kept = shapes.batch, shapes.n_visual, shapes.kept
        self.vision_width = desc.vision_width
        self.vision_head_dim = desc.vision_width // max(desc.vision_heads, 1)
        self.has_cls = desc.vision_cls > 0
        self.vision_merge = desc.vision_merge
        #: tower blocks whose received attention a no-[CLS] port reads: the first full-attention one and the last
        self.received_attention_blocks = len({*desc.vision_full_layers[:1], desc.vision_layers - 1})
        self.llm_width = desc.llm_width
        self.llm_head_dim = desc.llm_head_dim
        self.projector_per_token = sum(2 * a * b for a, b in desc.projector_dims)
        self.after_image_rows = shapes.seq_len - shapes.vis_start - shapes.n_visual

    def vision_extras(self, needs) -> int:
        if needs:
            raise NotImplementedError("vision-tower extras are modelled for LLaVA-1.5's CLIP tower only")
        return 0

    def tome_blocks(self, method):
        raise NotImplementedError("in-tower merging is modelled for LLaVA-1.5's CLIP tower only")


def analytic_adapter(adapter, method, prepared, batch: dict, with_selection: bool = True) -> Breakdown:
    """Analytic FLOPs of ``adapter.prepare(batch)`` + ``adapter.prefill`` for any family, summed over samples.

    One fixed-resolution tile per image (LLaVA-1.5) goes through :func:`analytic_batch` (which also models
    in-tower merging, tower extras and in-LLM stages); other layouts through :func:`vision_image_flops` and
    :func:`llm_prefill_flops`, with the method's selection from :class:`DescriptionCostModel` when every
    sample's selection is one call over the same ``N`` tokens (raises :class:`NoSelectionFormula` otherwise).
    """
    desc = adapter.flops_description()
    layouts = adapter.visual_layout(batch)
    if desc.vision_window == 0 and all(b.tiles == 1 and len(b.grids) == 1 for blocks in layouts for b in blocks):
        return analytic_batch(adapter.config, method, prepared, with_selection)
    bsz, t = len(prepared.visual_tokens_kept), int(prepared.attention_mask.shape[1])
    out = Breakdown(per_llm_layer=[0] * desc.llm_layers)
    segments = prepared.extras.get("vision_segments") or [None] * len(layouts)
    # the tokens the projector ran on, where a tower cut sent fewer than it projected (FlowCut's LLaVA-NeXT port: unpadding)
    projected = prepared.extras.get("vision_projected") or prepared.visual_tokens_kept
    for blocks, segs, kept in zip(layouts, segments, projected):
        for b in blocks:
            tower, proj = vision_image_flops(desc, b, segs, kept)
            out.vision += tower
            out.projector += proj
    vpl = prepared.extras.get("visual_tokens_per_layer") if method.stage == "in_llm" else None
    if vpl is not None:  # pruned inside the LLM: layer l runs on the padded row less the tokens dropped before it
        n_l = desc.llm_layers
        out.per_llm_layer = [sum(llm_prefill_flops(desc, t - int(prepared.visual_tokens_kept[i]) + int(vpl[i][l]), 1, 0) // n_l
                                 for i in range(bsz)) for l in range(n_l)]
        out.llm = sum(out.per_llm_layer)
    else:
        llm = llm_prefill_flops(desc, t, bsz, logits_positions=0)
        out.llm = llm
        out.per_llm_layer = [llm // desc.llm_layers] * desc.llm_layers
    out.lm_head = bsz * 2 * desc.llm_width * desc.vocab
    if with_selection and method.stage != "none" and method.prune_ratio > 0:
        newlines = prepared.extras.get("newline_tokens") or [0] * bsz
        sent = prepared.extras.get("newline_tokens_kept") or newlines
        if method.stage == "in_llm":  # the in-LLM block is the packed span, newlines included (llava_next_inllm)
            newlines = sent = [0] * bsz
        n_in = {int(a) - int(nl) for a, nl in zip(prepared.visual_tokens_in, newlines)}
        if len(n_in) != 1 or (prepared.extras.get("budget") in ("tile", "base_grid") and method.stage != "in_llm"):
            raise NoSelectionFormula("selection FLOPs are modelled for one selection call over the same N tokens per sample "
                                     "(not per tile or per base tile + grid, nor over samples of different visual counts)")
        spans = prepared.extras.get("image_spans")
        # a tower cut (FlowCut's Qwen port): the patches entering each block of the images it cut
        vt = tuple(tuple(c) if s is not None else () for c, s in zip(prepared.extras.get("vision_tokens_per_layer") or [], segments)) or None
        sh = Shapes(bsz, n_in.pop(), tuple(int(k) - int(nl) for k, nl in zip(prepared.visual_tokens_kept, sent)), t,
                    int(spans[:, 0].min()) if spans is not None else 0, vision_tokens=vt)
        try:
            out.selection = int(method.selection_flops(DescriptionCostModel(adapter.config, desc, sh)))
        except NotImplementedError as e:
            raise NoSelectionFormula(f"no selection-FLOPs formula for method {method.name!r} on {desc.family}: {e}") from e
    return out
