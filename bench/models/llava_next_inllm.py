"""In-LLM methods (``stage: in_llm``) on LLaVA-NeXT: the mixin :class:`NextInLLM` of ``LlavaNextAdapter``.

* The visual block a method prunes inside the LLM is the image's whole packed span: base tile, unpadded
  anyres grid *and* its ``image_newline`` tokens, which are candidates like any image token. This is
  PyramidDrop's official LLaVA-NeXT code (``Cooperx521/PyramidDrop``, ``llava_arch.py``
  ``prepare_inputs_labels_for_multimodal_pdrop``: ``image_tokens = image_feature.shape[0]`` after the
  newlines are concatenated, and ``modeling_llama_pdrop.py::pdrop_rank_drop`` ranks that whole span,
  per sample, keeping ``int(N_i * ratio)``), and VScan's (below). FastV, SparseVLM, DART and TransPrune
  ship no LLaVA-NeXT variant (their official code is LLaVA-1.5's): their rule is applied to the same span,
  as their papers state it for "the image tokens".
* One budget per image (``model.budget=image``): ``N_i`` is the image's packed count, newlines included, and
  each method's schedule is planned for it (``B_i = round(N_i (1 - ratio))``; SparseVLM's published
  counts scale by ``N_i / 576``). The other budget conventions are refused for these methods.
* ``vscan`` (``Tencent/SelfEvolvingAgent``, ``VScan/llava/model/llava_arch.py``, ``encode_images`` and
  ``prepare_inputs_labels_for_multimodal_x``; ``scripts/llava1_6/*.sh``: ``--visual_token_num 96
  --layer_list [16] --image_token_list [32]``): the global + local scan and the merge run on every 336 px tile
  (base and crops alike, ``P`` tokens each, on the full tile before unpadding); the tiles' kept masks are
  stitched and unpadded like the features, every ``image_newline`` is kept, so the LLM gets the base tile's
  ``P`` tokens, then the unpadded grid's kept tokens row by row, each row closed by its newline
  (``model.budget=tile``: one budget per tile). Inside the LLM, ``layer_prune`` takes
  ``min(visual_token_num, N_i')`` tokens from the start of the image block as the image
  (``N_i'`` = tokens sent) and scores them with the row ``prompt_len + min(visual_token_num, N_i') - 1``,
  which on LLaVA-NeXT are the base tile's tokens and a row ``N_i' - P`` tokens before the last prompt
  token: ``VScan.llm_span = "official"`` (default) does exactly that; ``"image"`` (named correction) scores
  the whole block with the last prompt token. On LLaVA-1.5 the two coincide.
* ``flowcut`` (``TungChintao/FlowCut``, ``flowcut/main.py`` with ``image_aspect_ratio 'anyres'``; the rule and its
  port differences: :mod:`methods.flowcut_ports`): ``port: auto`` resolves to ``llava_next`` with
  ``target_num = round(N_ref (1 - ratio))``, ``N_ref`` the largest pinpoint's tiles x tile tokens (2,880 on the 7B).
  The image's tiles run through the CLIP blocks as one batch with FlowCut's cut (``bench.models.vision_prune``),
  ``int(target_num / 2)`` patches per tile; the cut tiles' projected patches are scattered back to their tile
  positions and packed by ``LlavaNextAdapter.source_map`` (base tile, then the unpadded grid's raster), *without*
  ``image_newline`` tokens, as the official ``restore_image_features_sorted`` + ``unpad_mask`` do
  (``model.budget=tile``); the LLM stage (layer 1's last-token scores, ``target_num`` from layer 2 on, renumbered
  positions) runs on the whole image span sent.

Positions: each method's own rule (original ids or renumbered), on the packed sequence's contiguous ids.
A batch runs in groups of samples with one visual count (``llm_pruning`` plans one schedule per count):
each group is its own left-padded sub-batch, so a sample's result does not depend on its neighbours.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.errors import IncompatibleMethodError
from bench.models.base import PreparedBatch
from methods.base import PruningMethod, VisionContext

#: what the in-LLM visual block is on LLaVA-NeXT (recorded as ``extras["inllm_span"]``; module docstring)
INLLM_SPAN = "image"


def _take(x: Any, idx: list[int]):
    """Rows ``idx`` of a per-sample extra (tensor with a batch dim, or list); anything else as is."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return x[torch.tensor(idx, device=x.device)]
    if isinstance(x, list):
        return [x[i] for i in idx]
    return x


class NextInLLM:
    """In-LLM pruning for ``LlavaNextAdapter`` (module docstring); mixed in before ``LlavaAdapter``."""

    def reference_tokens(self) -> int:
        """Packed tokens of the 2 x 2 reference image (twice the tile per side: 672 x 672 on the 7B, 2,928):
        the count an in-LLM budget is checked at before any model work (a run plans per image)."""
        n, rows = self.tile_tokens, 2 * self.grid[0]
        return 5 * n + rows

    def vscan_active(self, method: PruningMethod) -> bool:
        return (method.name == "vscan" and bool(getattr(method, "pre_llm_selection", False))
                and not (method.prune_ratio == 0.0 and method.budget != "official"))

    def flowcut_active(self, method: PruningMethod) -> bool:
        """Whether FlowCut's LLaVA-NeXT port cuts the tiles in CLIP (ratio > 0; ratio 0 is the unpruned model)."""
        return getattr(method, "port", None) == "llava_next" and method.prune_ratio > 0

    def resolve_flowcut(self, method: PruningMethod) -> None:
        """FlowCut's ``port: auto`` (or ``llava_next``) becomes its LLaVA-NeXT port, bound to ``N_ref`` (module
        docstring), in place so that the record and FLOPs read the rule that ran; another port is refused."""
        if method.port not in ("auto", "llava_next"):
            raise IncompatibleMethodError(
                f"method 'flowcut' with port={method.port!r}: on LLaVA-NeXT its official anyres code runs (port=auto or llava_next)")
        method.bind_next(self.pinpoint_tiles()[1] * self.tile_tokens)

    def check_inllm(self, method: PruningMethod) -> None:
        """Refuse in-LLM methods (and settings) this adapter cannot run as :data:`INLLM_SPAN`'s notes say."""
        method.check_compatible(VisionContext(self.grid, self.has_cls, torch.zeros(1, dtype=torch.long)))
        if getattr(method, "port", None) == "llava_next":
            if method.prune_ratio > 0 and self.budget != "tile":
                raise IncompatibleMethodError(
                    f"method {method.name!r}: its official LLaVA-NeXT code has two stages, int(target_num / 2) patches kept per "
                    "336 px tile inside CLIP, then target_num after LLM layer 1: it budgets per tile (use model.budget=tile)")
            if not isinstance(self.config.vision_feature_layer, int):
                raise IncompatibleMethodError(f"method {method.name!r}: a list of vision feature layers is not ported")
            if method.prune_ratio > 0 and method.layers_for(self.num_llm_layers)[0] >= self.num_llm_layers:
                raise IncompatibleMethodError(
                    f"method {method.name!r}: its LLM stage prunes after layer 1, and this LLM has {self.num_llm_layers} layers")
            return
        if getattr(method, "pre_llm_selection", False):
            if method.name != "vscan":
                raise IncompatibleMethodError(f"method {method.name!r} selects before the LLM and prunes inside it; on LLaVA-NeXT only VScan's official port exists")
            if method.prune_ratio > 0 and self.budget != "tile":
                raise IncompatibleMethodError(
                    f"method {method.name!r}: its official LLaVA-NeXT code keeps P tokens per 336 px tile before unpadding "
                    "(use model.budget=tile)")
            w = int(method.window_size)
            if self.grid[0] < w or self.grid[1] < w:
                raise IncompatibleMethodError(f"method {method.name!r}: a {self.grid[0]}x{self.grid[1]} tile holds no {w}x{w} window")
            if not isinstance(self.config.vision_feature_layer, int):
                raise IncompatibleMethodError(f"method {method.name!r}: a list of vision feature layers is not ported")
            method.check_budget(self.tile_tokens, self.num_llm_layers)  # VScan's counts are per tile
            return
        if method.prune_ratio > 0 and self.budget != "image":
            raise IncompatibleMethodError(
                f"method {method.name!r} prunes inside the LLM over each image's whole packed span (one budget per image, "
                "image_newline tokens included, as PyramidDrop's LLaVA-NeXT code counts them): use model.budget=image")
        method.check_budget(self.reference_tokens(), self.num_llm_layers)

    @torch.no_grad()
    def vscan_image(self, pixel_values: torch.Tensor, image_size: torch.Tensor, method: PruningMethod, seed: torch.Tensor):
        """VScan's official LLaVA-NeXT pre-LLM stage for one image: ``(P_t, 3, H, W)`` pixels -> ``(K, D_llm)`` tokens.

        Every tile (base and crops) goes through ``method.reduce`` on its full grid (scans on its own CLS rows,
        merge of its projected tokens); the merged values replace the kept ones and the kept mask is packed like
        the features (stitching, unpadding, ``image_newline`` kept). Returns ``(features, packed positions kept,
        P)`` with ``P`` the per-tile budget.
        """
        from bench.models.clip_extras import build_extras

        cfg = self.config
        tiles = self._num_tiles(image_size)
        px = pixel_values[:tiles].to(self.device, self.dtype)
        hidden = tuple(self.model.model.vision_tower(px, output_hidden_states=True, return_dict=True).hidden_states)
        sel = hidden[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            sel = sel[:, 1:]
        proj = self.model.model.multi_modal_projector(sel)  # (P_t, n, D): what get_image_features packs
        ctx = VisionContext(grid=self.grid, has_cls=self.has_cls, sample_seeds=seed.view(1).repeat(tiles),
                            extras=build_extras(self.model, hidden, method.needs))
        out = method.reduce(proj, ctx)
        k = int(out.n_kept[0])
        n = self.tile_tokens
        full = proj.clone()
        idx = out.kept_index[:, :k]
        full.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]), out.features[:, :k].to(full.dtype))
        keep = torch.zeros(tiles, n, dtype=torch.bool, device=idx.device).scatter_(1, idx, True).flatten().cpu()
        src = self.source_map(image_size, tiles)
        newline = self.model.model.image_newline.to(full.dtype)
        packed_keep = (src < 0) | keep[src.clamp(min=0)]
        pos = packed_keep.nonzero().flatten()
        s = src[pos]
        feats = full.flatten(0, 1)[s.clamp(min=0).to(full.device)]
        feats = torch.where((s < 0).to(full.device).unsqueeze(-1), newline.expand_as(feats), feats)
        return feats, pos, method.counts(n)[0]

    @torch.no_grad()
    def flowcut_image(self, pixel_values: torch.Tensor, image_size: torch.Tensor, method: PruningMethod):
        """FlowCut's official LLaVA-NeXT pre-LLM stage for one image: ``(P_t, 3, H, W)`` pixels -> ``(features (K, D_llm),
        packed positions kept (K,), patches entering each block per tile, tiles)``.

        The image's ``P`` tiles run through the CLIP blocks as one batch, ``int(target_num / 2)`` patches kept per tile
        (:func:`bench.models.vision_prune.pruning_encoder`); the projected survivors go back to their tile positions and
        a packed token is sent when its tile kept it; no ``image_newline`` is sent.
        """
        from bench.models.vision_prune import pruning_encoder

        tiles, n = self._num_tiles(image_size), self.tile_tokens
        px = pixel_values[:tiles].to(self.device, self.dtype)
        x, kept, counts = pruning_encoder(self.model, px, method, n, keep=method.next_tile_keep())
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        proj = self.model.model.multi_modal_projector(x)  # (P, k, D): the survivors only
        full = proj.new_zeros(tiles, n, proj.shape[-1]).scatter_(1, kept.unsqueeze(-1).expand_as(proj), proj)
        mask = torch.zeros(tiles, n, dtype=torch.bool, device=kept.device).scatter_(1, kept, True).flatten().cpu()
        src = self.source_map(image_size, tiles)
        vis = (src >= 0).nonzero().flatten()
        pos = vis[mask[src[vis]]]
        return full.flatten(0, 1)[src[pos].to(full.device)], pos, counts, tiles

    @torch.no_grad()
    def prepare_inllm(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor) -> PreparedBatch:
        """An ``in_llm`` method's inputs: every packed token (VScan: its official per-tile selection first)."""
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        sizes = batch["image_sizes"].cpu()
        vscan, cut = self.vscan_active(method), self.flowcut_active(method)
        if vscan or cut:
            self.check_method(method)
        packed = None if vscan or cut else self.encode_images(batch["pixel_values"], sizes)
        feats, n_in, newlines, sent, p_tile = [], [], [], [], 0
        tower: dict[str, list] = {"vision_tokens_per_layer": [], "vision_segments": [], "vision_projected": []}
        for i in range(len(sizes)):
            src = self.source_map(sizes[i], self._num_tiles(sizes[i]))
            if cut:  # FlowCut: the per-tile cut's survivors, no newline; the cut tower's shape for the FLOPs model
                f, pos, counts, tiles = self.flowcut_image(batch["pixel_values"][i], sizes[i], method)
                sent.append(0)
                tower["vision_tokens_per_layer"].append([c for _ in range(tiles) for c in counts])
                tower["vision_segments"].append([[c + int(self.has_cls)] * tiles for c in counts])
                tower["vision_projected"].append(tiles * counts[-1] if len(counts) else 0)
            elif vscan:
                f, pos, p_tile = self.vscan_image(batch["pixel_values"][i], sizes[i], method, sample_seeds[i])
                sent.append(int((src[pos] < 0).sum()))
            else:
                f = packed[i]
                if len(src) != f.shape[0]:
                    raise ValueError(f"sample {i}: {f.shape[0]} packed tokens, the layout says {len(src)}")
                sent.append(int((src < 0).sum()))
            feats.append(f)
            n_in.append(len(src))
            newlines.append(int((src < 0).sum()))
        new_ids, new_mask, embeds, spans = self.assemble(ids, mask, n_in, feats)
        kept = [int(f.shape[0]) for f in feats]
        extras = {"image_spans": spans, "sample_seeds": sample_seeds, "budget": self.budget, "newline_tokens": newlines,
                  "newline_tokens_kept": sent, "inllm_span": INLLM_SPAN}
        if cut:
            extras.update(tower)
        if vscan:
            extras["llm_plan_tokens"] = self.tile_tokens  # VScan's counts are the per-tile P's schedule
            if getattr(method, "llm_span", "official") == "official":  # the official layer_prune's image: the first min(P, K)
                width = [min(p_tile, k) for k in kept]
                extras["llm_spans"] = torch.stack([spans[:, 0], spans[:, 0] + torch.tensor(width)], dim=1)
                extras["llm_query_offsets"] = [k - w for k, w in zip(kept, width)]
                extras["inllm_span"] = "vscan_official"
        return PreparedBatch(new_ids, embeds, new_mask, n_in, kept, extras=extras)

    def inllm_groups(self, prepared: PreparedBatch) -> list[list[int]]:
        """Samples sharing one in-LLM visual block (width and query offset), in order of first appearance."""
        spans = prepared.extras.get("llm_spans", prepared.extras["image_spans"])
        offs = prepared.extras.get("llm_query_offsets") or [0] * spans.shape[0]
        keys: dict[tuple, list[int]] = {}
        for i in range(spans.shape[0]):
            keys.setdefault((int(spans[i, 1] - spans[i, 0]), int(offs[i]), int(prepared.visual_tokens_kept[i])), []).append(i)
        return list(keys.values())

    def sub_prepared(self, prepared: PreparedBatch, idx: list[int]) -> PreparedBatch:
        """The samples ``idx`` as their own batch, left padding shared by all of them removed (spans shifted)."""
        mask = prepared.attention_mask[idx]
        lead = int((mask.sum(0) == 0).cumprod(0).sum())  # columns that are padding in every row
        extras = {}
        for k, v in prepared.extras.items():
            if k in ("llm_stages", "llm_stage_groups", "visual_tokens_per_layer", "visual_tokens_layer_mean"):
                continue  # what an earlier prefill recorded (rewritten by this one; "llm_stages" is per stage, not per sample)
            v = _take(v, idx)
            if k in ("image_spans", "llm_spans"):
                v = v - lead
            elif k == "position_ids":
                v = v[:, lead:]
            extras[k] = v
        offs = extras.pop("llm_query_offsets", None)
        if offs:
            extras["llm_query_offset"] = int(offs[0])
        return PreparedBatch(prepared.input_ids[idx][:, lead:], prepared.inputs_embeds[idx][:, lead:], mask[:, lead:],
                             _take(prepared.visual_tokens_in, idx), _take(prepared.visual_tokens_kept, idx), extras=extras)

    def _outside_tokens(self, sub: PreparedBatch) -> torch.Tensor:
        """``(b, 1)`` visual tokens sent but outside the in-LLM block (VScan's official span), for the per-layer counts."""
        spans = sub.extras.get("llm_spans")
        if spans is None:
            return torch.zeros(len(sub.visual_tokens_kept), 1, dtype=torch.long)
        return (torch.tensor(sub.visual_tokens_kept) - (spans[:, 1] - spans[:, 0])).view(-1, 1)

    def _merge_groups(self, prepared: PreparedBatch, parts: list[tuple[list[int], PreparedBatch]]) -> None:
        b = len(prepared.visual_tokens_kept)
        rows, stages = [None] * b, []
        for idx, sub in parts:
            vpl = sub.extras.get("visual_tokens_per_layer")
            if vpl is not None:
                vpl = vpl + self._outside_tokens(sub)
                for j, i in enumerate(idx):
                    rows[i] = vpl[j]
            stages.append({"samples": idx, "stages": sub.extras.get("llm_stages", [])})
        if all(r is not None for r in rows):
            vpl = torch.stack(rows)
            prepared.extras["visual_tokens_per_layer"] = vpl
            prepared.extras["visual_tokens_layer_mean"] = float(vpl.double().mean())
        if len(parts) == 1:
            prepared.extras["llm_stages"] = stages[0]["stages"]
        else:  # kept indices differ in width per group: per group, samples named
            prepared.extras.pop("llm_stages", None)
            prepared.extras["llm_stage_groups"] = stages

    def generate(self, prepared: PreparedBatch, max_new_tokens: int = 16, method: PruningMethod | None = None, **gen_kwargs) -> torch.Tensor:
        """:meth:`LlavaAdapter.generate`; an ``in_llm`` method runs per group of one visual count (:meth:`inllm_groups`)."""
        if method is None or method.stage != "in_llm":
            return super().generate(prepared, max_new_tokens=max_new_tokens, method=method, **gen_kwargs)
        groups = self.inllm_groups(prepared)
        parts, outs = [], []
        for idx in groups:
            sub = self.sub_prepared(prepared, idx)
            outs.append(super().generate(sub, max_new_tokens=max_new_tokens, method=method, **gen_kwargs))
            parts.append((idx, sub))
        self._merge_groups(prepared, parts)
        t = max(o.shape[1] for o in outs)
        new = torch.full((len(prepared.visual_tokens_kept), t), self.pad_token_id, dtype=outs[0].dtype, device=outs[0].device)
        for idx, o in zip(groups, outs):  # a group that stopped early is padded as generate pads finished rows
            new[torch.tensor(idx, device=new.device), : o.shape[1]] = o
        return new

    @torch.no_grad()
    def prefill(self, prepared: PreparedBatch, method: PruningMethod | None = None):
        """:meth:`LlavaAdapter.prefill`; an ``in_llm`` method needs one visual count per call (one group)."""
        if method is None or method.stage != "in_llm":
            return super().prefill(prepared, method)
        groups = self.inllm_groups(prepared)
        if len(groups) != 1:
            raise IncompatibleMethodError(
                f"method {method.name!r}: one prefill call prunes inside the LLM for one visual-token count; this batch holds "
                f"{len(groups)} counts (generate runs them as groups; measure efficiency one image size per batch)")
        sub = self.sub_prepared(prepared, groups[0])
        out = super().prefill(sub, method)
        self._merge_groups(prepared, [(groups[0], sub)])
        return out

    def llm_pruning(self, method: PruningMethod, prepared: PreparedBatch):
        """:meth:`LlavaAdapter.llm_pruning` for a batch of one visual count (VScan's port: its block and query row)."""
        if method.stage == "in_llm" and "llm_query_offsets" in prepared.extras:
            groups = self.inllm_groups(prepared)
            if len(groups) != 1:
                raise IncompatibleMethodError("in-LLM pruning needs the same number of visual tokens in every sample")
            prepared.extras["llm_query_offset"] = int(prepared.extras["llm_query_offsets"][0])
        return super().llm_pruning(method, prepared)
