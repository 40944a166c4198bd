"""Methods that act inside the vision tower (``stage == "in_vision"``): ToMe.

``encode_with_merging`` re-runs the CLIP encoder blocks itself, up to LLaVA's feature layer, so that
tokens can be merged between a block's attention and its MLP and the attention can carry ToMe's
``log(size)`` bias. Each block applies exactly the module's own ``layer_norm1``/projections/
``out_proj``/``layer_norm2``/``mlp``; the attention is transformers' eager formula (``q k^T * scale``,
float32 softmax, cast back) plus the bias. The blocks past the feature layer are not run (LLaVA does
not use them). Then the CLS row is dropped (``default`` strategy) and the projector applied.
"""

from __future__ import annotations

import torch

from bench.models.clip_extras import tower_has_cls, vision_model
from methods.base import VisualSelection
from methods.tome import bipartite_soft_matching, merge_wavg


def _attention(layer, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's self-attention on ``(B, T, C)`` with optional ``log(size)`` bias; returns ``(out, metric)``."""
    attn = layer.self_attn
    b, t, _ = x.shape
    shape = (b, t, attn.num_heads, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    w = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    if size is not None:
        w = w + size.log()[:, None, None, :, 0]
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p, v).transpose(1, 2).reshape(b, t, -1)
    return attn.out_proj(o), k.mean(dim=1)


def feature_block_count(model) -> int:
    """Number of blocks up to and including LLaVA's feature layer (23 for layer -2 of 24)."""
    n = len(vision_model(model).encoder.layers)
    fl = model.config.vision_feature_layer
    if not isinstance(fl, int):
        raise NotImplementedError("in-vision merging supports a single vision_feature_layer")
    return fl % (n + 1)


@torch.no_grad()
def merging_encoder(model, pixel_values: torch.Tensor, schedule: list[int], prop_attn: bool = True) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1 + T, C)`` feature-layer states after ToMe merging (CLS row 0)."""
    vm = vision_model(model)
    cls_token = tower_has_cls(model)
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    size = None
    for layer, r in zip(vm.encoder.layers[: len(schedule)], schedule):
        a, metric = _attention(layer, layer.layer_norm1(x), size if prop_attn else None)
        x = x + a
        merge, _ = bipartite_soft_matching(metric, r, cls_token)
        if size is not None or r > 0:  # ToMe's merge_wavg with r = 0 still rescales by size / size
            x, size = merge_wavg(merge, x, size)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


@torch.no_grad()
def encode_with_merging(adapter, pixel_values: torch.Tensor, method, sample_seeds: torch.Tensor) -> VisualSelection:
    """Run ``method`` (ToMe) inside the tower: ``(B, 3, H, W)`` -> :class:`VisualSelection` ``(B, T, D_llm)``."""
    model = adapter.model
    px = pixel_values.to(adapter.device, adapter.dtype)
    b = px.shape[0]
    n = adapter.grid[0] * adapter.grid[1]
    if method.prune_ratio == 0.0 and method.r is None:
        feats = adapter.encode_images(px)  # the unpruned path, bit for bit
        return VisualSelection(feats, torch.arange(n, device=feats.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
    has_cls = tower_has_cls(model)
    sched = method.schedule(n, feature_block_count(model), has_cls)
    x = merging_encoder(model, px, sched, bool(method.prop_attn))
    if has_cls and model.config.vision_feature_select_strategy == "default":
        x = x[:, 1:]
    feats = model.model.multi_modal_projector(x)
    return VisualSelection(feats, None, torch.full((b,), feats.shape[1], dtype=torch.long))
