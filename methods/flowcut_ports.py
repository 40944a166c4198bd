"""FlowCut's ports beyond LLaVA-1.5, the rules in plain torch, and the port plumbing of
:class:`methods.flowcut.FlowCut` (the mixin :class:`FlowCutPorts`).

**Qwen2.5-VL** (``port: qwen25vl``; ``TungChintao/FlowCut``, folder ``FlowCut_Qwen/``:
``modeling_qwen2_vl_flowcut.py`` + ``utils_flowcut.py``; its README: "implementation details of FlowCut for Qwen2-VL,
which are also applicable to Qwen2.5-VL"). What the official port does for ``flowcut(model, target_num)`` (batch 1,
one image):

* **in the tower** (``Qwen2VisionTransformerPretrainedModel_forward``): the tower keeps ``target = 8 target_num``
  patches (``visual.target_num = 2 target_num``, ``target = visual.target_num * 4``), i.e. ``2 target_num`` merged
  tokens. After every block, while more than ``target`` patches remain, the block's attention gives
  ``relation = mean_heads softmax(mean_tokens(q) . k^T / sqrt(d))`` (q, k rotated; one *global* query, the mean of
  the block's queries over all current patches; fp32 softmax cast back) and ``score = relation * |mean_heads v|_1``
  (``compute_score_vit``), accumulated as ``c = 0.5 c + 0.5 score`` (the first scored block sets ``c``). With
  ``rpl = blocks - i - 1`` remaining blocks, blocks with an even ``rpl`` cut
  ``int(round((N' - target) / sqrt(rpl) * (1 - (H / log N')^2)))`` patches (``adaptive_prune_ratio``:
  ``H = -sum a log(a + 1e-7)``), never below ``target``; the last block (``rpl = 0``) cuts to ``target``. The kept
  patches are ``topk(c)`` re-sorted (tower order survives), with their rotary rows. The merger then merges each run
  of 4 consecutive surviving patches (they need not be one 2x2 group);
* **in the LLM** (``Qwen2VLModel_forward`` / ``Qwen2VLSdpaAttention_forward``): inside layer 1 (the second), when the
  image holds more than ``target_num`` tokens, the last prompt token's rotated query against the image's rotated
  keys, ``relation = mean_heads softmax(q k^T / sqrt(d))`` over the image columns only, and its value against the
  image's values, ``semantic = mean_heads softmax(v_last v^T / sqrt(d))``; ``score = (relation + semantic) *
  |mean_heads v|_1`` (``compute_score_llm``: the normalised copies it computes are unused); ``topk(target_num)``
  sorted. Layer 1's output keeps those image tokens (layers 0 and 1 ran on all of them, their KV cache keeps all),
  at their positions; layers 2+ see ``target_num``.
* **positions**: after a cut in the tower the ``2 target_num`` merged tokens take the *first* ``2 target_num``
  M-RoPE positions of the image block (``position_ids[:, :, first:first + image_embeds.shape[0]]``); the text after
  the image keeps its original positions.

Here ``target_num = round(N (1 - ratio))`` (``N`` merged tokens of the image): the tokens entering layers 2+, the
official argument (``budget: official`` counts it); ``budget: layer_mean`` solves ``target_num`` so that the mean over
the LLM's layers is ``round(N (1 - ratio))``. Qwen2.5-VL's windows (absent in Qwen2-VL) are handled by the adapter
(``Qwen25VLAdapter.encode_flowcut``): each surviving patch stays in its window, windows shrink as patches go, and the
merged tokens are not un-permuted from the window order. Port differences: batched (tower per image, LLM stage per
group of equal token counts), a negative entropy cut is clamped at 0.

**LLaVA-NeXT** (``port: llava_next``; ``flowcut/main.py`` with ``image_aspect_ratio == 'anyres'``,
``llava_arch.py::prepare_inputs_labels_for_multimodal_flowcut`` + ``restore_image_features_sorted`` + ``unpad_mask``,
``modeling_llama_flowcut.py::LlamaModel_forward``), two stages:

* **in CLIP**, the LLaVA-1.5 rule (:meth:`methods.flowcut.FlowCut.after_block`) on the image's tiles (base + anyres
  crops) as *one batch*: every tile keeps ``int(target_num / 2)`` patches (``target_tokens = int(target_num/2) + 1``
  with [CLS]), each cut's count the maximum over the tiles (``adaptive_prune_ratio``'s ``r.max(0)``);
* **layout**: the base tile's kept patches, then the crops' kept patches scattered back into the stitched grid
  (``restore_image_features_sorted``), the unpadded rows/columns dropped (``unpad_mask``), raster order; *no*
  ``image_newline`` token (the anyres branch never appends one);
* **in the LLM** (``prune_layer = 1``): inside layer 1, when the image sent more than ``target_num`` tokens, the last
  prompt token's rotated query and its value score the image (``compute_score`` of ``utils_flowcut``:
  ``(relation / sum + semantic / sum) * |mean_heads v|_1``, *normalised*, unlike the Qwen port), ``topk(target_num)``
  sorted; layers 2+ see ``target_num`` image tokens with *contiguous* positions (``position_ids = arange``).

Here ``target_num = round(N_ref (1 - ratio))`` with ``N_ref`` the adapter's reference count (the largest pinpoint's
tiles x tile tokens, 2,880 on LLaVA-NeXT-7B; the official argument is one number per run, not per image: ratio
``1 - 640/2880`` is the paper's 640). Port differences: the tiles of one *image* are one batch (the official code
batches all tiles of all images of a call: a sample's cut would depend on its neighbours); during decoding layers 0
and 1 keep the original positions (the official ``LlamaModel_forward`` shifts the decoding position of every layer
by the dropped count, layers 0-1 included, whose caches hold all tokens); the unpadding is transformers'
``unpad_image`` (``round(..., 7)``, where ``unpad_mask`` truncates). Where ``int(target_num / 2)`` reaches a tile's
patches (ratio below about 0.6 on the 7B) nothing is cut in CLIP and every patch is sent, without newlines, before
the LLM stage; the official code fails there (its keep index stays the 577-wide ``arange``, which
``restore_image_features_sorted`` cannot scatter into 576 patches).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bench.errors import IncompatibleMethodError
from methods.base import PruningMethod, VisionContext
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, per_layer_counts

#: the LLM layer whose attention scores the image in the official LLaVA-NeXT code (``model.model.prune_layer = 1``)
NEXT_PRUNE_LAYER = 1
PORTS = ("auto", "llava", "qwen25vl", "llava_next")
#: the LLaVA-NeXT port's differences from the official code, recorded in its runs (``method_deviations``)
NEXT_DEVIATIONS = (
    "tile batch: officially every tile of a call is one batch (the entropy cut is their maximum); here one image's tiles",
    ("decoding positions: officially every layer's decoding position shifts by the dropped count (layers 0-1 too); "
     "here layers 0-1 keep original positions, layers 2+ the renumbered ones"),
    "entropy cut: a negative count (near-uniform attention), officially a top-k error, is clamped at 0",
    "no tower cut: where int(target_num / 2) reaches a tile's patches every patch is sent (officially an index error)",
    "unpadding: transformers' unpad_image (round(.., 7)) where the official unpad_mask truncates",
)


def qwen_tower_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One tower block's FlowCut quantities (official ``VisionSdpaAttention_forward`` + ``compute_score_vit``).

    Parameters
    ----------
    q, k : torch.Tensor
        ``(H, L, d)`` the block's rotated queries and keys on its normed input (all current patches of one image).
    v : torch.Tensor
        ``(H, L, d)`` its values.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(1, L)`` relation attention of the global query (head mean, ``q``'s dtype) and ``(1, L)`` scores.
    """
    gq = q.mean(1, keepdim=True)  # (H, 1, d)
    w = torch.bmm(gq, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    attn = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype).mean(0)
    return attn, attn * torch.norm(v.mean(0), p=1, dim=-1)


def qwen_prune_count(attn: torch.Tensor, rpl: int, target: int) -> int:
    """Official ``adaptive_prune_ratio``: patches to cut at a block ``rpl`` blocks before the last, ``(1, L)`` attention.

    Clamped at 0: near-uniform attention can put the entropy ratio above 1, where the official negative count would
    ask ``topk`` for more patches than exist and stop with an error (named port difference).
    """
    n = attn.shape[-1]
    entropy = -torch.sum(attn * torch.log(attn + 1e-7), dim=-1)
    ratio = entropy / torch.log(torch.tensor(n))
    r = (n - target) / rpl**0.5 * (1 - ratio**2)
    return max(int(r.round()), 0)


def qwen_tower_step(i: int, n_blocks: int, attn: torch.Tensor, score: torch.Tensor, target: int, state: dict) -> torch.Tensor | None:
    """After tower block ``i`` of ``n_blocks``: the sorted indices of the patches kept (into the current ones), or ``None``.

    ``attn``/``score`` ``(1, L)`` from :func:`qwen_tower_scores`; ``target`` patches are the tower's floor; ``state``
    carries the accumulated scores (``"cum"``) between blocks of one image.
    """
    n = attn.shape[-1]
    if n <= target:
        return None
    cum = state.get("cum")
    cum = score[0] if cum is None else 0.5 * cum + 0.5 * score[0]
    state["cum"] = cum
    rpl = n_blocks - i - 1
    if rpl % 2:
        return None
    cut = qwen_prune_count(attn, rpl, target) if rpl else n
    keep = torch.topk(cum, max(n - cut, target), dim=0).indices.sort(dim=0).values
    state["cum"] = cum[keep]
    return keep


def qwen_llm_scores(q_last: torch.Tensor, k_vis: torch.Tensor, v_last: torch.Tensor, v_vis: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """The LLM stage's scores (official attention forward of layer 1 + ``compute_score_llm``), batched; ``normalise``:
    the LLaVA-NeXT code's ``compute_score`` (relation and semantic rows each divided by their sum first).

    Parameters
    ----------
    q_last : torch.Tensor
        ``(B, H, 1, d)`` the last prompt token's rotated query.
    k_vis : torch.Tensor
        ``(B, H, n, d)`` the image tokens' rotated keys (key heads repeated to the query heads).
    v_last, v_vis : torch.Tensor
        ``(B, H, 1, d)`` and ``(B, H, n, d)`` values (repeated likewise).

    Returns
    -------
    torch.Tensor
        ``(B, n)`` scores; the stage keeps their ``topk``, sorted.
    """
    d = q_last.shape[-1]
    rel = torch.softmax(q_last @ k_vis.transpose(-1, -2) / math.sqrt(d), dim=-1, dtype=torch.float32).to(q_last.dtype).mean(1)
    sem = torch.softmax(v_last @ v_vis.transpose(-1, -2) / math.sqrt(d), dim=-1, dtype=torch.float32).to(q_last.dtype).mean(1)
    if normalise:
        rel, sem = rel / rel.sum(dim=-1, keepdim=True), sem / sem.sum(dim=-1, keepdim=True)
    return ((rel + sem) * torch.norm(v_vis.mean(1), p=1, dim=-1).unsqueeze(1))[:, 0]


class FlowCutPorts:
    """The port plumbing of :class:`methods.flowcut.FlowCut` (mixed in before :class:`~methods.inllm.InLLMMethod`):
    which rule runs (``port``), its stage, budget and schedule, the LLM stage and the ports' selection FLOPs."""

    # ------------------------------------------------------------------ which rule
    @property
    def qwen(self) -> bool:
        """Whether the Qwen port's rule runs (``port: qwen25vl``)."""
        return self.port == "qwen25vl"

    @property
    def next_port(self) -> bool:
        """Whether the LLaVA-NeXT port's rule runs (``port: llava_next``, bound by the adapter: :meth:`bind_next`)."""
        return self.port == "llava_next"

    @property
    def stage(self) -> str:  # type: ignore[override]
        return "in_llm" if self.qwen or self.next_port else "in_vision"

    @property
    def pre_llm_selection(self) -> bool:  # type: ignore[override]
        """The ports' LLM stage follows the tower's cut (its counts depend on the image)."""
        return self.qwen or self.next_port

    @property
    def deviations(self) -> tuple[str, ...]:  # type: ignore[override]
        return NEXT_DEVIATIONS if self.next_port else ()

    def bind_next(self, ref_tokens: int) -> None:
        """The LLaVA-NeXT adapter resolves ``auto`` to this port (in place, so that the record and FLOPs read the rule
        that ran) with its reference count ``N_ref``: ``target_num = round(N_ref (1 - ratio))``."""
        self.port = "llava_next"
        self.next_ref_tokens = int(ref_tokens)

    def next_target(self) -> int:
        """LLaVA-NeXT port: ``target_num``, the image tokens entering layers ``NEXT_PRUNE_LAYER + 1`` on."""
        ref = getattr(self, "next_ref_tokens", None)
        if ref is None:
            raise IncompatibleMethodError("flowcut: port=llava_next runs through the LLaVA-NeXT adapter (its reference count)")
        return self.target(ref)

    def next_tile_keep(self) -> int:
        """LLaVA-NeXT port: patches every 336 px tile keeps in CLIP, official ``int(target_num / 2)``."""
        return self.next_target() // 2

    # ------------------------------------------------------------------ budget (the CLIP rule: the pre-LLM convention)
    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        return InLLMMethod.budget_mode.fget(self) if self.qwen or self.next_port else PruningMethod.budget_mode.fget(self)

    def budget_fields(self, n_vis: int, n_layers: int, kept: float | None, per_layer: list[float] | None) -> dict[str, Any]:
        if self.next_port:  # target_num entering layer NEXT_PRUNE_LAYER + 1 (the official count), whatever the image's size
            t = self.next_target() if self.prune_ratio > 0 else n_vis
            layer = NEXT_PRUNE_LAYER + 1
            got = None if not per_layer or len(per_layer) <= layer else round(float(per_layer[layer]), 3)
            return {"budget_mode": self.budget, "budget_tokens": t, "budget_measure": "after_prune", "budget_measured": got,
                    "budget_met": None if got is None else abs(got - t) <= 1.0}
        if self.qwen:
            return InLLMMethod.budget_fields(self, n_vis, n_layers, kept, per_layer)
        return PruningMethod.budget_fields(self, n_vis, n_layers, kept, per_layer)

    def check_budget(self, n_vis: int, n_layers: int) -> None:
        if self.qwen:
            InLLMMethod.check_budget(self, n_vis, n_layers)

    def check_compatible(self, ctx: VisionContext) -> None:
        if self.next_port:
            if self.budget not in ("official", "after_prune"):
                raise IncompatibleMethodError(f"flowcut: budget={self.budget} applies to the Qwen2.5-VL port only; the LLaVA-NeXT port keeps "
                                              "its official target_num from LLM layer 2 on")
            return PruningMethod.check_compatible(self, ctx)
        if not self.qwen:
            if self.budget != "official":
                raise IncompatibleMethodError(f"flowcut: budget={self.budget} applies to the Qwen2.5-VL port only; the CLIP rule keeps round(N (1 - ratio)) patches")
            return PruningMethod.check_compatible(self, ctx)
        if ctx.has_cls:
            raise IncompatibleMethodError(f"method {self.name!r} with port=qwen25vl runs on Qwen2.5-VL's tower only")

    # ------------------------------------------------------------------ schedule
    def qwen_target(self, n: int, n_layers: int) -> int:
        """``target_num`` for an image of ``n`` merged tokens in an ``n_layers``-deep LLM (module docstring)."""
        b = self.target(n)
        if self.budget != "layer_mean":
            return b
        # layers 0..qwen_llm_layer see min(n, tower tokens), the rest target_num: the closest mean to b
        head = min(int(self.qwen_llm_layer) + 1, n_layers)
        def mean(t: int) -> float:
            return (head * min(n, int(self.qwen_tower_tokens) * t) + (n_layers - head) * min(t, n)) / n_layers
        return min(range(1, n + 1), key=lambda t: (abs(mean(t) - b), t))

    def layers_for(self, n_layers: int) -> list[int]:
        if self.next_port:
            return [NEXT_PRUNE_LAYER + 1]
        return [int(self.qwen_llm_layer) + 1] if self.qwen else []

    def qwen_tower_target(self, n: int, n_layers: int, merge_area: int) -> int:
        """Patches the tower keeps at most: ``qwen_tower_tokens * target_num`` merged tokens of ``merge_area`` patches."""
        return int(self.qwen_tower_tokens) * self.qwen_target(n, n_layers) * merge_area

    def tower_step(self, i: int, n_blocks: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, target: int, state: dict) -> torch.Tensor | None:
        """After tower block ``i``: the kept patches' sorted indices into the current ones (``None``: all kept).
        ``q``/``k``/``v`` ``(H, L, d)`` the block's rotated queries and keys and its values, one image."""
        attn, score = qwen_tower_scores(q, k, v)
        return qwen_tower_step(i, n_blocks, attn, score, target, state)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        """The LLM stage when the tower gave ``n_vis`` (no tower cut)."""
        return self.plan_for(n_vis, n_vis, n_layers)

    def plan_for(self, n_grid: int, n_in: int, n_layers: int) -> list[Stage]:
        """``target_num`` from layer ``l + 1`` on (``l``: the scoring layer) when the ``n_in`` tokens entering the LLM
        outnumber it (official ``visual_token_num > target_num``); the Qwen port's ``target_num`` is of the image's
        ``n_grid`` merged tokens and keeps positions, the LLaVA-NeXT port's is the bound one and renumbers."""
        if self.prune_ratio == 0.0 or not (self.qwen or self.next_port):
            return []
        t = self.next_target() if self.next_port else self.qwen_target(n_grid, n_layers)
        layer = self.layers_for(n_layers)[0]
        if n_in <= t or layer >= n_layers:
            return []
        return [Stage(layer, t, self.next_port)]

    def planned_counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Qwen port: tokens entering each layer: the tower's ``min(N, qwen_tower_tokens * target_num)``, then the stage."""
        if self.prune_ratio == 0.0:
            return [n_vis] * n_layers
        n_in = min(n_vis, int(self.qwen_tower_tokens) * self.qwen_target(n_vis, n_layers))
        return per_layer_counts([(s.layer, s.n_keep) for s in self.plan_for(n_vis, n_in, n_layers)], n_in, n_layers)

    def reduce(self, vis, ctx):
        if self.qwen or self.next_port:  # the ports cut inside the tower (the adapter's encode_flowcut / flowcut_image)
            raise IncompatibleMethodError(f"flowcut: the {self.port} port selects inside the vision tower, through the adapter")
        return super().reduce(vis, ctx)

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        """The ports' LLM stage: the scoring layer's last-token query and value rows over the image (module docstring)."""
        layer = stage.layer - 1
        q = view.query_rows(layer, "last")  # (B, H, 1, d) rotated
        k = view.visual(view.keys(layer, heads_first=False))  # (B, n, H_kv, d) rotated
        v_all = view.values(layer)  # (B, T, H_kv, d)
        v = view.visual(v_all)
        rep = q.shape[1] // k.shape[2]
        k, v = (x.transpose(1, 2).repeat_interleave(rep, dim=1) for x in (k, v))
        v_last = v_all[:, -1:].transpose(1, 2).repeat_interleave(rep, dim=1)
        score = qwen_llm_scores(q, k, v_last, v, normalise=self.next_port)
        return StageOut(score.topk(stage.n_keep, dim=1).indices.sort(dim=1).values)

    # ------------------------------------------------------------------ selection FLOPs of the ports
    def _llm_stage_flops(self, cost, t: int) -> int:
        """The LLM stage: the last token's query row over the image keys and its value row over the image values,
        ``2 * 2 n H d_head`` for ``n > t`` tokens (``H d_head`` = the LLM width on Llama / Qwen2)."""
        return sum(2 * 2 * kept * cost.llm_width for kept in cost.kept if kept > t)

    def _qwen_selection_flops(self, cost) -> int:
        """Every block of a tower that cuts (``L`` patches entering it, ``cost.shapes.vision_tokens``): the global
        query's row over the ``L`` keys, ``2 L d`` (the official attention forward computes it in every block); then
        the LLM stage. Means, norms and softmaxes are elementwise (uncounted)."""
        if self.prune_ratio == 0.0:
            return 0
        rows = cost.shapes.vision_tokens or ()
        total = sum(2 * t * cost.vision_width for row in rows for t in row)
        n_layers = cost.config.text_config.num_hidden_layers
        return total + sum(2 * 2 * kept * cost.llm_width for kept in cost.kept if self.plan_for(cost.n_visual, kept, n_layers))

    def _next_selection_flops(self, cost) -> int:
        """LLaVA-NeXT port: the CLIP rule's rows in every tile's blocks (``cost.shapes.vision_tokens``: per sample
        the patches entering each block, tile after tile; the CLS row in every block run), then the LLM stage."""
        if self.prune_ratio == 0.0:
            return 0
        return self._clip_rows_flops(cost, self.next_tile_keep(), every_cls_row=True) + self._llm_stage_flops(cost, self.next_target())
