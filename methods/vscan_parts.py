"""VScan's settings check and its stage schedule under the harness's budget modes (:class:`methods.vscan.VScan`
mixes it in).

Budget (``budget``): the official run keeps 96 before the LLM and 32 from layer 16 on, a mean of 64 over
the 32 layers. ``layer_mean`` (default) scales both counts by one factor so that this nominal mean is
``round(N (1 - ratio))``: 96/32 at 64, 216/72 at 144, 432/144 at 288 (the real mean is lower when the
local scan floors, as in the official code). ``after_prune``: ``P = round(N (1 - ratio))`` and the LLM
counts in the official proportion. ``official``: ``visual_token_num`` and ``image_token_list`` as given
(the ratio is not used).

Ports (documented): the official code runs one image per batch (its merge stacks per-sample tensors); here the
selection is batched and the merge runs per sample (:func:`common_count`). Its CLIP attention is the eager one of
``output_attentions``; here the CLS rows are recomputed from the layer's q/k (``bench.models.clip_extras``, tested
equal). The official ``window_cls_selection`` asserts a 24 x 24 grid; here any grid with at least one full window runs
(:func:`check_window`; windows that do not fit are left out, as the official loop's ``H // window_size``). The merge
uses the official ``scatter_add_``: on CUDA its float atomics make the merged features' last bits run-dependent, as
in the official code (the kept indices are deterministic).
"""

from __future__ import annotations

import torch

from bench.errors import ConfigError, IncompatibleMethodError
from methods.inllm import Stage, per_layer_counts, scale_layer
from methods.vscan_ports import VScanQwenPort


def check_window(grid: tuple[int, int], window: int) -> int:
    """``window`` where the ``(H, W)`` patch grid holds at least one ``window x window`` window, else refused."""
    if grid[0] < window or grid[1] < window:
        raise IncompatibleMethodError(f"vscan: a {grid[0]}x{grid[1]} patch grid holds no {window}x{window} window")
    return window


def common_count(mask: torch.Tensor) -> int:
    """The kept count shared by every sample of a ``(B, N)`` kept mask; refused where they differ (only when a deep
    attention underflows to 0 next to the local picks: the global picks then fall on local ones)."""
    k = mask.sum(dim=1)
    if bool((k != k[0]).any()):
        raise IncompatibleMethodError(f"vscan: the samples of this batch keep {k.tolist()} tokens (global picks fell on local ones); run it with batch size 1")
    return int(k[0])


def nearest_matmul(rest: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``merge_similarity: matmul`` (named deviation): ``(1, R, D)`` dropped and ``(1, K, D)`` kept tokens -> ``(1, R)``
    each dropped token's kept token of highest cosine from one ``R x K`` product of normalised rows (the official
    ``F.cosine_similarity`` over ``(R, K, D)``'s cosines up to the last bits: a near-tie may assign differently)."""
    kn = kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    rn = rest / rest.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (rn @ kn.transpose(1, 2)).argmax(dim=2)


class VScanBudget(VScanQwenPort):
    """The pre-LLM budget ``P`` and the in-LLM stages of both ports, and what a run's budget counts."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_settings()

    def check_settings(self) -> None:
        """Refuse (:class:`ConfigError`, exit code 2) settings the rule cannot run."""
        if len(self.layer_list) != len(self.image_token_list) or not self.layer_list:
            raise ConfigError(f"vscan: layer_list {self.layer_list} and image_token_list {self.image_token_list} need one count per layer")
        if int(self.visual_token_num) < 1 or any(int(c) < 1 for c in self.image_token_list):
            raise ConfigError("vscan: visual_token_num and image_token_list must be >= 1")
        if not 0.0 <= float(self.global_ratio) <= 1.0 or int(self.window_size) < 1:
            raise ConfigError(f"vscan: global_ratio must be in [0, 1] and window_size >= 1, got {self.global_ratio}, {self.window_size}")
        if self.llm_span not in ("official", "image"):
            raise ConfigError(f"vscan: llm_span must be official or image, got {self.llm_span!r}")
        if self.port not in ("auto", "llava", "qwen25vl"):
            raise ConfigError(f"vscan: port must be auto, llava or qwen25vl, got {self.port!r}")
        self.check_qwen_settings()
        if self.merge_similarity not in ("cosine_similarity", "matmul"):
            raise ConfigError(f"vscan: merge_similarity must be cosine_similarity or matmul, got {self.merge_similarity!r}")

    # -------------------------------------------------------------- budget
    def counts(self, n: int) -> tuple[int, list[int]]:
        """Nominal ``(P, [in-LLM counts])`` for ``n`` visual tokens, solved on the ``ref_layers``-deep LLM the
        layer indices refer to (the pre-LLM selection runs before the LLM's depth is known to the method)."""
        n_layers = int(self.ref_layers)
        p0, qs0 = int(self.visual_token_num), [int(c) for c in self.image_token_list]
        if self.budget == "official":
            return min(p0, n), [min(q, p0, n) for q in qs0]
        target = self.target(n)
        if self.budget == "after_prune":
            scale = target / p0
        else:
            layers = self.layers_for(n_layers)
            scale = target * n_layers / sum(per_layer_counts(list(zip(layers, qs0)), p0, n_layers))
        p = max(1, min(n, round(p0 * scale)))
        qs = [max(1, min(p, round(q * scale))) for q in qs0]
        if self.budget == "layer_mean" and p == n:  # P capped at N: the in-LLM counts carry the rest of the mean
            layers = self.layers_for(n_layers)
            rest = sum(per_layer_counts(list(zip(layers, qs0)), 0, n_layers))
            scale_q = (target * n_layers - layers[0] * n) / max(rest, 1)
            qs = [max(1, min(n, round(q * scale_q))) for q in qs0]
        if self.budget == "layer_mean":
            mean = sum(per_layer_counts(list(zip(self.layers_for(n_layers), qs)), p, n_layers)) / n_layers
            self._warn_infeasible(mean, target, n_layers)
        return p, qs

    def last_row_flops(self, cost, kept: int) -> int:
        """One image's in-LLM stages: the last token's attention row with each stage layer's k/q projections run on
        its input (``cost``: :class:`bench.measure.flops.CostModel`), from ``kept`` tokens after the pre-LLM selection."""
        total, cur_t, cur = 0, cost.shapes.seq_len, kept  # the sequence entering the first stage: the LLM input
        for st in self.plan_for(cost.n_visual, kept, int(self.qwen_ref_layers if self.qwen else self.ref_layers)):  # counts only: any depth
            total += cost.attention_rows(cur_t, 1, True)
            cur_t, cur = cur_t - (cur - st.n_keep), st.n_keep
        return total

    def planned_counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Visual tokens entering each layer: ``P`` from the first layer (the pre-LLM selection), then the stages."""
        if self.prune_ratio == 0.0 and self.budget != "official":
            return [n_vis] * n_layers
        p = min(self.qwen_pre_count(n_vis) if self.qwen else self.counts(n_vis)[0], n_vis)
        return per_layer_counts([(s.layer, s.n_keep) for s in self.plan_for(n_vis, p, n_layers)], p, n_layers)

    def measure(self, per_layer: list[float], n_vis: int, n_layers: int) -> float:
        """``after_prune`` counts the tokens the pre-LLM selection keeps (``P``, entering the first layer)."""
        if self.budget_measure == "after_prune":
            return float(per_layer[0])
        return super().measure(per_layer, n_vis, n_layers)

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, self.ref_layers) for x in self.layer_list]

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        """Stages for ``n_vis`` visual tokens entering the LLM when the tower gave ``n_vis`` (no pre-LLM loss)."""
        return self.plan_for(n_vis, n_vis, n_layers)

    def plan_for(self, n_grid: int, n_in: int, n_layers: int) -> list[Stage]:
        """In-LLM stages after the pre-LLM selection kept ``n_in`` of the tower's ``n_grid`` tokens: the
        official ``min(image_token_list[s], tokens present)``."""
        if self.prune_ratio == 0.0 and self.budget != "official":
            return []
        if self.qwen:  # original 3-D positions kept; counts from the tokens present (official int(ratio * n))
            return [Stage(layer, max(1, q), False) for layer, q in zip(self.qwen_layers(n_layers), self.qwen_stage_counts(n_in))]
        _, qs = self.counts(n_grid)
        out, cur = [], n_in
        for layer, q in zip(self.layers_for(n_layers), qs):
            cur = min(q, cur)
            out.append(Stage(layer, cur, True))
        return out
