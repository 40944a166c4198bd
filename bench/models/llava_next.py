"""LLaVA-NeXT (LLaVA-1.6) through transformers' native ``LlavaNextForConditionalGeneration``.

An image is encoded as a base 336 px tile plus the anyres crops of the best-fitting grid pinpoint
(``image_grid_pinpoints``); the crops' features are stitched into one high-resolution grid, cut back to
the image's aspect ratio (*unpadding*) and followed, row by row, by the learned ``image_newline``
embedding. The number of visual tokens therefore varies per image (2,928 at 672x672: 576 + 48 x 48 + 48
newlines). The adapter runs exactly ``LlavaNextModel.get_image_features`` (tower, feature layer, CLS
dropped, projector, ``pack_image_features``) and learns where each packed token came from by packing
a tensor of token indices through the same ``pack_image_features`` (so unpadding is transformers' own).

Pruning is pre-LLM on the packed projected tokens, with the budget convention ``model.budget``:

* ``image``: one budget per image, ``round(N * (1 - ratio))`` of its ``N`` non-newline tokens, chosen by
  one call of the method over all of them (the method sees them as a ``1 x N`` sequence, so methods that
  read a 2-D grid are refused);
* ``tile``: one budget per tile, as VisionZip's and CDPruner's LLaVA-NeXT code do: the base tile and each
  anyres crop (its part that survives unpadding, a rectangle) get ``round(n_t * (1 - ratio))`` each,
  chosen by one call per tile on its own raster grid;
* ``base_grid``: two budgets, as G-Prune's LLaVA-NeXT code does: the base tile, and the whole unpadded
  high-resolution grid (its non-newline tokens, one call on their ``rows x cols`` raster).

``image_newline`` tokens are layout markers, not image content: they never count in the budget and are
all kept, at their place in the sequence (except where a method's official LLaVA-NeXT code drops them, below). Selected tokens keep their packed order; a merging method's
outputs take the place of the first token of what they merge. Positions are renumbered contiguously,
as ``bench.models.llava`` does (the official pre-LLM code). ``visual_tokens_in`` / ``visual_tokens_kept``
count what reaches the LLM, newlines included; ``extras["newline_tokens"]`` says how many of them were in
the packed input and ``extras["newline_tokens_kept"]`` how many were sent.

In-LLM methods (FastV, PyramidDrop, SparseVLM, DART, TransPrune, VScan, FlowCut's LLaVA-NeXT port) run through
:class:`bench.models.llava_next_inllm.NextInLLM` (its docstring: the span, budgets, VScan's official port).

Methods that read vision-tower quantities (CLS attention) run only where this adapter follows their official
LLaVA-NeXT code (:data:`TOWER_PORTS`): the tower runs once per tile, so a packed token's quantity is the one of
its own tile and patch (``source_map``), the base tile's and the crops' alike, stitched and unpadded exactly as
the features are. Others are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.errors import ConfigError, IncompatibleMethodError
from bench.models.base import FlopsDescription, ImageBlock, PreparedBatch
from bench.models.llava import LlavaAdapter
from bench.models.llava_next_inllm import NextInLLM
from methods.base import PruningMethod, VisionContext

BUDGETS = ("image", "tile", "base_grid")

#: Methods reading vision-tower quantities whose official LLaVA-NeXT code this adapter follows:
#: ``budget`` (the only budget convention of that code), ``newlines`` (whether ``image_newline`` tokens reach
#: the LLM) and ``needs`` (the tower quantities served per packed token).
#:
#: * ``holov`` (``obananas/HoloV``, ``llava/model/llava_arch.py``, ``prepare_inputs_labels_for_multimodal``):
#:   the per-tile CLS attention (``encode_images`` returns it beside the features) is stitched and unpadded like
#:   the features, the newline concatenation is commented out for both, and ``HoloV(...)`` runs once per image
#:   over ``[base tile; unpadded anyres grid]``: one budget per image, no newline sent.
#: * ``visionzip`` (``dvlab-research/VisionZip``, ``visionzip/llava_arch.py``,
#:   ``prepare_inputs_labels_for_multimodal_visionzip`` + ``restore_image_features_sorted``): every tile, the
#:   base one included, is reduced on its own full 336 px grid (``D`` dominant with CLS + ``C`` contextual
#:   each, before any unpadding: the official code does not unpad, and sends no newline); the image's tokens
#:   are the base tile's output, then the crops' dominant patches in the raster order of the stitched
#:   (not unpadded) grid, then the crops' CLS tokens, then their contextual tokens. ``model.budget=tile``
#:   here means one budget per full tile.
#: * ``gprune`` (``jytmelon/G-Prune``, ``LLaVA-NeXT/llava/model/llava_arch.py``): one graph for the base tile's 576
#:   tokens and one for the unpadded grid's non-newline tokens, each keeping ``int(keep_ratio * n)``; the row-end
#:   newlines are always kept; kept tokens keep their original position ids. No tower quantity.
#: * ``cdpruner`` (``Theia-4869/CDPruner``, ``llava/model/llava_arch.py``, ``encode_images`` +
#:   ``prepare_inputs_labels_for_multimodal``): the image's tiles are concatenated into one batch, so the DPP keeps
#:   ``T`` tokens of every *full* 336 px tile (base and crops, before unpadding), with the relevance (CLIP's text
#:   tower on the question) min-max normalised over all the image's tiles at once; the crops' index masks are
#:   stitched and unpadded like the features, a ``True`` column is appended for the newlines (all kept), and the
#:   image's tokens are the base tile's picks, then the unpadded grid's picks with its newlines. A pick in a part
#:   of a crop that unpadding cuts away is lost: an image keeps ``T`` base tokens plus at most ``T`` per crop.
#:   ``model.budget=tile`` here means one budget per full tile (:meth:`LlavaNextAdapter.select_full_tile_masks`).
#: * ``vispruner`` (``Theia-4869/VisPruner``, ``llava/model/llava_arch.py``, ``encode_images`` +
#:   ``prepare_inputs_labels_for_multimodal``): the same layout as CDPruner's (the two share their LLaVA-NeXT
#:   code): ``T`` picks per full tile (important by its CLS attention, diverse by de-duplication of its layer -2
#:   features, each tile on its own), the index masks stitched and unpadded like the features, newlines kept.
#: * ``fastervlm`` (``Theia-4869/FasterVLM``, ``llava/model/llava_arch.py``): ``T`` per full tile by its CLS attention
#:   (``--visual-token-num``, "29 * 5 = 145" in its README), the tiles one batch; ``prepare_inputs_labels_for_multimodal``
#:   hard-codes ``mm_patch_merge_type = 'spatial'`` ("only support 'spatial' and 'spatial_unpad'"), so the crops'
#:   masks are stitched but *not* unpadded and no newline is sent: the base tile's picks, then the crops' picks in
#:   the raster order of the stitched full grid (``unpad: False``; a pick outside the unpadded image reaches the LLM).
#: * ``hiprune`` (``Danielement321/HiPrune``, ``LLaVA/llava/model/llava_arch.py``, run by ``bench_llava_next.sh``
#:   through lmms-eval): ``encode_images`` on the image's tiles as one batch splits the image budget ``N'``
#:   (``HIPRUNE_RETENTION``, "1-2880", 640/320/160 in its README) evenly, ``int(N' / P)`` per full tile of its
#:   ``P`` tiles, each tile selected on its own (anchors, buffers, registers); the same hard-coded ``'spatial'``
#:   merge as FasterVLM (stitched, not unpadded, no newline). Here ``N' = round(N_ref (1 - ratio))`` with ``N_ref``
#:   the largest pinpoint's tile count times ``n`` (2,880 on LLaVA-NeXT-7B: ratio ``1 - 640/2880`` is ``N' = 640``),
#:   so an image of fewer tiles keeps more per tile, as the official code does (``image_split``,
#:   :meth:`LlavaNextAdapter.split_tile_budget`).
TOWER_PORTS: dict[str, dict[str, Any]] = {
    "cdpruner": {"budget": "tile", "newlines": True, "needs": ("clip_image_embeds", "clip_text_embeds", "clip_text_chunks"),
                 "tile_masks": True},
    "gprune": {"budget": "base_grid", "newlines": True, "needs": ()},
    "holov": {"budget": "image", "newlines": False, "needs": ("cls_attn",)},
    "vispruner": {"budget": "tile", "newlines": True, "needs": ("cls_attn", "hidden"), "tile_masks": True},
    "fastervlm": {"budget": "tile", "newlines": False, "needs": ("cls_attn",), "tile_masks": True, "unpad": False},
    "hiprune": {"budget": "tile", "newlines": False, "needs": ("attn_colmean",), "tile_masks": True, "unpad": False, "image_split": True},
    "visionzip": {"budget": "tile", "newlines": False, "needs": ("cls_attn", "hidden", "keys", "projector"), "full_tiles": True},
}


#: Methods with [CLS]-attention or in-tower rules whose official code was read for LLaVA-NeXT and is not followed
#: here, with the reason (refused with it, exit 2).
NOT_PORTED: dict[str, str] = {
    "prumerge": (
        "its official code (42Shawn/LLaVA-PruMerge) is built on LLaVA-1.5 only: prepare_inputs_labels_for_multimodal takes "
        "no image_sizes and flattens a batch of tiles without stitching, unpadding or newlines, and with more than one tile "
        "its IQR outlier count pools all tiles (outlier_dectection flattens the batch); an adaptive count of merged tokens "
        "has no place in the unpadded grid, so no LLaVA-NeXT budget convention follows from it"
    ),
    "prumerge_plus": (
        "its official code (42Shawn/LLaVA-PruMerge, clip_encoder.py::token_prune_merge_advanced_plus) is built on LLaVA-1.5 "
        "only: its IQR outlier count pools a batch of tiles and torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1) "
        "fails for more than one tile, and prepare_inputs_labels_for_multimodal takes no image_sizes (no stitching, "
        "unpadding or newlines); an adaptive count of merged tokens has no place in the unpadded grid"
    ),
}


class LlavaNextAdapter(NextInLLM, LlavaAdapter):
    """Adapter for ``LlavaNextForConditionalGeneration`` (``llava-hf/llava-v1.6-*``).

    Parameters
    ----------
    budget : {"image", "tile"}
        The budget convention (module docstring); part of the model config, so it is recorded with the run.
    Other parameters as :class:`bench.models.llava.LlavaAdapter`.
    """

    family = "llava_next"
    model_class_name = "LlavaNextForConditionalGeneration"
    config_class_name = "LlavaNextConfig"
    supported_stages = frozenset({"none", "pre_llm", "in_llm"})
    selection_graphs = False

    def __init__(self, *args: Any, budget: str = "image", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if budget not in BUDGETS:
            raise ConfigError(f"model.budget must be one of {', '.join(BUDGETS)} for LLaVA-NeXT, got {budget!r}")
        self.budget = budget

    # --------------------------------------------------------------- geometry
    @property
    def tile_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def check_method(self, method: PruningMethod) -> None:
        if method.name == "flowcut":  # its official LLaVA-NeXT code: the per-tile CLIP cut, then an LLM stage
            self.resolve_flowcut(method)
        if method.name in NOT_PORTED and method.prune_ratio > 0:
            raise IncompatibleMethodError(f"method {method.name!r} is not run on LLaVA-NeXT: {NOT_PORTED[method.name]}")
        if method.stage == "in_llm":
            return self.check_inllm(method)
        if method.stage == "in_vision":
            raise IncompatibleMethodError(
                f"method {method.name!r} prunes or merges inside the vision tower (stage 'in_vision'); on LLaVA-NeXT the "
                "tower runs once per 336 px tile (base + anyres crops) and the in-tower path (bench.models.vision_merge, "
                "vision_prune) handles a single tile per image, not the tiles' stitching and unpadding"
            )
        if method.stage not in self.supported_stages:
            raise IncompatibleMethodError(
                f"method {method.name!r} prunes at stage {method.stage!r}, which the LLaVA-NeXT adapter does not implement"
            )
        self.check_text_tower(method)
        port = TOWER_PORTS.get(method.name)
        if port is not None and not method.needs and method.prune_ratio > 0 and port["budget"] != self.budget:
            raise IncompatibleMethodError(
                f"method {method.name!r}: its official LLaVA-NeXT code budgets per {port['budget']} "
                f"(use model.budget={port['budget']})"
            )
        if method.needs and method.prune_ratio > 0:
            if port is None or any(k.partition(":")[0] not in port["needs"] for k in method.needs):
                raise IncompatibleMethodError(
                    f"method {method.name!r} needs vision-tower quantities ({', '.join(sorted(method.needs))}); on LLaVA-NeXT "
                    "they exist per 336 px tile, and this adapter follows the official LLaVA-NeXT code of "
                    f"{', '.join(sorted(TOWER_PORTS))} only (per-tile vs per-image budgets, newline handling)"
                )
            if port["budget"] != self.budget:
                raise IncompatibleMethodError(
                    f"method {method.name!r}: its official LLaVA-NeXT code budgets per {port['budget']} "
                    f"(use model.budget={port['budget']})"
                )
        if port is not None and port.get("image_split") and method.prune_ratio > 0:
            fewest = self.pinpoint_tiles()[0]
            if self.split_tile_budget(method, fewest) > self.tile_tokens:
                raise IncompatibleMethodError(
                    f"method {method.name!r}: its official LLaVA-NeXT budget N' = {method.n_keep(self.pinpoint_tiles()[1] * self.tile_tokens)} "
                    f"split over an image of {fewest} tiles exceeds a tile's {self.tile_tokens} tokens (the official top-k fails); "
                    f"use a ratio of at least {1 - fewest / self.pinpoint_tiles()[1]:.3f}"
                )
        if method.stage == "pre_llm" and getattr(method, "renumber_positions", True) is False and (method.merges or method.needs):
            raise IncompatibleMethodError(
                f"method {method.name!r} keeps its tokens' original position ids (renumber_positions: false); on LLaVA-NeXT "
                "original ids are kept for pure selections on the packed tokens only"
            )
        if self.budget == "image" and getattr(method, "needs_grid", False):
            raise IncompatibleMethodError(
                f"method {method.name!r} reads the 2-D patch grid; with model.budget=image the base tile and the "
                "anyres grid form no single grid (use model.budget=tile)"
            )
        method.check_compatible(VisionContext(self.grid, self.has_cls, torch.zeros(1, dtype=torch.long)))

    def source_map(self, image_size: torch.Tensor, num_tiles: int) -> torch.Tensor:
        """``(N_packed,)`` for one image: the index ``tile * n + patch`` (raster within the tile) each packed token
        comes from, ``-1`` for an ``image_newline`` token; from ``pack_image_features`` itself."""
        n = self.tile_tokens
        labels = torch.arange(num_tiles * n, dtype=torch.float64).view(num_tiles, n, 1)
        packed, _ = self.model.model.pack_image_features(
            [labels], image_size.view(1, 2).cpu(), self.config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        return packed[0][:, 0].round().long()

    def _num_tiles(self, image_size: torch.Tensor) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.config
        return image_size_to_num_patches(image_size.cpu(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def segments(self, src: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """The budget units of one image: ``(packed positions (n_u,), grid)`` per unit, non-newline tokens only."""
        vis = (src >= 0).nonzero().flatten()
        if self.budget == "image":
            return [(vis, (1, len(vis)))]
        if self.budget == "base_grid":
            n = self.tile_tokens
            base, grid = vis[src[vis] < n], vis[src[vis] >= n]
            rows = int((src < 0).sum())
            out = [(base, self.grid)]
            if len(grid):
                out.append((grid, (rows, len(grid) // max(rows, 1))))
            return out
        n, side = self.tile_tokens, self.grid[1]
        out = []
        tile = src[vis] // n
        for t in tile.unique().tolist():  # ascending: the base tile first
            pos = vis[tile == t]
            local = src[pos] % n
            h, w = len((local // side).unique()), len((local % side).unique())
            out.append((pos, (h, w)))
        return out

    def visual_layout(self, batch: dict[str, torch.Tensor]) -> list[list[ImageBlock]]:
        out = []
        for i, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            seq = ids[mask.bool()]
            pos = (seq == self.image_token_id).nonzero().flatten()
            size = batch["image_sizes"][i]
            tiles = self._num_tiles(size)
            src = self.source_map(size, tiles)
            grids = [self.grid]
            hi = src[self.tile_tokens :]
            if len(hi):
                rows = int((hi < 0).sum())
                grids.append((rows, (len(hi) - rows) // max(rows, 1)))
            out.append([ImageBlock(int(pos[0]) if len(pos) else -1, len(src), grids, tiles)])
        return out

    # --------------------------------------------------------------- forward
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, output_hidden_states: bool = False):
        """``(B, P, 3, H, W)`` pixels + ``(B, 2)`` sizes -> per image its packed ``(N_i, D_llm)`` tokens (newlines in).

        One image at a time, so a sample's features never depend on its batch neighbours (GEMM kernels are
        chosen by row count on CUDA). ``output_hidden_states``: returns ``(features, hidden)`` with, per image,
        the tower's tuple of ``(P_i, 1 + n, D_vis)`` hidden states of its ``P_i`` tiles (same forward pass).
        """
        cfg = self.config
        out, hidden = [], []
        for i in range(pixel_values.shape[0]):
            res = self.model.model.get_image_features(
                pixel_values=pixel_values[i : i + 1].to(self.device, self.dtype),
                image_sizes=image_sizes[i : i + 1].to(self.device),
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
                **({"output_hidden_states": True} if output_hidden_states else {}),
            )
            out.append(res.pooler_output[0])
            if output_hidden_states:
                hidden.append(tuple(res.hidden_states))
        return (out, hidden) if output_hidden_states else out

    def packed_extras(self, hidden, src: torch.Tensor, pos: torch.Tensor, needs) -> dict[str, Any]:
        """Tower quantities of one image's packed tokens ``pos`` (indices into ``src``), for a :data:`TOWER_PORTS` method.

        ``cls_attn:L`` is ``(1, H, 1 + n_u)``: column ``1 + j`` is the CLS-row attention of the tile and patch
        packed token ``pos[j]`` comes from (each tile's own CLS query; ``bench.models.clip_extras``), column 0
        (no CLS token in the packed sequence) is zero and is not read by a port.
        """
        from bench.models.clip_extras import build_extras

        tiles = build_extras(self.model, hidden, needs)
        idx = src[pos].to(self.device)
        tile, patch = idx // self.tile_tokens, idx % self.tile_tokens + int(self.has_cls)

        def cls_attn(key):
            a = tiles[key]()  # (P, H, 1 + n)
            rows = a[tile, :, patch].T.unsqueeze(0)  # (1, H, n_u)
            return torch.cat([torch.zeros_like(rows[:, :, :1]), rows], dim=2)

        out = {}
        for key in needs:
            if key.partition(":")[0] != "cls_attn":
                raise IncompatibleMethodError(f"LLaVA-NeXT serves only cls_attn per packed token, not {key!r}")
            out[key] = (lambda k=key: cls_attn(k))
        return out

    def select_image(self, feats: torch.Tensor, src: torch.Tensor, method: PruningMethod, seed: torch.Tensor, hidden=None):
        """One image: packed ``(N, D)`` features -> ``(kept (K, D), packed positions selected or None)``;
        ``hidden``: the image's tower hidden states (per tile), for a method that ``needs`` tower quantities."""
        if method.prune_ratio == 0.0 or method.stage == "none":
            return feats, torch.arange(feats.shape[0])
        keys, parts, merged = [], [], False
        for pos, grid in self.segments(src):
            extras = self.packed_extras(hidden, src, pos, method.needs) if method.needs else {}
            ctx = VisionContext(grid=grid, has_cls=self.has_cls, sample_seeds=seed.view(1), extras=extras)
            sel = method.reduce(feats[pos.to(feats.device)].unsqueeze(0), ctx)
            k = int(sel.n_kept[0])
            parts.append(sel.features[0, :k])
            if sel.kept_index is not None:
                keys.append(pos[sel.kept_index[0, :k].cpu()].double())
            else:  # merged tokens take the place of the first token they come from, in output order
                keys.append(float(pos[0]) + torch.arange(k, dtype=torch.float64) / (k + 1))
                merged = True
        if self.sends_newlines(method):
            newline = (src < 0).nonzero().flatten()
            parts.append(feats[newline.to(feats.device)])
            keys.append(newline.double())
        key = torch.cat(keys)
        order = key.argsort(stable=True)
        return torch.cat(parts)[order.to(feats.device)], (None if merged else key[order].long())

    def full_tiles(self, method: PruningMethod) -> bool:
        """Whether ``method`` runs on whole tiles before packing (its official LLaVA-NeXT code, :data:`TOWER_PORTS`)."""
        return bool(method.needs) and method.prune_ratio > 0 and TOWER_PORTS.get(method.name, {}).get("full_tiles", False)

    @torch.no_grad()
    def reduce_full_tiles(self, pixel_values: torch.Tensor, image_size: torch.Tensor, method: PruningMethod, seed: torch.Tensor) -> torch.Tensor:
        """One image, VisionZip's official LLaVA-NeXT layout: ``(P, 3, H, W)`` pixels -> ``(K, D_llm)`` tokens.

        The tower runs on the image's tiles (no projector: the method projects the rows it keeps); the method
        reduces each tile on its full grid; rows are laid out as ``[base tile's rows; crops' dominant patches in
        the stitched grid's raster order; crops' CLS rows; crops' contextual rows]``.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        from bench.models.clip_extras import build_extras

        tiles = self._num_tiles(image_size)
        if tiles < 2:
            raise IncompatibleMethodError(f"method {method.name!r}: an image without anyres crops has no official LLaVA-NeXT layout here")
        px = pixel_values[:tiles].to(self.device, self.dtype)
        hidden = tuple(self.model.model.vision_tower(px, output_hidden_states=True, return_dict=True).hidden_states)
        n, side = self.tile_tokens, self.grid[1]
        ctx = VisionContext(grid=self.grid, has_cls=self.has_cls, sample_seeds=seed.view(1).repeat(tiles),
                            extras=build_extras(self.model, hidden, method.needs))
        placeholder = torch.zeros((), dtype=self.dtype, device=self.device).expand(tiles, n, self.config.text_config.hidden_size)
        sel = method.reduce(placeholder, ctx)
        k = int(sel.n_kept[0])
        feats, index = sel.features[:, :k], sel.extras["source_index"][:, :k]
        nph, npw = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        crop_f, crop_i = feats[1:], index[1:]
        crop = torch.arange(tiles - 1, device=index.device).view(-1, 1).expand_as(crop_i)
        dom = crop_i > 0
        patch = (crop_i - 1).clamp(min=0)
        row = (crop // npw) * side + patch // side
        col = (crop % npw) * side + patch % side
        key = (row * (npw * side) + col)[dom]
        dominant = crop_f[dom][key.argsort()]
        return torch.cat([feats[0], dominant, crop_f[crop_i == 0], crop_f[crop_i < 0]])

    # --------------------------------------------------------------- per-full-tile index masks (CDPruner, VisPruner)
    def tile_masks(self, method: PruningMethod) -> bool:
        """Whether ``method`` picks on every full tile and its index masks are unpadded like the features
        (the official LLaVA-NeXT code of CDPruner and VisPruner, :data:`TOWER_PORTS`)."""
        return method.stage == "pre_llm" and method.prune_ratio > 0 and TOWER_PORTS.get(method.name, {}).get("tile_masks", False)

    @torch.no_grad()
    def tile_features(self, pixel_values: torch.Tensor, image_size: torch.Tensor):
        """One image's full tiles: ``(P_pad, 3, H, W)`` pixels -> ``(hidden, feats)``: the tower's hidden states of
        its ``P`` tiles (``(P, 1 + n, D_vis)`` each) and the projector on every tile's patches, ``(P, n, D_llm)``,
        before unpadding. The calls of ``get_image_features`` on the same tiles, so ``feats`` holds the packed
        features bit for bit (packing only indexes them and appends newlines)."""
        tiles = self._num_tiles(image_size)
        out = self.model.model.vision_tower(pixel_values[:tiles].to(self.device, self.dtype), output_hidden_states=True, return_dict=True)
        hidden = tuple(out.hidden_states)
        layer = hidden[self.config.vision_feature_layer]
        return hidden, self.model.model.multi_modal_projector(layer[:, int(self.has_cls):])

    def packed_from_tiles(self, feats: torch.Tensor, src: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Packed positions ``where`` of one image as ``(K, D_llm)`` rows: tile features by ``src``, newlines the model's."""
        s = src[where].to(feats.device)
        rows = feats.reshape(-1, feats.shape[-1])[s.clamp(min=0)]
        newline = self.model.model.image_newline.to(rows.dtype)
        return torch.where((s < 0).unsqueeze(-1), newline.expand_as(rows), rows)

    @torch.no_grad()
    def select_full_tile_masks(self, hidden, feats: torch.Tensor, src: torch.Tensor, method: PruningMethod, seed: torch.Tensor,
                               text: str | None) -> torch.Tensor:
        """One image, the official LLaVA-NeXT selection of CDPruner / VisPruner / FasterVLM: ``(K,)`` ascending packed
        positions kept (FasterVLM, ``unpad: False``: the ``(P, n)`` tile masks themselves, laid out by :meth:`stitched_rows`).

        ``hidden``, ``feats``: :meth:`tile_features`; ``src``: :meth:`source_map`. The method runs once on the
        image's ``P`` full tiles as a batch (``(P, n, D_llm)`` features before unpadding, its tower quantities
        per tile; for CDPruner CLIP joint-space embeddings per tile, the question's chunks repeated per tile and
        ``clip_joint_batch``: one min-max of the relevance over the tiles). A packed token is kept when its tile's
        mask holds it; every ``image_newline`` is kept (the official code appends a ``True`` column to the
        unpadded mask). Packed order is the official order: base picks, then the unpadded grid's raster with newlines.
        """
        from bench.models.clip_extras import build_extras, vision_model
        from bench.models.clip_text import TEXT_KEYS, needs_text, question_text

        tiles, n = feats.shape[0], self.tile_tokens
        extras = build_extras(self.model, hidden, [k for k in method.needs if k not in TEXT_KEYS])
        if needs_text(method):
            if text is None:
                raise IncompatibleMethodError(f"method {method.name!r} needs the question text (batch['texts']), which this batch does not carry")
            side = self.clip_text()
            image_embeds = side.image_embeds(vision_model(self.model), hidden[self.config.vision_feature_layer])  # (P, n, C)
            q = side.encode_question(question_text(text))  # (M, C)
            extras.update({
                "clip_image_embeds": lambda: image_embeds,
                "clip_text_embeds": lambda: q.unsqueeze(0).expand(tiles, -1, -1),
                "clip_text_chunks": lambda: torch.full((tiles,), q.shape[0], dtype=torch.long),
                "clip_joint_batch": lambda: True,
            })
        ctx = VisionContext(grid=self.grid, has_cls=self.has_cls, sample_seeds=seed.view(1).repeat(tiles), extras=extras)
        if TOWER_PORTS[method.name].get("image_split"):  # HiPrune: int(N' / P) per tile, as a ratio of the tile's n
            from dataclasses import replace

            method = replace(method, prune_ratio=1.0 - self.split_tile_budget(method, tiles) / n)
        sel = method.reduce(feats, ctx)
        mask = torch.zeros(tiles, n, dtype=torch.bool)
        for t in range(tiles):
            mask[t, sel.kept_index[t, : int(sel.n_kept[t])].cpu()] = True
        if not TOWER_PORTS[method.name].get("unpad", True):
            return mask
        vis = src >= 0
        keep = ~vis
        keep[vis] = mask.view(-1)[src[vis]]
        return keep.nonzero().flatten()

    def pinpoint_tiles(self) -> tuple[int, int]:
        """``(fewest, most)`` tiles an image gets (base + the crops of the smallest / largest pinpoint)."""
        side = self.config.vision_config.image_size
        crops = [(h // side) * (w // side) for h, w in self.config.image_grid_pinpoints]
        return 1 + min(crops), 1 + max(crops)

    def split_tile_budget(self, method: PruningMethod, tiles: int) -> int:
        """HiPrune's official per-tile count on an image of ``tiles`` tiles: ``int(N' / tiles)``, with the image
        budget ``N' = round(N_ref (1 - ratio))``, ``N_ref`` the most tiles times ``n`` (2,880 on LLaVA-NeXT-7B)."""
        return method.n_keep(self.pinpoint_tiles()[1] * self.tile_tokens) // tiles

    def stitched_rows(self, feats: torch.Tensor, mask: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """FasterVLM's official ``'spatial'`` layout of one image: ``(P, n, D)`` tile features and ``(P, n)`` masks ->
        ``(K, D)``: the base tile's picks (raster), then the crops' picks in the raster order of the stitched full
        (not unpadded) crop grid; no newline."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        nph, npw = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        side = self.grid[1]
        grid = feats[1:].view(nph, npw, side, side, -1).permute(0, 2, 1, 3, 4).reshape(nph * npw * side * side, -1)
        gmask = mask[1:].view(nph, npw, side, side).permute(0, 2, 1, 3).reshape(-1).to(feats.device)
        return torch.cat([feats[0][mask[0].to(feats.device)], grid[gmask]])

    def tile_mask_image(self, pixel_values: torch.Tensor, image_size: torch.Tensor, method: PruningMethod, seed: torch.Tensor,
                        text: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image through :meth:`select_full_tile_masks`: ``(kept rows (K, D_llm), packed positions (K,) or None, src)``."""
        src = self.source_map(image_size, self._num_tiles(image_size))
        hidden, feats = self.tile_features(pixel_values, image_size)
        where = self.select_full_tile_masks(hidden, feats, src, method, seed, text)
        if not TOWER_PORTS[method.name].get("unpad", True):  # FasterVLM: no packed positions (not unpadded)
            return self.stitched_rows(feats, where, image_size), None, src
        return self.packed_from_tiles(feats, src, where), where, src

    def sends_newlines(self, method: PruningMethod) -> bool:
        """Whether ``image_newline`` tokens reach the LLM under ``method`` (all of them unless its official port drops them)."""
        if method.prune_ratio == 0.0 or method.stage == "none":
            return True
        return TOWER_PORTS.get(method.name, {}).get("newlines", True) if method.needs else True

    @torch.no_grad()
    def prepare(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor) -> PreparedBatch:
        """Apply a pre-LLM ``method`` per image (``budget``) to a processor batch (one image per sample, left padded).

        ``batch`` holds ``input_ids``/``attention_mask`` ``(B, T)`` with the image's packed token count of
        placeholders, ``pixel_values`` ``(B, P, 3, H, W)`` and ``image_sizes`` ``(B, 2)``.
        """
        if method.stage not in self.supported_stages:
            self.check_method(method)
        if method.stage == "in_llm":
            return self.prepare_inllm(batch, method, sample_seeds)
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        sizes = batch["image_sizes"].cpu()
        tower = bool(method.needs) and method.prune_ratio > 0 and method.stage == "pre_llm"
        if tower:
            self.check_method(method)
        feats, n_in, newlines, picks = [], [], [], []
        if self.tile_masks(method):  # CDPruner, VisPruner, FasterVLM, HiPrune: index masks on the full tiles
            texts = batch.get("texts") or [None] * len(sizes)
            for i in range(len(sizes)):
                kept, where, src = self.tile_mask_image(batch["pixel_values"][i], sizes[i], method, sample_seeds[i], texts[i])
                feats.append(kept)
                picks.append(where)
                n_in.append(len(src))
                newlines.append(int((src < 0).sum()))
        elif self.full_tiles(method):  # the official code reduces whole tiles before packing: no packed features
            for i in range(len(sizes)):
                src = self.source_map(sizes[i], self._num_tiles(sizes[i]))
                feats.append(self.reduce_full_tiles(batch["pixel_values"][i], sizes[i], method, sample_seeds[i]))
                n_in.append(len(src))
                newlines.append(int((src < 0).sum()))
        else:
            if tower:
                packed, hidden = self.encode_images(batch["pixel_values"], sizes, output_hidden_states=True)
            else:
                packed, hidden = self.encode_images(batch["pixel_values"], sizes), [None] * len(sizes)
            for i, f in enumerate(packed):
                src = self.source_map(sizes[i], self._num_tiles(sizes[i]))
                if len(src) != f.shape[0]:
                    raise ValueError(f"sample {i}: {f.shape[0]} packed tokens, the layout says {len(src)}")
                kept, where = self.select_image(f, src, method, sample_seeds[i], hidden[i])
                feats.append(kept)
                picks.append(where)
                n_in.append(int(f.shape[0]))
                newlines.append(int((src < 0).sum()))
        new_ids, new_mask, embeds, spans = self.assemble(ids, mask, n_in, feats)
        kept = [int(f.shape[0]) for f in feats]
        sent = newlines if self.sends_newlines(method) else [0] * len(newlines)
        extras = {"image_spans": spans, "sample_seeds": sample_seeds, "budget": self.budget, "newline_tokens": newlines,
                  "newline_tokens_kept": sent}
        if self.tile_masks(method) and self.text_tower_path is not None and batch.get("texts") is not None:
            from bench.models.clip_text import needs_text

            if needs_text(method):  # what the text side cost (CDPruner)
                extras["clip_text"] = self.clip_text_costs(batch["texts"])
        if (method.stage == "pre_llm" and method.prune_ratio > 0 and getattr(method, "renumber_positions", True) is False
                and picks and all(p is not None for p in picks)):
            from bench.models.llava import kept_position_ids

            # original ids (G-Prune's official code): each kept token at its unpruned position, decoding at last + 1
            t = new_ids.shape[1]
            extras["position_ids"] = torch.cat([
                kept_position_ids(ids[i : i + 1], mask[i : i + 1], picks[i].view(1, -1), [len(picks[i])], self.image_token_id, n_in[i], t)
                for i in range(len(picks))
            ]).to(self.device)
        return PreparedBatch(new_ids, embeds, new_mask, n_in, kept, extras=extras)

    # --------------------------------------------------------------- synthetic input and costs
    def probe_batch(self, batch_size: int = 1, seed: int = 0, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Synthetic prompt of :attr:`PROBE_TEXT` text ids around one image's packed tokens, with seeded random
        pixels for its tiles; the image is ``size`` ``(H, W)`` pixels, by default twice the tile on each side
        (672 x 672 for the 336 px tile: the 2 x 2 pinpoint, 576 + 2,304 tokens + 48 newlines)."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.config
        side = cfg.vision_config.image_size
        h, w = size or (2 * side, 2 * side)
        if h < 1 or w < 1:
            raise ConfigError(f"probe image size must be positive, got {h}x{w}")
        size = torch.tensor([h, w])
        tiles = self._num_tiles(size)
        n = len(self.source_map(size, tiles))
        before, after = self.PROBE_TEXT
        text = torch.randint(3, min(cfg.text_config.vocab_size, self.PROBE_VOCAB), (before + after,), generator=g)
        text[text == self.image_token_id] = 3
        ids = torch.cat([text[:before], torch.full((n,), self.image_token_id), text[before:]]).unsqueeze(0).repeat(batch_size, 1)
        pix = torch.randn(1, tiles, 3, side, side, generator=g).repeat(batch_size, 1, 1, 1, 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix, "image_sizes": size.view(1, 2).repeat(batch_size, 1),
                "texts": [self.PROBE_QUESTION] * batch_size}

    def flops_description(self) -> FlopsDescription:
        from dataclasses import replace

        return replace(super().flops_description(), family=self.family)

    def vision_stage(self, batch: dict[str, torch.Tensor]):
        return self.encode_images(batch["pixel_values"], batch["image_sizes"])

    def selection_stage(self, batch: dict[str, torch.Tensor], method: PruningMethod, sample_seeds: torch.Tensor):
        if method.stage == "in_llm" and self.flowcut_active(method):
            sizes = batch["image_sizes"].cpu()
            return lambda: [self.flowcut_image(batch["pixel_values"][i], sizes[i], method)[0] for i in range(len(sizes))]
        if method.stage == "in_llm" and self.vscan_active(method):
            sizes = batch["image_sizes"].cpu()
            return lambda: [self.vscan_image(batch["pixel_values"][i], sizes[i], method, sample_seeds[i]) for i in range(len(sizes))]
        if method.stage != "pre_llm":
            return None
        sizes = batch["image_sizes"].cpu()
        if self.tile_masks(method):
            texts = batch.get("texts") or [None] * len(sizes)
            enc = [self.tile_features(batch["pixel_values"][i], sizes[i]) for i in range(len(sizes))]
            srcs = [self.source_map(sizes[i], self._num_tiles(sizes[i])) for i in range(len(sizes))]
            unpad = TOWER_PORTS[method.name].get("unpad", True)

            def run():
                out = []
                for i, ((h, f), src) in enumerate(zip(enc, srcs)):
                    where = self.select_full_tile_masks(h, f, src, method, sample_seeds[i], texts[i])
                    out.append(self.packed_from_tiles(f, src, where) if unpad else self.stitched_rows(f, where, sizes[i]))
                return out
            return run
        if self.full_tiles(method):
            return lambda: [self.reduce_full_tiles(batch["pixel_values"][i], sizes[i], method, sample_seeds[i]) for i in range(len(sizes))]
        if method.needs and method.prune_ratio > 0:
            packed, hidden = self.encode_images(batch["pixel_values"], sizes, output_hidden_states=True)
        else:
            packed, hidden = self.encode_images(batch["pixel_values"], sizes), [None] * len(sizes)
        srcs = [self.source_map(sizes[i], self._num_tiles(sizes[i])) for i in range(len(packed))]
        return lambda: [self.select_image(f, src, method, sample_seeds[i], hidden[i]) for i, (f, src) in enumerate(zip(packed, srcs))]
