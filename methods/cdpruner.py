"""CDPruner: visual-token pruning by maximising conditional diversity (a question-conditioned DPP).

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", https://arxiv.org/abs/2506.10967 (code: Theia-4869/CDPruner, ``llava/model/llava_arch.py::encode_images``
and the CLIP text tower in ``llava/model/multimodal_encoder/clip_encoder.py``).

What the official code does, per image, and what decides the kept set here (read from the official code):

* **similarity** ``S = cos(x_i, x_j)`` of the *projected* tokens ``x`` (``mm_projector`` output, ``(N, D_llm)``):
  normalised in the model's dtype, then cast to float32, ``S = x_n @ x_n^T`` in float32;
* **relevance** of token ``i`` to the question, in CLIP's joint space: the image side is
  ``visual_projection(post_layernorm(h[-2][:, 1:]).float())`` (the feature layer's patch tokens, CLS dropped),
  the text side the CLIP text tower's ``text_embeds`` of the question, cut into 77-token chunks (``M`` of them);
  both L2-normalised, ``r_i = mean_m(-(e_i . t_m))``. The minus sign is deliberate (the maintainers say so in
  their issues 9, 14 and 22): the tokens *least* similar to the question score highest;
* **min-max normalisation** ``r = (r - min r + 1e-6) / (max r - min r)`` over the whole batch the official
  code encodes at once: one image at batch 1 on LLaVA-1.5 (its evaluation asserts ``batch_size == 1``). Here
  it runs per sample, which is the official value for every sample and keeps a sample's choice independent
  of its batch neighbours;
* **kernel** ``L_ij = r_i S_ij r_j`` (``(r_i * S_ij) * r_j`` in that order, float32);
* **greedy MAP inference** of the DPP (Chen et al. 2018, incremental Cholesky): exactly ``T`` steps, each
  ``j = argmax d_i^2`` (first index among ties), ``e = (L_j - c_{:i,j}^T c_{:i}) / sqrt(d_j^2)``,
  ``d^2 -= e^2``, ``d_j^2 = -inf``. Candidates often differ only in the last float32 bits, so the arithmetic
  (an ``einsum`` over the ``(T, B, N)`` buffer of rows ``c``) follows the official code's order;
* the picks become a boolean index mask (``scatter``), so kept tokens reach the LLM in raster order. If the
  kernel's rank is exhausted before ``T`` steps (``T > D``, e.g. on a tiny model), the official arithmetic
  divides by ``sqrt`` of a non-positive number, picks repeat, and the mask holds fewer than ``T`` tokens;
  that is kept as is (``n_kept`` says how many), never silently topped up.

``T = round(N (1 - prune_ratio))`` (the official ``--visual_token_num``, e.g. 64 of 576 is ratio 0.889).
The commented-out ``theta`` of the official code (``r <- exp(theta / (2 (1 - theta)) r)``) is the option
:attr:`CDPruner.theta`, off (``null``) by default as in the official code.

The question reaches CLIP's text tower through the model adapter (``needs``: ``clip_image_embeds``,
``clip_text_embeds``, ``clip_text_chunks``; see ``bench.models.clip_text``); this file holds the rule only.

On LLaVA-NeXT (official ``prepare_inputs_labels_for_multimodal``, anyres branch) the image's tiles (base + crops,
each a full 336 px grid before unpadding) are encoded as one batch: ``T`` picks per tile, the relevance min-max
normalised over all the image's tiles together, the DPP batched over them; the adapter passes the tiles as one
call with ``extras["clip_joint_batch"]`` set and unpads the tiles' index masks like the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext, VisualSelection


def conditional_kernel(vis: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, n_chunks: torch.Tensor,
                       theta: float | None = None, joint: bool = False) -> torch.Tensor:
    """The conditional DPP kernel ``L = diag(r) S diag(r)``, float32.

    Parameters
    ----------
    vis : torch.Tensor
        ``(B, N, D)`` projected visual tokens (model dtype).
    image_embeds : torch.Tensor
        ``(B, N, C)`` the same tokens in CLIP's joint space (float32, not normalised).
    text_embeds : torch.Tensor
        ``(B, M, C)`` text-tower embeddings of each sample's question chunks (float32, not normalised);
        rows past ``n_chunks[b]`` are padding.
    n_chunks : torch.Tensor
        ``(B,)`` number of 77-token chunks of each question (``>= 1``).
    theta : float, optional
        The official code's commented-out relevance exponent; ``None`` = off (official).
    joint : bool
        Min-max normalise the relevance over the whole ``(B, N)`` batch at once (the official
        ``relevance.min()`` / ``.max()``: on LLaVA-NeXT its batch is one image's tiles) instead of per row.

    Returns
    -------
    torch.Tensor
        ``(B, N, N)`` float32 kernel (float64 for float64 inputs).
    """
    # float32 as the official .float() (float64 inputs stay float64: the tests' exact references)
    xn = (vis / vis.norm(dim=-1, keepdim=True)).to(torch.promote_types(vis.dtype, torch.float32))
    similarity = torch.matmul(xn, xn.transpose(1, 2))
    image_embeds, text_embeds = image_embeds.to(xn.dtype), text_embeds.to(xn.dtype)
    ie = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    te = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    rel = torch.matmul(ie, te.transpose(1, 2))  # (B, N, M)
    m = te.shape[1]
    n_chunks = n_chunks.to(rel.device)
    if m == 1 or bool((n_chunks == m).all()):
        relevance = (-rel).mean(dim=-1)
    else:  # questions of different chunk counts in one batch: mean over each sample's own chunks
        valid = torch.arange(m, device=rel.device) < n_chunks.unsqueeze(1)
        relevance = (-rel).masked_fill(~valid.unsqueeze(1), 0.0).sum(dim=-1) / n_chunks.unsqueeze(1).to(rel.dtype)
    lo = relevance.amin() if joint else relevance.amin(dim=1, keepdim=True)
    hi = relevance.amax() if joint else relevance.amax(dim=1, keepdim=True)
    relevance = (relevance - lo + 1e-6) / (hi - lo)
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def greedy_dpp(kernel: torch.Tensor, t: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP: ``(B, N, N)`` float32 kernel -> ``(B, t)`` picks in pick order.

    Exactly ``t`` steps, batched, no host synchronisation; the arithmetic of the official loop.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    cis = torch.zeros((t, b, n), device=kernel.device, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = torch.empty((t, b), dtype=torch.long, device=kernel.device)
    for i in range(t):
        j = torch.argmax(di2s, dim=-1)
        picks[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s.scatter_(1, j.unsqueeze(1), -float("inf"))  # a device-side fill: capturable in a CUDA graph
    return picks.t()


def picks_to_kept(picks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official index mask of ``(B, T)`` picks as ``(B, T)`` ascending kept indices and ``(B,)`` counts.

    Repeated picks (a degenerate kernel) count once, as the mask does; rows past ``n_kept[b]`` hold the
    smallest dropped indices (padding the adapter discards).
    """
    b, t = picks.shape
    mask = torch.zeros(b, n, dtype=torch.bool, device=picks.device)
    mask.scatter_(1, picks, True)
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # kept first, each part ascending
    return order[:, :t], mask.sum(dim=1)


@dataclass
class CDPruner(PruningMethod):
    """CDPruner with the official rule; keeps ``round(N (1 - prune_ratio))`` tokens (official ``visual_token_num``).

    Parameters
    ----------
    theta : float, optional
        Relevance exponent of the paper's kernel variant, commented out in the official code; ``None`` (official)
        leaves the min-max-normalised relevance as is. In ``[0, 1)`` when set.
    """

    theta: float | None = None

    needs: ClassVar[frozenset[str]] = frozenset({"clip_image_embeds", "clip_text_embeds", "clip_text_chunks"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None:
            try:
                self.theta = float(self.theta)
            except (TypeError, ValueError):
                raise ConfigError(f"cdpruner: theta must be null or a number in [0, 1), got {self.theta!r}") from None
            if not 0.0 <= self.theta < 1.0:
                raise ConfigError(f"cdpruner: theta must be null or in [0, 1), got {self.theta}")

    def kernel(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, N)`` conditional kernel of a batch, from the adapter's CLIP quantities."""
        return conditional_kernel(vis, ctx.get("clip_image_embeds"), ctx.get("clip_text_embeds"), ctx.get("clip_text_chunks"), self.theta)

    def select_with_counts(self, vis: torch.Tensor, ctx: VisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, D)`` projected tokens -> ``(B, T)`` ascending kept indices and ``(B,)`` valid counts.

        The kernel and the greedy loop run one sample at a time: GEMM kernels are chosen by batch size, so a
        batched product differs from the batch-1 one in the last bits, and the DPP's near-ties (or a degenerate
        kernel's noise) would turn that into another kept set; per sample, every sample gets the official
        batch-1 arithmetic whatever its batch neighbours.
        """
        n, t = vis.shape[1], self.n_keep(vis.shape[1])
        img, txt, chunks = ctx.get("clip_image_embeds"), ctx.get("clip_text_embeds"), ctx.get("clip_text_chunks")
        if "clip_joint_batch" in ctx.extras and ctx.get("clip_joint_batch"):
            # the rows are the tiles of one image (LLaVA-NeXT): the official code encodes them as one batch,
            # min-max normalised together, the DPP batched over them
            m = int(chunks.max())
            return picks_to_kept(greedy_dpp(conditional_kernel(vis, img, txt[:, :m], chunks, self.theta, joint=True), t), n)
        picks = []
        for i in range(vis.shape[0]):
            m = int(chunks[i])
            k = conditional_kernel(vis[i : i + 1], img[i : i + 1], txt[i : i + 1, :m], chunks[i : i + 1], self.theta)
            picks.append(greedy_dpp(k, t))
        return picks_to_kept(torch.cat(picks), n)

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, T)`` ascending kept indices (rows past a degenerate kernel's count are padding; see :meth:`reduce`)."""
        return self.select_with_counts(vis, ctx)[0]

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, d = vis.shape
        if self.prune_ratio == 0.0:
            return super().reduce(vis, ctx)
        idx, n_kept = self.select_with_counts(vis, ctx)
        feats = vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        return VisualSelection(feats, idx, n_kept.cpu())

    def selection_flops(self, cost) -> int:
        """Per image: the CLIP text tower on the question's chunks (``cost.shapes.text_tower_flops``, from the
        adapter), the visual projection into CLIP's joint space (``2 N D_vis C``), the relevance (``2 N C M``),
        the ``N x N`` cosine matrix of the projected tokens (``2 N^2 D_llm``) and the greedy DPP's ``einsum``
        (step ``i`` is a ``1 x i`` by ``i x N`` product: ``2 N sum_i i = N T (T - 1)``)."""
        if self.prune_ratio == 0.0:
            return 0
        n, t = cost.n_visual, self.n_keep(cost.n_visual)
        sh = cost.shapes
        proj = getattr(sh, "clip_projection_dim", 0) or 0
        chunks = getattr(sh, "text_chunks", None) or (1,) * cost.batch
        per_image = 2 * n * cost.vision_width * proj + 2 * n * n * cost.llm_width + n * t * (t - 1)
        return int(cost.batch * per_image + sum(2 * n * proj * m for m in chunks) + (getattr(sh, "text_tower_flops", 0) or 0))
