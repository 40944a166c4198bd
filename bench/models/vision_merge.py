"""Methods that act inside the vision tower (``stage == "in_vision"``): ToMe.

``encode_with_merging`` re-runs the CLIP encoder blocks itself, up to LLaVA's feature layer, so that
tokens can be merged between a block's attention and its MLP and the attention can carry ToMe's
``log(size)`` bias. Each block applies exactly the module's own ``layer_norm1``/projections/
``out_proj``/``layer_norm2``/``mlp``; the attention is ``scaled_dot_product_attention`` with the
``log(size)`` bias as an additive float mask (``(B, 1, 1, T)``, broadcast over heads and queries), so
the fused SDPA kernels run instead of materialising the ``T x T`` probabilities. The blocks past the
feature layer are not run (LLaVA does not use them). Then the CLS row is dropped (``default``
strategy) and the projector applied.

Every step is free of host synchronisation and its shapes follow from the schedule alone, so the
whole merging tower is CUDA-graph capturable; on CUDA the adapter replays it from a graph
(``graphs=True``), with bit-identical outputs (the merge is deterministic: no float atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.models.clip_extras import tower_has_cls, vision_model
from methods.base import CudaGraphCache, VisualSelection
from methods.tome import bipartite_soft_matching, merge_wavg


def _attention(layer, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's self-attention on ``(B, T, C)`` with optional ``log(size)`` bias; returns ``(out, metric)``."""
    attn = layer.self_attn
    b, t, _ = x.shape
    shape = (b, t, attn.num_heads, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.out_proj(o.transpose(1, 2).reshape(b, t, -1)), k.mean(dim=1)


def merge_step(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int, class_token: bool):
    """ToMe's per-block matching + size-weighted merge: ``(B, T, C)`` -> ``(B, T - r, C)`` and sizes."""
    m = bipartite_soft_matching(metric, r, class_token)
    if size is not None or r > 0:  # ToMe's merge_wavg with r = 0 still rescales by size / size
        x, size = merge_wavg(x, size, m)
    return x, size


def feature_block_count(model) -> int:
    """Number of blocks up to and including LLaVA's feature layer (23 for layer -2 of 24)."""
    n = len(vision_model(model).encoder.layers)
    fl = model.config.vision_feature_layer
    if not isinstance(fl, int):
        raise NotImplementedError("in-vision merging supports a single vision_feature_layer")
    return fl % (n + 1)


@torch.no_grad()
def merging_encoder(model, pixel_values: torch.Tensor, schedule: list[int], prop_attn: bool = True, trace: list | None = None) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1 + T, C)`` feature-layer states after ToMe merging (CLS row 0).

    ``trace``, when given, receives each block's merge inputs ``(x, size, metric, r)`` (for timing the
    matching + merge alone).
    """
    vm = vision_model(model)
    cls_token = tower_has_cls(model)
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    size = None
    for layer, r in zip(vm.encoder.layers[: len(schedule)], schedule):
        a, metric = _attention(layer, layer.layer_norm1(x), size if prop_attn else None)
        x = x + a
        if trace is not None:
            trace.append((x, size, metric, r))
        x, size = merge_step(x, size, metric, r, cls_token)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def merged_features(model, pixel_values: torch.Tensor, schedule: list[int], prop_attn: bool = True) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, T, D_llm)``: the merging tower, the feature-select strategy, the projector."""
    x = merging_encoder(model, pixel_values, schedule, prop_attn)
    if tower_has_cls(model) and model.config.vision_feature_select_strategy == "default":
        x = x[:, 1:]
    return model.model.multi_modal_projector(x)


@torch.no_grad()
def encode_with_merging(adapter, pixel_values: torch.Tensor, method, sample_seeds: torch.Tensor, graphs: bool = False) -> VisualSelection:
    """Run ``method`` (ToMe) inside the tower: ``(B, 3, H, W)`` -> :class:`VisualSelection` ``(B, T, D_llm)``.

    ``graphs``: replay the merging tower from a CUDA graph cached on the adapter (CUDA only). On CUDA
    with the adapter's ``per_image_vision`` each image is merged alone, as ``encode_images`` does.
    """
    model = adapter.model
    px = pixel_values.to(adapter.device, adapter.dtype)
    b = px.shape[0]
    n = adapter.grid[0] * adapter.grid[1]
    if method.prune_ratio == 0.0 and method.r is None:
        feats = adapter.encode_images(px)  # the unpruned path, bit for bit
        return VisualSelection(feats, torch.arange(n, device=feats.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
    sched = method.schedule(n, feature_block_count(model), tower_has_cls(model))
    prop = bool(method.prop_attn)
    if graphs and px.is_cuda:
        run = adapter.cached_graph(("merging_tower", tuple(sched), prop), lambda: CudaGraphCache(lambda p: merged_features(model, p, sched, prop)))
    else:
        run = lambda p: merged_features(model, p, sched, prop)  # noqa: E731
    if px.is_cuda and getattr(adapter, "per_image_vision", False):  # as LlavaAdapter.encode_images: batch-independent features
        feats = torch.cat([run(px[i : i + 1]) for i in range(b)])
    else:
        feats = run(px)
    return VisualSelection(feats, None, torch.full((b,), feats.shape[1], dtype=torch.long))
