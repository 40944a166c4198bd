"""Vision-tower quantities that pre-LLM methods ask for, recomputed from one layer's own input.

The tower always runs with the model's attention backend (SDPA); nothing here switches it to eager.
A method that needs, say, the CLS row of layer 22's attention gets it by re-running *only* what that
layer does to its input hidden state: ``layer_norm1``, ``q_proj``/``k_proj``, the head split, the
``head_dim ** -0.5`` scaling and a float32 softmax (exactly transformers' ``eager_attention_forward``).
``tests/test_vision_methods.py`` checks these rows against eager ``output_attentions``.

Keys (``PruningMethod.needs`` / ``VisionContext.extras``); ``L`` is an encoder-layer index in Python
convention (``-2`` = ``layers[-2]``, the one whose output LLaVA uses; its input is
``hidden_states[L - 1]`` and its output ``hidden_states[L]``, and ``attentions[L]`` is its attention):

``cls_attn:L``      ``(B, H, S)`` per-head attention probabilities of the CLS query row (CLS column included)
``attn_colmean:L``  ``(B, S)`` attention averaged over heads, then over all ``S`` query rows (HiPrune)
``keys:L``          ``(B, S, head_dim)`` keys averaged over heads (VisionZip / ToMe metric)
``q_proj:L``        ``(B, S, D_vis)`` raw ``q_proj`` output, full width (PruMerge)
``k_proj:L``        ``(B, S, D_vis)`` raw ``k_proj`` output, full width (PruMerge)
``hidden:L``        ``(B, S, D_vis)`` output of layer ``L`` (``hidden_states[L]``), CLS row included
``projector``       the multimodal projector itself, a ``(..., D_vis) -> (..., D_llm)`` callable (merging
                    methods merge in the tower's space and project the result)

``clip_image_embeds``, ``clip_text_embeds``, ``clip_text_chunks``: CLIP's joint space and the question's text
tower (CDPruner); served by the adapter from ``bench.models.clip_text``, not here (``build_extras`` skips them).

``L@R`` (e.g. ``attn_colmean:8@24``) names layer ``L`` of an ``R``-layer reference tower: on a tower of
another depth ``n`` a non-negative ``L`` becomes ``round(L * n / R)`` (the convention the in-LLM
methods use for schedules), so a method tuned on CLIP ViT-L (24 layers) also runs on small towers.

``S = 1 + N`` when the tower has a CLS token, else ``N``. ``build_extras`` is lazy: each entry is a
closure, computed (once) only when a method calls ``ctx.get(key)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from bench.errors import IncompatibleMethodError

KINDS = ("cls_attn", "attn_colmean", "keys", "q_proj", "k_proj", "hidden")
#: keys of the CLIP text side (``bench.models.clip_text``): parsed here, served by the adapter
TEXT_KEYS = ("clip_image_embeds", "clip_text_embeds", "clip_text_chunks")


def vision_model(model):
    """The CLIP-style vision transformer inside a LLaVA model (``.vision_model`` if wrapped)."""
    vt = model.model.vision_tower if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model.vision_tower
    return getattr(vt, "vision_model", vt)


def tower_has_cls(model) -> bool:
    vt = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    return getattr(vt.config, "model_type", "") in ("clip_vision_model", "clip")


def parse_key(key: str) -> tuple[str, int | None, int | None]:
    """``"cls_attn:-2"`` -> ``("cls_attn", -2, None)``; ``"attn_colmean:8@24"`` -> ``(..., 8, 24)``."""
    if key == "projector" or key in TEXT_KEYS:
        return key, None, None
    kind, _, layer = key.partition(":")
    layer, _, ref = layer.partition("@")
    if kind not in KINDS or not layer.lstrip("-").isdigit() or (ref and not ref.isdigit()):
        raise IncompatibleMethodError(f"unknown vision extra {key!r}; known: projector, " + ", ".join(f"{k}:<layer>[@<ref_layers>]" for k in KINDS))
    return kind, int(layer), (int(ref) if ref else None)


def resolve_layer(layer: int, ref: int | None, n_layers: int) -> int:
    """Layer index on an ``n_layers`` tower for ``layer`` given on a ``ref``-layer reference tower."""
    if ref is None or ref == n_layers or layer < 0:
        return layer
    return min(n_layers - 1, max(0, int(round(layer * n_layers / ref))))


def layer_qk(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_proj``/``k_proj`` outputs of one CLIP encoder layer for its input ``x`` ``(B, S, D)``."""
    h = layer.layer_norm1(x)
    return layer.self_attn.q_proj(h), layer.self_attn.k_proj(h)


def attention_probs(layer, q: torch.Tensor, k: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """``(B, H, R, S)`` softmax probabilities as transformers' eager CLIP attention computes them.

    ``rows`` restricts the query rows (e.g. ``slice(0, 1)`` for the CLS row) so that only those rows
    are ever materialised.
    """
    attn = layer.self_attn
    b, s, _ = q.shape
    heads, hd = attn.num_heads, attn.head_dim
    qh = q.view(b, s, heads, hd).transpose(1, 2)
    kh = k.view(b, s, heads, hd).transpose(1, 2)
    if rows is not None:
        qh = qh[:, :, rows]
    w = torch.matmul(qh, kh.transpose(-1, -2)) * attn.scale
    return torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)


def build_extras(model, hidden_states, needs) -> dict[str, Callable[[], object]]:
    """Lazy closures for every key of ``needs`` (see the module docstring for the keys).

    Parameters
    ----------
    model : LlavaForConditionalGeneration
    hidden_states : tuple of torch.Tensor
        The tower's ``(B, S, D_vis)`` hidden states from the forward pass whose features the method
        receives (embeddings after ``pre_layrnorm``, then every layer's output).
    needs : iterable of str
    """
    vm = vision_model(model)
    layers = vm.encoder.layers
    n_layers = len(layers)
    has_cls = tower_has_cls(model)
    cache: dict[tuple, torch.Tensor] = {}

    def norm(li: int) -> int:
        if not -n_layers <= li < n_layers:
            raise IncompatibleMethodError(f"vision layer {li} does not exist in a {n_layers}-layer tower")
        return li % n_layers

    def qk(li: int):
        if ("qk", li) not in cache:
            if hidden_states is None:
                raise IncompatibleMethodError("vision extras need the tower's hidden states")
            cache[("qk", li)] = layer_qk(layers[li], hidden_states[li])
        return cache[("qk", li)]

    def compute(kind: str, li: int):
        if kind == "hidden":
            return hidden_states[li + 1]
        q, k = qk(li)
        if kind == "q_proj":
            return q
        if kind == "k_proj":
            return k
        if kind == "keys":
            attn = layers[li].self_attn
            b, s, _ = k.shape
            return k.view(b, s, attn.num_heads, attn.head_dim).mean(dim=2)
        if kind == "cls_attn":
            if not has_cls:
                raise IncompatibleMethodError("cls_attn needs a vision tower with a CLS token")
            return attention_probs(layers[li], q, k, rows=slice(0, 1))[:, :, 0]
        if kind == "attn_colmean":
            # head mean first, then query mean: the order of the official code's two .mean() calls
            return attention_probs(layers[li], q, k).mean(dim=1).mean(dim=1)
        raise AssertionError(kind)

    def make(key: str):
        kind, li, ref = parse_key(key)
        if kind == "projector":
            proj = model.model.multi_modal_projector if hasattr(model, "model") else model.multi_modal_projector
            return lambda: proj
        if kind == "cls_attn" and not has_cls:
            raise IncompatibleMethodError(f"{key}: this vision tower has no CLS token")

        def get():
            i = norm(resolve_layer(li, ref, n_layers))  # checked on use, so the method can name the config field in its error
            if (kind, i) not in cache:
                cache[(kind, i)] = compute(kind, i)
            return cache[(kind, i)]

        return get

    return {key: make(key) for key in needs if key not in TEXT_KEYS}


def hidden_indices(model, needs) -> list[int]:
    """Indices into the tower's ``hidden_states`` that :func:`build_extras` reads for ``needs``, ascending."""
    n_layers = len(vision_model(model).encoder.layers)
    out = set()
    for key in needs:
        kind, li, ref = parse_key(key)
        if kind == "projector" or kind in TEXT_KEYS:
            continue
        i = resolve_layer(li, ref, n_layers)
        if not -n_layers <= i < n_layers:
            raise IncompatibleMethodError(f"vision layer {i} does not exist in a {n_layers}-layer tower")
        out.add(i % n_layers + (1 if kind == "hidden" else 0))
    return sorted(out)


class GraphedSelection:
    """A pre-LLM method's extras + ``reduce`` on CUDA, replayed from captured CUDA graphs.

    Only for methods with ``graph_safe`` (deterministic, no host sync, value-independent output
    shapes, ``ctx.sample_seeds`` unused). The graph's inputs are the projected features and only the
    hidden states the method's extras read (:func:`hidden_indices`); outputs are bit-identical to
    ``method.reduce(feats, VisionContext(..., build_extras(model, hidden_states, method.needs)))``.
    A method whose ``select`` reads only the features' shape (``select_reads_shape_only``) and that
    keeps the default ``reduce`` has only its selection in the graph (``select_only``); the features
    are gathered after the replay, as ``reduce`` gathers them.
    """

    def __init__(self, model, method, grid: tuple[int, int], has_cls: bool) -> None:
        from methods.base import CudaGraphCache, PruningMethod, VisionContext

        if not method.graph_safe:
            raise ValueError(f"method {method.name!r} is not CUDA-graph safe")
        self.method = method
        self.index = hidden_indices(model, method.needs)
        # picks from the extras alone, gathered by the default reduce: the graph needs no features (a copy
        # of all of them into its static input saved), and the gather runs after the replay
        self.select_only = (method.select_reads_shape_only and type(method).reduce is PruningMethod.reduce
                            and method.prune_ratio > 0 and bool(self.index))
        n = self.n_tokens = grid[0] * grid[1]

        def context(b, hs):
            return VisionContext(grid, has_cls, torch.zeros(b, dtype=torch.long), build_extras(model, dict(zip(self.index, hs)), method.needs))

        #: the method projects its own tokens and reads only the features' shape: they stay out of the graph
        self.own_projection = bool(method.projects_own_tokens) and bool(self.index)
        d_llm, dtype = model.config.text_config.hidden_size, model.dtype

        def fn(feats, *hs):
            sel = method.reduce(feats, context(feats.shape[0], hs))
            return sel.features, sel.kept_index, sel.n_kept

        def fn_own(*hs):
            b = hs[0].shape[0]
            return fn(torch.zeros((), dtype=dtype, device=hs[0].device).expand(b, n, d_llm), *hs)

        def select(*hs):  # the features' shape, no values (select_only: hs is never empty)
            b = hs[0].shape[0]
            return method.select(hs[0].new_empty(b, n, 0), context(b, hs))

        self.cache = CudaGraphCache(select if self.select_only else (fn_own if self.own_projection else fn))

    def __call__(self, feats: torch.Tensor, hidden_states):
        from methods.base import VisualSelection, gather_selection

        hs = [hidden_states[i] for i in self.index]
        if self.select_only:
            if feats.shape[1] != self.n_tokens:
                raise ValueError(f"{self.method.name}: {feats.shape[1]} features for a grid of {self.n_tokens} patches")
            return gather_selection(feats, self.cache(*hs))
        f, k, n = self.cache(*hs) if self.own_projection else self.cache(feats, *hs)
        return VisualSelection(f, k, n)
