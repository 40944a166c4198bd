"""Qwen2.5-VL through transformers' native ``Qwen2_5_VLForConditionalGeneration``.

Images are processed at dynamic resolution (the processor resizes each image to multiples of 28 px with
``min_pixels <= H * W <= max_pixels``, Hydra fields ``model.min_pixels`` / ``model.max_pixels``), encoded
by the windowed-attention ViT and merged 2x2 by the patch merger; ``image_grid_thw`` gives each image's
``(T, H, W)`` patch grid, so an image reaches the LLM as ``H/2 x W/2`` merged tokens in raster order.
Pruning acts on those merged tokens (``VisionContext.grid`` is the merged grid).

M-RoPE: the LLM's positions are 3-D (temporal, height, width) for image tokens and equal 1-D counters for
text. The adapter computes the unpruned positions with the model's own ``get_rope_index``, drops the
rows of the pruned tokens and passes the kept ones as ``position_ids`` ``(3, B, T')``: kept image tokens
keep their original 3-D positions and the text after the image keeps its original positions. Decoding
continues from the last prompt position + 1 in every dimension (``generate`` extends the given position
ids that way), which is the unpruned model's ``rope_deltas`` rule: the next position is
``max(position) + 1`` whatever was removed.

The tower has no [CLS] token: methods whose definition needs one (CLS attention) are refused, as are
methods needing CLIP-tower quantities, except where the method's official Qwen2.5-VL port defines a
substitute that this adapter serves (:data:`QWEN_PORTS`).

In-LLM pruning runs through ``bench.models.llm_pruning`` (hooks on the ``Qwen2_5_VLTextModel`` decoder layers)
for stages that keep original positions: the runner gathers each kept token's own ``(3,)`` M-RoPE ids and its
rows of the rotary tables (transformers 5.x recomposes the three sections into ``(B, T, d)`` tables in the
text model, before the layers), the KV cache of pruned layers holds the kept tokens only, and decoding
continues at the unpruned prompt's ``max + 1`` in every dimension, the same ``rope_deltas`` the unpruned
model uses (pruning inside the LLM changes no position). Stages that *renumber* positions (PDrop's and
TransPrune's official default, SparseVLM 1.5) are refused: a contiguous renumbering of an image's
``(t, h, w)`` grid positions after dropping some of them is not defined (which dimension shifts, and by
how much?), and no official Qwen2.5-VL port of those methods defines one. Stages that merge tokens in the
LLM (SparseVLM's recycling) are refused too (a merged token has no original 3-D position). The runner plans
one schedule per visual-token count, so :meth:`generate` runs the samples of a batch in groups of equal
count (mixed image sizes), each group one ``generate`` call.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from bench.errors import ConfigError, IncompatibleMethodError
from bench.models.base import FlopsDescription, ImageBlock, PreparedBatch
from bench.models.llava import LlavaAdapter
from methods.base import PruningMethod, VisionContext

#: Methods whose official Qwen2.5-VL port replaces a [CLS] quantity by one of the windowed tower; the adapter
#: serves it under ``needs`` (``VisionContext.extras`` keys).
#:
#: * ``holov`` (``obananas/HoloV``, ``qwen-model-HoloV/modeling_qwen2_5_vl.py``: the vision tower's ``forward``
#:   returns ``attention_scores`` beside the merged features): ``merged_attn_received:{window,raster}``, ``(1, N)``
#:   per merged token, see :meth:`Qwen25VLAdapter.received_attention`.
#: * ``vscan`` (``Tencent/SelfEvolvingAgent``, ``VScan/qwen/model/qwen2_5_vl_custom.py``: the tower's ``forward``
#:   returns the received attention of its first full-attention block and of its last block, in raster order):
#:   ``merged_attn_received@first_full:raster`` and ``merged_attn_received:raster``; its ``port: auto`` is resolved to
#:   ``qwen25vl`` here (:meth:`Qwen25VLAdapter.resolve_port`).
#: * ``flowcut`` (``TungChintao/FlowCut``, ``FlowCut_Qwen/modeling_qwen2_vl_flowcut.py``: the tower's ``forward`` cuts
#:   patches between its blocks): no extra quantity; the adapter runs the tower itself (:meth:`Qwen25VLAdapter.encode_flowcut`)
#:   and hands each block's rotated q/k and values to the method; its ``port: auto`` is resolved to ``qwen25vl`` here.
#: * ``visionzip`` (no official port could be read, see :mod:`methods.visionzip_ports`: it follows ModelTC/LightCompress):
#:   ``merged_attn_received_sum:raster`` (the received attention summed, not averaged, over query patches) and
#:   ``merged_keys:raster``, ``(1, N, d_head)``: the last block's rotated keys averaged over heads and each 2x2 group.
QWEN_PORTS: dict[str, dict[str, Any]] = {
    "holov": {"needs": ("merged_attn_received:window", "merged_attn_received:raster")},
    "visionzip": {"needs": ("merged_attn_received_sum:raster", "merged_keys:raster"), "reads_all": True},
    "vscan": {"needs": ("merged_attn_received@first_full:raster", "merged_attn_received:raster")},
    "flowcut": {"needs": (), "tower": True},
}


def received_attention(attn_module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings):
    """The attention each patch receives in one vision block, as HoloV's official Qwen2.5-VL port computes it.

    ``hidden`` ``(L, D)`` is the block's normed input (window order), ``cu_seqlens`` its attention segments
    (the whole image for a full-attention block, windows otherwise). The official port materialises the
    ``(H, L, L)`` softmax with the segments as a mask and averages over heads; here one segment at a time (no
    ``L x L`` over the whole image), the same sums. Returns the float32 column sums over *all* ``L`` query rows
    (zero outside a query's segment), ``(L,)`` in window order, which HoloV and VScan divide by ``L`` and
    VisionZip's port keeps as sums (each then in the model's dtype), and the block's rotated keys ``(H, L, d)``.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    n = hidden.shape[0]
    q, k, _ = attn_module.qkv(hidden).reshape(n, 3, attn_module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, L, d)
    col = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        p = torch.softmax((q[:, s:e] @ k[:, s:e].transpose(-1, -2)) * attn_module.scaling, dim=-1)  # (H, l, l)
        col[s:e] = p.mean(dim=0).float().sum(dim=0)
    return col, k


class Qwen25VLAdapter(LlavaAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (``Qwen/Qwen2.5-VL-{3B,7B}-Instruct``).

    Loading, fingerprints and ``weights=random`` follow :class:`bench.models.llava.LlavaAdapter`.

    Parameters
    ----------
    min_pixels, max_pixels : int
        The processor's dynamic-resolution bounds (pixels of the resized image).
    """

    family = "qwen25vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    config_class_name = "Qwen2_5_VLConfig"
    supported_stages = frozenset({"none", "pre_llm", "in_llm"})
    selection_graphs = False
    #: the synthetic probe image's (height, width) in pixels (a multiple of 28); ``probe_batch(size=...)`` overrides
    PROBE_IMAGE = (448, 448)

    def __init__(self, *args: Any, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < int(min_pixels) <= int(max_pixels):
            raise ConfigError(f"model.min_pixels and model.max_pixels must satisfy 0 < min <= max, got {min_pixels}, {max_pixels}")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)

    def load(self) -> "Qwen25VLAdapter":
        super().load()
        if self.processor is not None:
            ip = self.processor.image_processor
            ip.min_pixels, ip.max_pixels = self.min_pixels, self.max_pixels
            ip.size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return self

    # --------------------------------------------------------------- geometry
    @property
    def merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    @property
    def grid(self) -> tuple[int, int]:
        """Merged grid of the :attr:`PROBE_IMAGE` (an image's own grid comes from its ``image_grid_thw``)."""
        f = self.config.vision_config.patch_size * self.merge
        return (self.PROBE_IMAGE[0] // f, self.PROBE_IMAGE[1] // f)

    @property
    def has_cls(self) -> bool:
        return False

    @property
    def num_llm_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def check_method(self, method: PruningMethod) -> None:
        if method.name in QWEN_PORTS:  # a port may change the method's stage (FlowCut: in the tower -> tower + LLM)
            self.resolve_port(method)
        if method.stage == "in_vision":
            raise IncompatibleMethodError(
                f"method {method.name!r} prunes or merges inside the vision tower (stage 'in_vision'); the in-tower path "
                "(bench.models.vision_merge, vision_prune) is written for CLIP layers, not Qwen2.5-VL's windowed tower "
                "and its 2x2 patch merger"
            )
        if method.stage not in self.supported_stages:
            raise IncompatibleMethodError(
                f"method {method.name!r} prunes at stage {method.stage!r}; on Qwen2.5-VL pre-LLM and in-LLM pruning are implemented"
            )
        port = QWEN_PORTS.get(method.name)
        if port is not None:
            self.resolve_port(method)
            method.check_compatible(VisionContext(self.grid, False, torch.zeros(1, dtype=torch.long), {k: None for k in port["needs"]}))
            if method.stage == "in_llm":
                self.check_in_llm(method)
            return
        if method.stage == "in_llm":
            self.check_in_llm(method)
        if method.requires_cls:
            raise IncompatibleMethodError(f"method {method.name!r} is defined by [CLS] attention; Qwen2.5-VL's vision tower has no [CLS] token")
        if method.merges and method.stage == "pre_llm":
            raise IncompatibleMethodError(
                f"method {method.name!r} merges tokens; on Qwen2.5-VL a merged token has no original M-RoPE position (kept tokens keep theirs)"
            )
        if method.needs:
            raise IncompatibleMethodError(
                f"method {method.name!r} needs CLIP vision-tower quantities ({', '.join(sorted(method.needs))}) that Qwen2.5-VL's tower does not provide"
            )
        method.check_compatible(VisionContext(self.grid, False, torch.zeros(1, dtype=torch.long)))

    @staticmethod
    def resolve_port(method: PruningMethod) -> PruningMethod:
        """A method whose official code has a Qwen2.5-VL port chosen by a ``port`` field (VScan): ``auto`` becomes
        ``qwen25vl`` (in place, so that the run's record, budget and FLOPs all read the rule that ran); an explicit
        other port is refused."""
        port = getattr(method, "port", None)
        if port == "auto":
            method.port = "qwen25vl"
        elif port is not None and port != "qwen25vl":
            raise IncompatibleMethodError(f"method {method.name!r} with port={port!r} follows its LLaVA code ([CLS] attention); on Qwen2.5-VL use port=qwen25vl or auto")
        return method

    def check_in_llm(self, method: PruningMethod) -> None:
        """In-LLM stages on M-RoPE: only those that keep original positions and select (no merged tokens)."""
        if getattr(method, "pre_llm_selection", False) and method.name not in QWEN_PORTS:
            raise IncompatibleMethodError(f"method {method.name!r} selects before the LLM by [CLS] attention; Qwen2.5-VL's tower has no [CLS] token")
        n = self.grid[0] * self.grid[1]
        method.check_budget(n, self.num_llm_layers)
        plan = list(method.plan(n, self.num_llm_layers)) if method.prune_ratio > 0 else []
        if any(st.renumber for st in plan):
            raise IncompatibleMethodError(
                f"method {method.name!r} renumbers positions in the LLM; Qwen2.5-VL's 3-D M-RoPE positions of an image have "
                "no defined contiguous renumbering once tokens are dropped (kept tokens keep their (t, h, w) ids here): "
                "run it with renumber_positions=false (a named deviation from its official default) or on another family"
            )
        if any(st.n_selected != st.n_keep for st in plan):
            raise IncompatibleMethodError(
                f"method {method.name!r} merges tokens inside the LLM; on Qwen2.5-VL a merged token has no original M-RoPE position"
            )

    def image_grids(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """Merged ``(H, W)`` grid per sample (one image per sample)."""
        thw = batch["image_grid_thw"]
        if thw.shape[0] != batch["input_ids"].shape[0]:
            raise ValueError(f"{thw.shape[0]} images for {batch['input_ids'].shape[0]} prompts; one image per sample is supported")
        if (thw[:, 0] != 1).any():
            raise ValueError("image_grid_thw with T > 1 (video) is not supported")
        return [(int(h) // self.merge, int(w) // self.merge) for _, h, w in thw.tolist()]

    def visual_layout(self, batch: dict[str, torch.Tensor]) -> list[list[ImageBlock]]:
        out = []
        for (ids, mask), grid in zip(zip(batch["input_ids"], batch["attention_mask"]), self.image_grids(batch)):
            seq = ids[mask.bool()]
            pos = (seq == self.image_token_id).nonzero().flatten()
            out.append([ImageBlock(int(pos[0]) if len(pos) else -1, len(pos), [grid])])
        return out

    # --------------------------------------------------------------- forward
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, needs=()):
        """Flattened patches ``(sum_i T*H*W, C*t*p*p)`` + ``(B, 3)`` grids -> per image ``(H/2 * W/2, D_llm)`` merged
        tokens in raster order; one image at a time (batch-neighbour independent).

        With ``needs`` (keys of :data:`QWEN_PORTS`) returns ``(features, extras)``: per image a dict of the asked
        quantities, each ``(1, N)``, from the same tower pass (:meth:`received_attention`)."""
        sizes = image_grid_thw.prod(-1).tolist()
        out, extras = [], []
        for px, thw in zip(pixel_values.split(sizes), image_grid_thw):
            thw = thw.view(1, 3).to(self.device)
            if not needs:
                out.append(self.model.model.get_image_features(px.to(self.device, self.dtype), thw, return_dict=True).pooler_output[0])
                continue
            f, e = self._encode_with_received_attention(px, thw, needs)
            out.append(f)
            extras.append(e)
        return (out, extras) if needs else out

    def _encode_with_received_attention(self, px: torch.Tensor, thw: torch.Tensor, needs):
        """One image's merged features and ``merged_attn_received:*`` (HoloV's official Qwen2.5-VL substitute for CLS
        attention): the attention each patch receives in the tower's last block (:func:`received_attention`),
        averaged over the 2x2 patches of each merged token. ``window``: in the tower's window order, which the
        official port pairs with raster-ordered tokens; ``raster``: the merged token's own score."""
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        # key "merged_attn_received[@first_full]:<order>": the last block, or the first full-attention one (VScan's local scan)
        blocks = {k: (visual.fullatt_block_indexes[0] if k.partition(":")[0].endswith("@first_full") else len(visual.blocks) - 1)
                  for k in needs}
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def grab(block, module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[block] = received_attention(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])

        handles = [visual.blocks[i].attn.register_forward_pre_hook(partial(grab, i), with_kwargs=True) for i in set(blocks.values())]
        try:
            feats = self.model.model.get_image_features(px.to(self.device, self.dtype), thw, return_dict=True).pooler_output[0]
        finally:
            for h in handles:
                h.remove()
        unit = visual.spatial_merge_unit
        index, _ = get_vision_window_index(thw.cpu(), spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size)
        back = torch.argsort(index.to(feats.device))
        out = {}
        for k, block in blocks.items():
            col, keys = seen[block]
            if k.startswith("merged_keys"):  # (H, L, d) -> per merged token, head mean (LightCompress's order of means)
                out[k] = keys.reshape(keys.shape[0], -1, unit, keys.shape[-1]).mean(dim=2)[:, back].mean(dim=0).unsqueeze(0)
                continue
            score = (col if k.startswith("merged_attn_received_sum") else col / col.shape[0]).to(keys.dtype)  # the block's dtype
            window = score.view(-1, unit).mean(dim=1)  # (N,) window order, official: view(N, 4).mean(1)
            out[k] = (window if k.endswith(":window") else window[back]).unsqueeze(0)
        return feats, out

    def rope_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unpruned model's ``(3, B, T)`` M-RoPE positions (``get_rope_index``; 0 on padding)."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        types = batch.get("mm_token_type_ids")
        types = (ids == self.image_token_id).int() if types is None else types.to(self.device)
        pos, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=batch["image_grid_thw"].to(self.device), attention_mask=mask)
        return pos

    @torch.no_grad()
    def prepare(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor) -> PreparedBatch:
        """Apply a pre-LLM ``method`` to each image's merged tokens; kept tokens keep their 3-D positions.

        ``batch``: ``input_ids``/``attention_mask`` ``(B, T)`` left padded with ``H/2 * W/2`` image tokens per
        sample, ``pixel_values`` (flattened patches) and ``image_grid_thw`` ``(B, 3)``. ``position_ids`` of the
        result's ``extras`` are ``(3, B, T')``.
        """
        if method.stage not in self.supported_stages:
            self.check_method(method)
        if method.name in QWEN_PORTS:
            self.resolve_port(method)
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        grids = self.image_grids(batch)
        needs = self.port_needs(method)
        tower = self.tower_port(method)
        tower_counts = None
        if tower:
            feats, tower_counts, tower_segments = self.encode_flowcut(batch["pixel_values"], batch["image_grid_thw"].cpu(), method)
            extras_per_image = [{}] * len(feats)
        else:
            feats = self.encode_images(batch["pixel_values"], batch["image_grid_thw"].cpu(), needs)
            feats, extras_per_image = feats if needs else (feats, [{}] * len(feats))
        pos_full = self.rope_positions(batch).cpu()
        img = self.image_token_id
        rows, row_pos, kept_feats, n_in = [], [], [], []
        for i, (f, grid) in enumerate(zip(feats, grids)):
            n = grid[0] * grid[1]
            valid = mask[i].bool()
            seq, pos = ids[i][valid], pos_full[:, i][:, valid]
            at = (seq == img).nonzero().flatten()
            if len(at) != n or at[-1] - at[0] + 1 != n or (f.shape[0] != n and not tower):
                raise ValueError(f"sample {i}: expected one image of {n} contiguous image tokens, found {len(at)} (features {f.shape[0]})")
            if tower:
                # FlowCut's tower cut: the merged tokens take the image block's first positions (official
                # ``position_ids[:, :, first:first + image_embeds.shape[0]]``); uncut, every token its own
                keep_idx, k_feats = torch.arange(f.shape[0]), f
            elif method.prune_ratio == 0.0 or method.stage == "none" or (method.stage == "in_llm" and not getattr(method, "pre_llm_selection", False)):
                # in-LLM methods send every token to the LLM (VScan's scan selects before it)
                keep_idx, k_feats = torch.arange(n), f
            else:
                sel = method.reduce(f.unsqueeze(0), self.image_context(grid, sample_seeds[i].view(1), extras_per_image[i]))
                k = int(sel.n_kept[0])
                source = sel.kept_index if sel.kept_index is not None else sel.extras.get("source_index")
                if source is None:
                    raise IncompatibleMethodError(
                        f"method {method.name!r} merges tokens; on Qwen2.5-VL a merged token has no original M-RoPE position"
                    )
                # a row of source -1 (HoloV's all-zero padding rows) takes the id and 3-D position of the block's last
                # token, as the official port's ``kept_pos[:, :, final_position]`` indexes with -1
                keep_idx, k_feats = source[0, :k].cpu() % n, sel.features[0, :k]
            s0 = int(at[0])
            keep_rows = torch.cat([torch.arange(s0), s0 + keep_idx, torch.arange(s0 + n, len(seq))])
            rows.append(seq[keep_rows])
            row_pos.append(pos[:, keep_rows])
            kept_feats.append(k_feats)
            n_in.append(n)
        t = max(len(r) for r in rows)
        b = len(rows)
        new_ids = torch.full((b, t), self.pad_token_id, dtype=ids.dtype)
        new_mask = torch.zeros((b, t), dtype=mask.dtype)
        new_pos = torch.zeros((3, b, t), dtype=pos_full.dtype)
        for i, (r, p) in enumerate(zip(rows, row_pos)):
            new_ids[i, t - len(r):] = r
            new_mask[i, t - len(r):] = 1
            new_pos[:, i, t - len(r):] = p
        new_ids, new_mask = new_ids.to(self.device), new_mask.to(self.device)
        embeds = self.model.get_input_embeddings()(new_ids)
        vis = torch.cat(kept_feats).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(((new_ids == img) & new_mask.bool()).unsqueeze(-1), vis)
        starts = [t - len(r) + int((r == img).nonzero()[0]) for r in rows]
        spans = torch.tensor([[s, s + int(f.shape[0])] for s, f in zip(starts, kept_feats)], dtype=torch.long)
        kept = [int(f.shape[0]) for f in kept_feats]
        extras = {"image_spans": spans, "sample_seeds": sample_seeds, "position_ids": new_pos.to(self.device), "grids": grids}
        if tower_counts is not None:
            extras["vision_tokens_per_layer"] = tower_counts
            extras["vision_segments"] = tower_segments
        return PreparedBatch(new_ids, embeds, new_mask, n_in, kept, extras=extras)

    @staticmethod
    def tower_port(method: PruningMethod) -> bool:
        """Whether ``method`` is a port that cuts inside the tower (FlowCut) and prunes at this ratio."""
        return bool(QWEN_PORTS.get(method.name, {}).get("tower")) and method.prune_ratio > 0 and method.stage != "none"

    @torch.no_grad()
    def encode_flowcut(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, method: PruningMethod):
        """FlowCut's tower (official ``FlowCut_Qwen``), one image at a time: per image the merged tokens ``(M, D_llm)``,
        the patches entering each block, and each block's attention segment lengths (``None``: the tower did not cut).

        The tower runs as ``Qwen2_5_VisionTransformerPretrainedModel.forward`` (patch embedding, window order, the
        blocks with their own modules, the merger); after each block the method gets the block's rotated q/k and its
        values ``(H, L, d)`` (:meth:`methods.flowcut.FlowCut.tower_step`, from the ``qkv`` output the block computed)
        and returns the patches kept, whose hidden states, rotary rows and window membership go on. A windowed block
        attends within each window's surviving patches (``cu_seqlens`` from the survivors' windows), a full one over
        all of them. After a cut the merger merges runs of 4 surviving patches in window order, and the result is
        not permuted back (official: no permutation to undo); an image the tower does not cut (``4 N <= target``)
        goes through ``get_image_features`` unchanged.
        """
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        visual = self.model.model.visual
        unit, depth = visual.spatial_merge_unit, len(visual.blocks)
        full = set(visual.fullatt_block_indexes)
        sizes = image_grid_thw.prod(-1).tolist()
        feats, counts, segments = [], [], []
        for px, thw in zip(pixel_values.split(sizes), image_grid_thw):
            thw = thw.view(1, 3)
            n_patch = int(thw.prod())
            target = method.qwen_tower_target(n_patch // unit, self.num_llm_layers, unit)
            if n_patch <= target:
                feats.append(self.model.model.get_image_features(px.to(self.device, self.dtype), thw.to(self.device), return_dict=True).pooler_output[0])
                counts.append([n_patch] * depth)
                segments.append(None)
                continue
            index, cu_win = get_vision_window_index(thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                                                    patch_size=visual.patch_size)
            win = torch.repeat_interleave(torch.arange(len(cu_win) - 1), cu_win.diff().long()).to(self.device)
            h = visual.patch_embed(px.to(self.device, self.dtype))
            index = index.to(self.device)
            h = visual.permute_input_for_window_attn(h, index, seq_len=n_patch)
            cos, sin = visual.rotary_pos_emb(h, get_vision_position_ids(thw.to(self.device), visual.spatial_merge_size))
            cos, sin = (visual.permute_input_for_window_attn(x, index, seq_len=n_patch) for x in (cos, sin))
            state: dict = {}
            seen: list[int] = []
            segs: list[list[int]] = []  # per block, the attention segments' lengths (the FLOPs model's input)
            grabbed: dict = {}
            for i, blk in enumerate(visual.blocks):
                cur = h.shape[0]
                seen.append(cur)
                if i in full:
                    cu = torch.tensor([0, cur], dtype=torch.int32, device=self.device)
                else:
                    _, per_window = torch.unique_consecutive(win, return_counts=True)  # survivors per (non-empty) window
                    cu = torch.nn.functional.pad(per_window.cumsum(0), (1, 0)).to(torch.int32)
                segs.append(cu.diff().tolist())
                hook = blk.attn.qkv.register_forward_hook(lambda mod, inp, out: grabbed.__setitem__("qkv", out))
                try:
                    h = blk(h, cu_seqlens=cu, position_embeddings=(cos, sin))
                finally:
                    hook.remove()
                q, k, v = grabbed.pop("qkv").reshape(cur, 3, blk.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                keep = method.tower_step(i, depth, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), target, state)
                if keep is not None:
                    h, cos, sin, win = h[keep], cos[keep], sin[keep], win[keep]
            feats.append(visual.merger(h))
            counts.append(seen)
            segments.append(segs)
        return feats, counts, segments

    def port_needs(self, method: PruningMethod) -> tuple[str, ...]:
        """The :data:`QWEN_PORTS` quantities ``method`` reads (none at ratio 0 or for other methods)."""
        if method.prune_ratio == 0.0 or method.stage == "none" or method.name not in QWEN_PORTS:
            return ()
        served = QWEN_PORTS[method.name]["needs"]
        if method.name == "holov":  # its needs name the CLIP quantity; the port reads the order it is configured for
            return tuple(k for k in served if k.endswith(":" + method.qwen_order))
        if QWEN_PORTS[method.name].get("reads_all"):
            return served
        return tuple(k for k in served if k in method.needs)

    @staticmethod
    def image_context(grid: tuple[int, int], seeds: torch.Tensor, extras: dict[str, torch.Tensor]) -> VisionContext:
        """One image's :class:`VisionContext`: its merged grid and the port quantities computed with its features."""
        return VisionContext(grid=grid, has_cls=False, sample_seeds=seeds, extras={k: (lambda v=v: v) for k, v in extras.items()})

    def generate(self, prepared: PreparedBatch, max_new_tokens: int = 16, method: PruningMethod | None = None, **gen_kwargs) -> torch.Tensor:
        """Greedy generation; prompt positions are the kept M-RoPE ones, decoding continues from their last + 1.

        An ``in_llm`` method runs inside :meth:`llm_pruning`, one ``generate`` per group of samples with the same
        visual-token count (the runner plans one schedule per count); rows come back in batch order, right-padded
        with the pad id to the longest group output."""
        if method is not None and method.stage == "in_llm" and method.prune_ratio > 0:
            outs = []
            for idx, sub in self.count_groups(prepared):
                with self.llm_pruning(method, sub):
                    outs.append((idx, self.generate(sub, max_new_tokens=max_new_tokens, **gen_kwargs)))
                self.merge_group_extras(prepared, sub, idx)
            width = max(o.shape[1] for _, o in outs)
            res = torch.full((prepared.input_ids.shape[0], width), self.pad_token_id, dtype=outs[0][1].dtype, device=outs[0][1].device)
            for idx, o in outs:
                res[idx.to(res.device), : o.shape[1]] = o
            return res
        tok = self.processor.tokenizer if self.processor is not None else None
        out = self.model.generate(
            input_ids=prepared.input_ids,
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            position_ids=prepared.extras["position_ids"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=tok.eos_token_id if tok is not None else self.config.text_config.eos_token_id,
            **gen_kwargs,
        )
        return out[:, prepared.input_ids.shape[1]:]

    @torch.no_grad()
    def prefill(self, prepared: PreparedBatch, method: PruningMethod | None = None):
        """One LLM prefill with the KV cache on, at the kept M-RoPE positions (those ``generate`` uses); an ``in_llm``
        method needs one visual-token count in the batch (one schedule: a single prefill to time)."""
        if method is not None and method.stage == "in_llm" and method.prune_ratio > 0:
            with self.llm_pruning(method, prepared):
                return self.prefill(prepared)
        return self.model(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            position_ids=prepared.extras["position_ids"],
            use_cache=True,
            logits_to_keep=1,
        )

    def count_groups(self, prepared: PreparedBatch):
        """``(indices, sub-batch)`` per visual-token count of ``prepared``, in order of first appearance; one group
        (``prepared`` itself) when every sample has the same count."""
        spans = prepared.extras["image_spans"]
        width = (spans[:, 1] - spans[:, 0]).tolist()
        if len(set(width)) == 1:
            return [(torch.arange(len(width)), prepared)]
        out = []
        for w in dict.fromkeys(width):
            idx = torch.tensor([i for i, x in enumerate(width) if x == w])
            dev = idx.to(prepared.input_ids.device)
            mask = prepared.attention_mask.index_select(0, dev)
            cut = int((mask.sum(0) > 0).nonzero()[0])  # the group's common left padding is dropped
            ex = dict(prepared.extras)
            ex["image_spans"] = spans[idx] - cut
            ex["position_ids"] = prepared.extras["position_ids"][:, dev, cut:]
            if ex.get("sample_seeds") is not None:
                ex["sample_seeds"] = ex["sample_seeds"][idx]
            ex["grids"] = [prepared.extras["grids"][i] for i in idx.tolist()]
            for k in ("vision_tokens_per_layer", "vision_segments"):  # per sample (a tower port's cut)
                if ex.get(k) is not None:
                    ex[k] = [ex[k][i] for i in idx.tolist()]
            for k in ("visual_tokens_per_layer", "llm_stages", "visual_tokens_layer_mean"):
                ex.pop(k, None)
            out.append((idx, PreparedBatch(prepared.input_ids[dev, cut:], prepared.inputs_embeds[dev, cut:], mask[:, cut:],
                                           [prepared.visual_tokens_in[i] for i in idx.tolist()],
                                           [prepared.visual_tokens_kept[i] for i in idx.tolist()], extras=ex)))
        return out

    @staticmethod
    def merge_group_extras(prepared: PreparedBatch, sub: PreparedBatch, idx: torch.Tensor) -> None:
        """Copy a group's per-sample in-LLM records (tokens per layer) back into the whole batch's extras."""
        if sub is prepared:
            return
        vpl = sub.extras.get("visual_tokens_per_layer")
        if vpl is not None:
            whole = prepared.extras.get("visual_tokens_per_layer")
            if whole is None or whole.shape[1] != vpl.shape[1]:
                whole = prepared.extras["visual_tokens_per_layer"] = torch.zeros(len(prepared.visual_tokens_in), vpl.shape[1], dtype=torch.long)
            whole[idx] = vpl
            prepared.extras["visual_tokens_layer_mean"] = float(whole.float().mean())
        prepared.extras.setdefault("llm_stages_groups", []).append({"samples": idx.tolist(), "stages": sub.extras.get("llm_stages", [])})

    def llm_pruning(self, method: PruningMethod, prepared: PreparedBatch):
        """The in-LLM runner (``bench.models.llm_pruning``) on Qwen2's decoder; refused stages: :meth:`check_in_llm`."""
        if method.stage == "in_llm":
            if method.name in QWEN_PORTS:
                self.resolve_port(method)
            self.check_in_llm(method)
        return super().llm_pruning(method, prepared)

    def is_llama_rms_norm(self, norm: torch.nn.Module) -> bool:
        return False

    # --------------------------------------------------------------- synthetic input and costs
    def probe_batch(self, batch_size: int = 1, seed: int = 0, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Synthetic prompt of :attr:`PROBE_TEXT` text ids around one image of ``size`` (default :attr:`PROBE_IMAGE`,
        pixels, multiples of 28) as the processor would give it: flattened patches and ``image_grid_thw``."""
        g = torch.Generator().manual_seed(seed)
        vc, tc = self.config.vision_config, self.config.text_config
        h, w = size or self.PROBE_IMAGE
        p, f = vc.patch_size, vc.patch_size * self.merge
        if h % f or w % f:
            raise ConfigError(f"probe image {h}x{w} is not a multiple of {f} px")
        gh, gw = h // p, w // p
        n = (gh // self.merge) * (gw // self.merge)
        before, after = self.PROBE_TEXT
        text = torch.randint(3, min(tc.vocab_size, self.PROBE_VOCAB), (before + after,), generator=g)
        text[text >= min(self.image_token_id, tc.vocab_size)] = 3
        ids = torch.cat([text[:before], torch.full((n,), self.image_token_id), text[before:]]).unsqueeze(0).repeat(batch_size, 1)
        dim = vc.in_channels * vc.temporal_patch_size * p * p
        pix = torch.randn(gh * gw, dim, generator=g).repeat(batch_size, 1)
        thw = torch.tensor([[1, gh, gw]]).repeat(batch_size, 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix, "image_grid_thw": thw,
                "mm_token_type_ids": (ids == self.image_token_id).int()}

    def flops_description(self) -> FlopsDescription:
        vc, tc = self.config.vision_config, self.config.text_config
        heads = tc.num_attention_heads
        return FlopsDescription(
            family=self.family,
            vision_layers=vc.depth,
            vision_width=vc.hidden_size,
            vision_mlp=vc.intermediate_size,
            vision_tokens_per_tile=(self.PROBE_IMAGE[0] // vc.patch_size) * (self.PROBE_IMAGE[1] // vc.patch_size),
            vision_window=vc.window_size // vc.patch_size,
            vision_full_layers=tuple(vc.fullatt_block_indexes),
            projector="patch_merger_2x2",
            llm_layers=tc.num_hidden_layers,
            llm_width=tc.hidden_size,
            llm_mlp=tc.intermediate_size,
            llm_heads=heads,
            llm_kv_heads=tc.num_key_value_heads,
            llm_head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab=tc.vocab_size,
            vision_patch_dim=vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
            vision_heads=vc.num_heads,
            vision_cls=0,
            vision_mlp_matrices=3,  # SwiGLU: gate, up, down
            vision_merge=self.merge,
            # the patch merger: m*m patches concatenated -> same width -> LLM width
            projector_dims=((vc.hidden_size * self.merge**2, vc.hidden_size * self.merge**2), (vc.hidden_size * self.merge**2, vc.out_hidden_size)),
        )

    def vision_stage(self, batch: dict[str, torch.Tensor]):
        return self.encode_images(batch["pixel_values"], batch["image_grid_thw"].cpu())

    def selection_stage(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor):
        if not (method.stage == "pre_llm" or getattr(method, "pre_llm_selection", False)) or self.tower_port(method):
            return None  # a tower port's selection is interleaved with the tower's blocks: timed with the tower
        if method.name in QWEN_PORTS:
            self.resolve_port(method)
        grids = self.image_grids(batch)
        needs = self.port_needs(method)
        feats = self.encode_images(batch["pixel_values"], batch["image_grid_thw"].cpu(), needs)
        feats, extras = feats if needs else (feats, [{}] * len(feats))
        ctxs = [self.image_context(g, sample_seeds[i].view(1), extras[i]) for i, g in enumerate(grids)]
        return lambda: [method.reduce(f.unsqueeze(0), c) for f, c in zip(feats, ctxs)]
