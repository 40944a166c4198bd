"""Plain, loop-style references of the vision-side rules, and synthetic tower extras for unit tests.

Each reference is written from methods.md (sections 1 and 1b) and the official code's behaviour, one
sample at a time with Python lists and loops, deliberately unlike the vectorised versions in
``methods/``; ``tests/test_vision_methods.py`` checks that both agree on many random inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.base import VisionContext


# ----------------------------------------------------------------------------- synthetic extras
def synthetic_extras(vis: torch.Tensor, needs, heads: int = 4, seed: int = 1234) -> dict:
    """Tower-like extras derived from ``(B, N, D)`` projected features, one sample at a time.

    The "layer features" are ``[mean(vis); vis]`` (a CLS row, then the patches), ``q``/``k`` fixed
    random projections of them, the attention rows/means their softmax; the projector is the identity.
    Every key is computed per sample, so a sample's extras do not depend on its batch neighbours.
    """
    b, n, d = vis.shape
    g = torch.Generator().manual_seed(seed)
    wq = torch.randn(d, d, generator=g, dtype=vis.dtype) / math.sqrt(d)
    wk = torch.randn(d, d, generator=g, dtype=vis.dtype) / math.sqrt(d)
    hd = d // heads
    wc = torch.randn(d, 32, generator=g, dtype=vis.dtype) / math.sqrt(d)

    def per_sample(i):
        h = torch.cat([vis[i].mean(0, keepdim=True), vis[i]])  # (S, D)
        q, k = h @ wq, h @ wk
        qh, kh = q.view(-1, heads, hd).transpose(0, 1), k.view(-1, heads, hd).transpose(0, 1)
        p = torch.softmax(qh @ kh.transpose(-1, -2) * hd**-0.5, dim=-1)  # (H, S, S)
        # CLIP's joint space (CDPruner): the patches and a one-chunk "question" (their mean) through a fixed projection
        joint = (h @ wc).float()
        return {"hidden": h, "q_proj": q, "k_proj": k, "keys": k.view(-1, heads, hd).mean(1), "cls_attn": p[:, 0], "attn_colmean": p.mean(0).mean(0),
                "clip_image_embeds": joint[1:], "clip_text_embeds": joint[:1] + 0.1 * joint[1:2], "clip_text_chunks": torch.tensor(1)}

    rows = [per_sample(i) for i in range(b)]
    out = {}
    for key in needs:
        if key == "projector":
            out[key] = lambda: (lambda x: x)
            continue
        kind = key.split(":")[0]
        out[key] = (lambda kind=kind: torch.stack([r[kind] for r in rows]))
    return out


def random_extras(b: int, n: int = 576, d: int = 64, heads: int = 4, gen: torch.Generator | None = None, peaked: bool = True) -> dict:
    """Random tower tensors of the real token count (``S = 1 + n``), as plain tensors per kind."""
    g = gen or torch.Generator().manual_seed(0)
    s = n + 1
    hidden = torch.randn(b, s, d, generator=g)
    logits = torch.randn(b, heads, s, s, generator=g) * (3.0 if peaked else 1.0)
    p = torch.softmax(logits, dim=-1)
    k = torch.randn(b, s, d, generator=g)
    q = torch.randn(b, s, d, generator=g) * 0.3
    return {"hidden": hidden, "cls_attn": p[:, :, 0], "attn_colmean": p.mean(1).mean(1), "keys": torch.randn(b, s, d // heads, generator=g), "q_proj": q, "k_proj": k}


def ctx_from(tensors: dict, needs, grid=(24, 24), has_cls=True, b: int | None = None) -> VisionContext:
    """A :class:`VisionContext` serving ``tensors`` (kind -> tensor) under every key of ``needs``."""
    extras = {}
    for key in needs:
        if key == "projector":
            extras[key] = lambda: (lambda x: x)
        else:
            extras[key] = (lambda t=tensors[key.split(":")[0]]: t)
    bb = b if b is not None else next(iter(tensors.values())).shape[0]
    return VisionContext(grid=grid, has_cls=has_cls, sample_seeds=torch.arange(bb), extras=extras)


def argsort_desc(values: list[float]) -> list[int]:
    """Indices by descending value, first index first among ties (Python's stable sort)."""
    return sorted(range(len(values)), key=lambda j: -values[j])


# ----------------------------------------------------------------------------- references
def ref_fastervlm(cls_attn: torch.Tensor, k: int) -> list[int]:
    """``cls_attn`` ``(H, S)`` -> sorted kept patch indices."""
    h, s = cls_attn.shape
    score = [sum(float(cls_attn[i, j]) for i in range(h)) / h for j in range(1, s)]
    return sorted(argsort_desc(score)[:k])


def ref_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The official loop: index the selected rows of ``D = 1 - cos`` and take their column minimum."""
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.t()
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = dist.topk(2, dim=0, largest=False).values[1]
        else:
            scores = dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


def ref_vispruner(score: torch.Tensor, feats: torch.Tensor, t: int, ratio: float, step: int = 8) -> list[int]:
    n_imp = int(t * ratio)
    n_div = t - n_imp
    order = argsort_desc(score.tolist())
    imp, res = order[:n_imp], order[n_imp:]
    xn = feats / feats.norm(dim=-1, keepdim=True)
    full = xn @ xn.t()  # every pair's cosine once; a round reads its (even, odd) entries
    while True:
        r = min(step, len(res) - n_div)
        if r <= 0:
            break
        evens, odds = res[0::2], res[1::2]
        cols = torch.tensor(odds)
        best = [float(full[e, cols].max()) for e in evens]
        survivors = [evens[i] for i in argsort_desc(best)[r:]]
        res = survivors + odds
    return sorted(imp + res)


def ref_vispruner_official(score: torch.Tensor, feats: torch.Tensor, t: int, ratio: float, step: int = 8) -> list[int]:
    """VisPruner's official ``encode_images`` for one image, line by line: both rankings are
    ``argsort(dim=-1, descending=True)`` (torch's non-stable sort) on ``(1, L)`` rows, one GEMM per round on
    the gathered halves. ``(N,)`` scores, ``(N, C)`` features -> sorted kept indices."""
    important = int(t * ratio)
    diverse = t - important
    token_indices = score.view(1, -1).argsort(dim=-1, descending=True)
    important_indices, residual_indices = token_indices[:, :important], token_indices[:, important:]
    normalized = feats / feats.norm(dim=-1, keepdim=True)
    while diverse > 0:
        big_r = residual_indices.shape[1]
        r = min(step, big_r - diverse)
        if r <= 0:
            break
        tokens = normalized[residual_indices[0]].unsqueeze(0)
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([residual_indices[..., ::2][:, distinct[0]], residual_indices[..., 1::2]], dim=-1)
    return sorted(important_indices[0].tolist() + residual_indices[0].tolist())


def ref_hiprune(shallow: torch.Tensor, deep: torch.Tensor, t: int, alpha: float, width: int) -> list[int]:
    n = len(shallow)
    n_anchor = round(t * alpha / 5)
    anchors = argsort_desc(shallow.tolist())[:n_anchor]
    buf = set()
    for a in anchors:
        for c in (a, a - 1, a + 1, a - width, a + width):
            buf.add(min(max(c, 0), n - 1))
    ranked = [j for j in argsort_desc(deep.tolist()) if j not in buf]
    return sorted(buf | set(ranked[: t - len(buf)]))


def ref_visionzip(cls_attn: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """``(H, S)``, ``(S, d)``, ``(S, C)`` -> ``(D + C, C)``."""
    s = hidden.shape[0]
    score = cls_attn.sum(0)[1:].tolist()
    dom = sorted([0] + [j + 1 for j in argsort_desc(score)[: dominant - 1]])
    rest = [j for j in range(s) if j not in set(dom)]
    out = [hidden[j] for j in dom]
    if contextual <= 0:
        return torch.stack(out)
    step = max(1, len(rest) // contextual)
    tpos = list(range(0, len(rest), step))[:contextual]
    targets = [rest[p] for p in tpos]
    others = [rest[p] for p in range(len(rest)) if p not in set(tpos)]
    kn = {j: keys[j] / keys[j].norm() for j in rest}
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for j in others:
        sims = [float(kn[j] @ kn[t]) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda i: (sims[i], -i))]].append(j)
    for t in targets:
        g = groups[t]
        mean = torch.stack([hidden[j] for j in g]).sum(0) / len(g) if g else torch.zeros_like(hidden[t])
        out.append(hidden[t] + mean)
    return torch.stack(out)


def ref_complement_idx(kept: list[int], n: int) -> list[int]:
    """The official ``complement_idx``: zero the kept positions of ``arange(n)``, sort, drop ``len(kept)`` entries
    (with duplicates in ``kept``, as many of the lowest real complement tokens go too)."""
    a = list(range(n))
    for j in kept:
        a[j] = 0
    return sorted(a)[len(kept):]


def ref_prumerge(feats: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kept: list[int], n_neighbors: int = 32) -> torch.Tensor:
    """The official per-token loop: ``rest`` = the other kept entries (in kept order), then ``complement_idx``."""
    n, c = feats.shape
    attn = torch.softmax((q @ k.t()) * c**-0.5, dim=-1)[0, 1:]
    keys = F.normalize(k[1:], p=2, dim=-1)
    pruned = ref_complement_idx(kept, n)
    out = []
    for i, ti in enumerate(kept):
        rest = kept[:i] + kept[i + 1 :] + pruned
        sims = (keys[ti : ti + 1] @ keys[rest].t())[0]
        nb = sims.topk(n_neighbors).indices.tolist()
        acc = sum(attn[rest[j]] * feats[rest[j]] for j in nb)
        out.append(feats[ti] + acc)
    out.append(sum(attn[j] * feats[j] for j in pruned) if pruned else torch.zeros(c))
    return torch.stack(out)


def ref_prumerge_cls(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    c = q.shape[-1]
    return torch.softmax((q @ k.t()) * c**-0.5, dim=-1)[0, 1:]


def ref_outlier_ratio(scores: torch.Tensor) -> float:
    import numpy as np

    a = scores.double().numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return float((a > q3 + 1.5 * (q3 - q1)).sum()) / len(a)


def ref_tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, class_token: bool = True):
    """One ToMe merge of one sample, with explicit loops: ``(T, C)``, ``(T, 1)``, ``(T, d)`` -> merged ``x``, ``size``."""
    t = x.shape[0]
    r = min(r, (t - (1 if class_token else 0)) // 2)
    if r <= 0:
        return x * size / size, size
    mn = metric / metric.norm(dim=-1, keepdim=True)
    a_ids, b_ids = list(range(0, t, 2)), list(range(1, t, 2))
    best, best_j = [], []
    for ai in a_ids:
        sims = [float(mn[ai] @ mn[bj]) for bj in b_ids]
        if class_token and ai == 0:
            sims = [-math.inf] * len(b_ids)
        j = max(range(len(sims)), key=lambda q: (sims[q], -q))
        best.append(sims[j])
        best_j.append(j)
    order = argsort_desc(best)
    src = order[:r]
    unm = sorted(order[r:]) if class_token else order[r:]
    xs, ss = x * size, size
    dst_x = [xs[bj].clone() for bj in b_ids]
    dst_s = [ss[bj].clone() for bj in b_ids]
    for i in src:
        dst_x[best_j[i]] = dst_x[best_j[i]] + xs[a_ids[i]]
        dst_s[best_j[i]] = dst_s[best_j[i]] + ss[a_ids[i]]
    new_x = [xs[a_ids[i]] for i in unm] + dst_x
    new_s = [ss[a_ids[i]] for i in unm] + dst_s
    nx, ns = torch.stack(new_x), torch.stack(new_s)
    return nx / ns, ns


def ref_gprune(x: torch.Tensor, keep: int, similarity: float = 0.5, temperature: float = 0.03, steps: int = 5) -> list[int]:
    """G-Prune on one image ``(N, D)``: a thresholded-cosine graph, row-softmax transitions, the feature
    norms pushed ``steps`` times along it (one vector-matrix product per step), divided by the degree."""
    n = x.shape[0]
    xn = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = xn @ xn.t()
    trans = torch.zeros(n, n, dtype=x.dtype)
    degree = []
    for i in range(n):
        nb = torch.nonzero(sim[i] >= similarity).flatten()  # the row's edges (itself included)
        trans[i, nb] = torch.softmax(sim[i, nb] / temperature, dim=0)
        degree.append(len(nb))
    mass = x.norm(dim=1)
    for _ in range(steps):
        mass = mass @ trans
    score = [float(mass[j]) / degree[j] for j in range(n)]
    return sorted(argsort_desc(score)[:keep])


def ref_holov(x: torch.Tensor, attn: torch.Tensor, budget: int, chunks: int = 16, alpha: float = 0.09, eps: float = 1e-6) -> list[int]:
    """HoloV on one image: ``(N, D)`` tokens, ``(N,)`` attention -> kept indices in output order, ``-1``
    for the zero rows that pad the output to ``budget``."""
    n = x.shape[0]
    base, rem = divmod(n, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < rem else 0)
        bounds.append(list(range(start, start + size)))
        start += size
    scores = []
    for toks in bounds:
        m = len(toks)
        f = torch.stack([x[j] / (x[j].norm() + eps) for j in toks])
        gram = (f @ f.t()).tolist()
        var = []
        for i in range(m):
            row = [0.0 if i == j else gram[i][j] for j in range(m)]
            mu = sum(row) / (m - 1)
            var.append(sum((v - mu) ** 2 for v in row) / (m - 1))
        a = [1e3 * float(attn[j]) for j in toks]
        scale = (sum(abs(v) for v in a) / m) / (sum(abs(v) for v in var) / m + eps)
        scores.append(sum(a[i] + alpha * var[i] * scale for i in range(m)) / m)
    total = sum(scores) + eps
    weights = [s / total for s in scores]
    quota = [math.floor(w * budget) for w in weights]
    for c in argsort_desc(weights)[: budget - sum(quota)]:
        quota[c] += 1
    out = []
    for toks, q in zip(bounds, quota):
        if q >= len(toks):
            out += toks
        elif q > 0:
            out += [toks[i] for i in argsort_desc([float(attn[j]) for j in toks])[:q]]
    return out + [-1] * (budget - len(out))


def ref_flowcut(layers, x: torch.Tensor, n_blocks: int, target: int) -> tuple[torch.Tensor, list[int]]:
    """FlowCut on one image: ``x`` ``(1 + N, C)`` tower input (CLS first) through the first ``n_blocks``
    CLIP ``layers``, explicit softmax attention; after each block, while more than ``target`` patches
    remain, score the patches and cut at the blocks ``n_blocks - 2 - i`` (remaining) even before the last.
    Returns the last block's output ``(1 + target, C)`` and the kept patches' original indices."""
    patches = list(range(x.shape[0] - 1))
    cum = None
    for i, layer in enumerate(layers[:n_blocks]):
        at = layer.self_attn
        h = layer.layer_norm1(x)
        s = x.shape[0]
        q, k, v = (p(h).view(s, at.num_heads, at.head_dim) for p in (at.q_proj, at.k_proj, at.v_proj))
        heads, cls_rows, sem_rows = [], [], []
        for hh in range(at.num_heads):
            p = torch.softmax((q[:, hh] @ k[:, hh].t()) * at.scale, dim=-1)
            heads.append(p @ v[:, hh])
            cls_rows.append(p[0].tolist())
            sem_rows.append(torch.softmax(v[0, hh] @ v[:, hh].t(), dim=0).tolist())
        x = x + at.out_proj(torch.cat(heads, dim=-1))
        x = x + layer.mlp(layer.layer_norm2(x))
        n = len(patches)
        if n <= target:
            continue
        nh = at.num_heads
        a = [sum(cls_rows[hh][j + 1] for hh in range(nh)) / nh for j in range(n)]
        sem = [sum(sem_rows[hh][j + 1] for hh in range(nh)) / nh for j in range(n)]
        vbar = v.mean(dim=1)
        l1 = [float(vbar[j + 1].abs().sum()) for j in range(n)]
        sa, ss = sum(a), sum(sem)
        score = [(a[j] / sa + sem[j] / ss) * l1[j] for j in range(n)]
        cum = score if cum is None else [0.5 * c + 0.5 * sc for c, sc in zip(cum, score)]
        rpl = n_blocks - 2 - i
        if rpl % 2:
            continue
        if rpl == 0:
            keep_n = target
        else:
            ent = -sum(pj / sa * math.log(pj / sa) for pj in a if pj > 0) / math.log(n)
            cut = round((n - target) / rpl**0.5 * (1 - ent**2))
            keep_n = max(n - cut, target)
        keep = sorted(argsort_desc(cum)[:keep_n])
        cum = [cum[j] for j in keep]
        patches = [patches[j] for j in keep]
        x = torch.cat([x[:1], x[1:][torch.tensor(keep)]])
    return x, patches


def ref_vscan(x: torch.Tensor, shallow: torch.Tensor, deep: torch.Tensor, grid: tuple[int, int], budget: int, window: int = 6, global_ratio: float = 0.5) -> tuple[list[int], torch.Tensor]:
    """VScan's pre-LLM rule on one image: ``(N, D)`` tokens, ``(N,)`` shallow and deep CLS attention ->
    (kept raster indices, ``(K, D)`` merged kept tokens), with plain loops (distinct scores assumed)."""
    h, w = grid
    n = h * w
    n_local = int(budget * (1 - global_ratio))
    wins = [(i, j) for i in range(h // window) for j in range(w // window)]
    k = n_local // len(wins)
    local = []
    for i, j in wins:
        cells = [(i * window + dy) * w + j * window + dx for dy in range(window) for dx in range(window)]
        local += sorted(cells, key=lambda c: -float(shallow[c]))[:k]
    d = [float(v) for v in deep]
    for c in local:
        d[c] = 0.0
    glob = sorted(range(n), key=lambda c: -d[c])[: budget - n_local]
    kept = sorted(set(local) | set(glob))
    members: dict[int, list[int]] = {c: [] for c in kept}
    for t in range(n):
        if t in members:
            continue
        best, best_cos = None, None
        for c in kept:
            cos = float(x[t] @ x[c]) / (float(x[t].norm()) * float(x[c].norm()))
            if best_cos is None or cos > best_cos:
                best, best_cos = c, cos
        members[best].append(t)
    merged = torch.stack([(x[c] + sum((x[t] for t in members[c]), torch.zeros_like(x[c]))) / (1 + len(members[c])) for c in kept])
    return kept, merged


# ----------------------------------------------------------------------------- CDPruner
def ref_cdpruner(vis: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, t: int) -> list[int]:
    """CDPruner's rule for one image, plainly: ``(N, D)`` projected tokens, ``(N, C)`` CLIP image embeddings,
    ``(M, C)`` question chunk embeddings -> the ``t`` kept indices, ascending.

    Relevance ``r_i = -(1/M) sum_m cos(img_i, txt_m)``, min-max normalised (``+ 1e-6`` on the numerator), kernel
    ``L_ij = r_i cos(vis_i, vis_j) r_j``; greedy MAP inference of the DPP by the incremental Cholesky rule of
    Chen et al. 2018 (each step: the unselected candidate of largest residual ``d_j^2``, first index on ties;
    every candidate's new Cholesky entry ``e = (L_j. - sum_k c_k[j] c_k) / d_j``), exactly ``t`` steps.
    """
    n = vis.shape[0]
    r = []
    for i in range(n):
        sims = [float(torch.dot(img[i], txt[m]) / (img[i].norm() * txt[m].norm())) for m in range(txt.shape[0])]
        r.append(-sum(sims) / len(sims))
    lo, hi = min(r), max(r)
    r = torch.tensor([(x - lo + 1e-6) / (hi - lo) for x in r], dtype=vis.dtype)
    unit = torch.stack([vis[i] / vis[i].norm() for i in range(n)])
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    d2 = kernel.diagonal().clone()
    rows: list[torch.Tensor] = []
    chosen: list[int] = []
    for _ in range(t):
        best, j = -math.inf, -1
        for cand in range(n):
            if cand not in chosen and float(d2[cand]) > best:
                best, j = float(d2[cand]), cand
        chosen.append(j)
        e = kernel[j].clone()
        for c in rows:
            e = e - c[j] * c
        e = e / math.sqrt(best)
        rows.append(e)
        d2 = d2 - e * e
    return sorted(chosen)
