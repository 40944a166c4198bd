"""Methods that drop tokens between CLIP blocks (``stage == "in_vision"`` with ``after_block``): FlowCut.

``encode_with_pruning`` re-runs the CLIP encoder blocks itself, up to LLaVA's feature layer, with each
module's own ``layer_norm1``/projections/``out_proj``/``layer_norm2``/``mlp`` and SDPA attention (the
harness's one attention backend). Per block it also hands the method what the method scores with:

* the CLS query's attention probabilities, recomputed for that one row the way the official patched
  ``CLIPAttention_forward`` computes them (``(q * scale) . k^T``, softmax over the keys);
* the block's values per head, ``(B, H, S, d)``.

After each block the method returns the tokens that enter the next one (FlowCut's cut). Blocks past
the feature layer are not run (LLaVA does not use them); then the CLS row is dropped (``default``
strategy) and the projector applied.

FlowCut's token counts depend on each image's attention, so images are run one at a time: a sample's
tokens never depend on its batch neighbours (its official code cuts every image of a batch by the
batch maximum). Each image's visual-token count entering every block is recorded
(``VisualSelection.extras["vision_tokens_per_layer"]``) for the FLOPs model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.models.clip_extras import tower_has_cls, vision_model
from bench.models.vision_merge import feature_block_count
from methods.base import VisualSelection


def block_with_cls_row(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CLIP encoder block on ``(B, S, C)``; returns its output, the CLS row ``(B, H, S)`` and values ``(B, H, S, d)``."""
    attn = layer.self_attn
    b, s, _ = x.shape
    h = layer.layer_norm1(x)
    shape = (b, s, attn.num_heads, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    x = x + attn.out_proj(o.transpose(1, 2).reshape(b, s, -1))
    x = x + layer.mlp(layer.layer_norm2(x))
    cls_row = ((q[:, :, :1] * attn.scale) @ k.transpose(-1, -2)).softmax(dim=-1).squeeze(2)
    return x, cls_row, v


@torch.no_grad()
def pruning_encoder(model, pixel_values: torch.Tensor, method, n_visual: int, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(B, 3, H, W)`` -> feature-layer states ``(B, 1 + T, C)``, the kept patches' original indices
    ``(B, T)`` and the visual tokens entering each block (one image, or one LLaVA-NeXT image's tiles: the batch is
    cut alike). ``keep``: the patches to keep (default ``method.n_keep(n_visual)``; FlowCut's LLaVA-NeXT port: per tile)."""
    vm = vision_model(model)
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    n_blocks = feature_block_count(model)
    state = {"n": n_visual, "keep": method.n_keep(n_visual) if keep is None else int(keep), "kept": torch.arange(n_visual, device=x.device).expand(x.shape[0], n_visual)}
    counts = []
    for i, layer in enumerate(vm.encoder.layers[:n_blocks]):
        counts.append(x.shape[1] - 1)
        x, cls_row, v = block_with_cls_row(layer, x)
        x = method.after_block(i, n_blocks, x, cls_row, v, state)
    return x, state["kept"], counts


@torch.no_grad()
def encode_with_pruning(adapter, pixel_values: torch.Tensor, method) -> VisualSelection:
    """Run ``method`` (FlowCut) inside the tower, one image at a time: ``(B, 3, H, W)`` -> :class:`VisualSelection`."""
    model = adapter.model
    if not tower_has_cls(model):
        from bench.errors import IncompatibleMethodError

        raise IncompatibleMethodError(f"method {method.name!r} scores by CLS attention, but this vision tower has no CLS token")
    px = pixel_values.to(adapter.device, adapter.dtype)
    b = px.shape[0]
    n = adapter.grid[0] * adapter.grid[1]
    if method.prune_ratio == 0.0:
        feats = adapter.encode_images(px)  # the unpruned path, bit for bit
        return VisualSelection(feats, torch.arange(n, device=feats.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
    feats, kept, counts = [], [], []
    for i in range(b):
        x, k, c = pruning_encoder(model, px[i : i + 1], method, n)
        if model.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        feats.append(model.model.multi_modal_projector(x))
        kept.append(k)
        counts.append(c)
    feats = torch.cat(feats)
    sel = VisualSelection(feats, None, torch.full((b,), feats.shape[1], dtype=torch.long))
    sel.extras["kept_patches"] = torch.cat(kept)
    sel.extras["vision_tokens_per_layer"] = counts
    return sel
