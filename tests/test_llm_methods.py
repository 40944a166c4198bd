"""In-LLM methods (FastV, PyramidDrop, DART, SparseVLM, TransPrune) on tiny random-config LLaVA models, CPU.

* recomputed attention rows (SDPA model) == eager ``output_attentions`` rows;
* oracle: the hooked, KV-cached forward/generate == a reference in which the dropped tokens are
  physically removed from the pruning layer on (same position ids), run layer by layer without cache;
* ratio 0 == the unpruned model, exactly; batch outputs == per-sample outputs;
* selections == plain loop-style references of each rule on random inputs (exact indices).

The tiny LLM has 8 layers; the methods' layer indices (given for 32 layers) are scaled by 8/32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

SIZES = {"vision_hidden": 32, "vision_layers": 2, "vision_heads": 2, "vision_mlp": 64,
         "text_hidden": 64, "text_layers": 8, "text_heads": 4, "text_mlp": 128}
QUESTIONS = ["what color is the big circle", "how many", "is there a red square left of the blue circle"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from bench.tiny_llava import build_model, build_processor

    model = build_model(SIZES, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than the 0.02 init: attention and logits far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name or "projector" in name):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]) * 1.5)
    path = tmp_path_factory.mktemp("tiny-llava-8l")
    model.save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def _adapter(path, attn="sdpa"):
    from bench.models.llava import LlavaAdapter

    ad = LlavaAdapter("tiny8", str(path), device="cpu", dtype="float32", attn_implementation=attn).load()
    ad.supported_stages = ad.supported_stages | {"in_llm"}
    return ad


@pytest.fixture(scope="module")
def sdpa(tiny_dir):
    return _adapter(tiny_dir)


@pytest.fixture(scope="module")
def batch(sdpa):
    from PIL import Image

    from bench.tiny_llava import prompt_text

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in QUESTIONS]
    return sdpa.processor(images=imgs, text=[prompt_text(q) for q in QUESTIONS], return_tensors="pt", padding=True)


SEEDS = torch.tensor([11, 22, 33])


def _single(batch, i):
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep],
            "pixel_values": batch["pixel_values"][i : i + 1]}


def _methods(ratio=0.75, budget="after_prune"):
    from methods.dart import DART
    from methods.fastv import FastV
    from methods.pdrop import PyramidDrop
    from methods.sparsevlm import SparseVLM
    from methods.transprune import TransPrune

    return {
        "fastv": FastV(prune_ratio=ratio, budget=budget),
        "dart": DART(prune_ratio=ratio, budget=budget),
        "pdrop": PyramidDrop(prune_ratio=ratio, budget=budget),
        "sparsevlm": SparseVLM(prune_ratio=ratio, budget=budget),
        "sparsevlm2": SparseVLM(prune_ratio=ratio, budget=budget, version="2.0"),
        "transprune": TransPrune(prune_ratio=ratio, budget=budget),
    }


METHOD_NAMES = ["fastv", "dart", "pdrop", "sparsevlm", "transprune"]


# ------------------------------------------------------------------------------ reference forward
def _reference_logits(ad, embeds, stages, renumber):
    """Batch-1, unpadded: run the decoder layer by layer; at each stage physically drop tokens."""
    lm = ad.model.model.language_model
    t = embeds.shape[1]
    h = embeds
    pos = torch.arange(t)
    ident = torch.arange(t)  # original token index of each row, -1 for none
    vis0 = stages["span"]
    by_layer = {}
    for st in stages["stages"]:
        by_layer.setdefault(st["layer"], []).append(st)
    n_vis = vis0[1] - vis0[0]
    for layer_i, layer in enumerate(lm.layers):
        for st in by_layer.get(layer_i, []):
            # the visual block is rows [vis0[0], vis0[0] + n_vis): keep rows kept_rel, then the merged tokens
            rel = st["kept_rel"][0]
            s0 = vis0[0]
            merged = st.get("merged")
            m = 0 if merged is None else merged.shape[1]
            parts_h = [h[:, :s0], h[:, s0 + rel]] + ([merged[:1].to(h.dtype)] if m else []) + [h[:, s0 + n_vis :]]
            parts_p = [pos[:s0], pos[s0 + rel]] + ([pos[s0].repeat(m)] if m else []) + [pos[s0 + n_vis :]]
            h, pos = torch.cat(parts_h, 1), torch.cat(parts_p)
            n_vis = len(rel) + m
            if renumber:
                pos = torch.arange(h.shape[1])
        pe = lm.rotary_emb(h, pos.view(1, -1))
        out = layer(h, attention_mask=None, position_ids=pos.view(1, -1), past_key_values=None, use_cache=False, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return ad.model.lm_head(lm.norm(h))


def _reference_generate(ad, prepared, stages, renumber, steps):
    emb = prepared.inputs_embeds
    toks = []
    for _ in range(steps):
        logits = _reference_logits(ad, emb, stages, renumber)
        nxt = logits[0, -1].argmax()
        toks.append(int(nxt))
        emb = torch.cat([emb, ad.model.get_input_embeddings()(nxt.view(1, 1))], dim=1)
    return toks


@pytest.mark.parametrize("name", METHOD_NAMES + ["sparsevlm2"])
def test_oracle_physical_removal(name, sdpa, batch):
    m = _methods()[name]
    b1 = _single(batch, 2)
    prepared = sdpa.prepare(b1, m, SEEDS[2:])
    with torch.no_grad():
        out = sdpa.prefill(prepared, m)
        stages = {"span": prepared.extras["image_spans"][0].tolist(), "stages": prepared.extras["llm_stages"]}
        assert stages["stages"], "the method did not prune"
        ref = _reference_logits(sdpa, prepared.inputs_embeds, stages, m.plan(576, 8)[0].renumber)
        torch.testing.assert_close(out.logits[0, -1], ref[0, -1], atol=1e-4, rtol=1e-4)
        gen = sdpa.generate(prepared, max_new_tokens=6, method=m)[0].tolist()
        ref_gen = _reference_generate(sdpa, prepared, stages, m.plan(576, 8)[0].renumber, 6)
    assert gen == ref_gen
    counts = prepared.extras["visual_tokens_per_layer"][0].tolist()
    plan = m.plan(576, 8)
    assert counts[plan[0].layer - 1] == 576 and counts[-1] == plan[-1].n_keep


def test_ratio_zero_is_unpruned(sdpa, batch):
    """Ratio 0: no stage, no hook; outputs are the unpruned model's, exactly (decode checked once)."""
    ms = _methods(ratio=0.0, budget="layer_mean")
    prepared = sdpa.prepare(batch, ms["fastv"], SEEDS)
    with torch.no_grad():
        b = sdpa.prefill(prepared).logits
        for name in METHOD_NAMES + ["sparsevlm2"]:
            m = ms[name]
            assert m.plan(576, 8) == []
            assert torch.equal(sdpa.prefill(prepared, m).logits, b)
            assert prepared.extras["visual_tokens_per_layer"].eq(576).all()
        assert torch.equal(sdpa.generate(prepared, 3, method=ms["sparsevlm"]), sdpa.generate(prepared, 3))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_batch_equals_per_sample(name, sdpa, batch):
    m = _methods(ratio=0.5)[name]
    prepared = sdpa.prepare(batch, m, SEEDS)
    with torch.no_grad():
        logits = sdpa.prefill(prepared, m).logits
        kept = [s["kept_index"] for s in prepared.extras["llm_stages"]]
        gen = sdpa.generate(prepared, 4, method=m)
        for i in range(len(QUESTIONS)):
            p1 = sdpa.prepare(_single(batch, i), m, SEEDS[i : i + 1])
            l1 = sdpa.prefill(p1, m).logits
            torch.testing.assert_close(logits[i, -1], l1[0, -1], atol=1e-4, rtol=1e-4)
            for s, k in zip(p1.extras["llm_stages"], kept):
                assert torch.equal(s["kept_index"][0], k[i])
            single = sdpa.generate(p1, 4, method=m)[0].tolist()
            assert gen[i].tolist()[: len(single)] == single  # the batch pads after a sample's EOS


def test_attention_rows_match_eager(tiny_dir, sdpa, batch):
    """Rows a method recomputes under SDPA equal eager ``output_attentions`` rows (padded batch)."""
    from methods.fastv import FastV

    eager = _adapter(tiny_dir, "eager")
    rec = {}

    @dataclass
    class Spy(FastV):
        def prune(self, i, stage, view):
            rec["prev_last"] = view.attn_rows(stage.layer - 1, "last")
            rec["cur_after"] = view.attn_rows(stage.layer, "after_image")
            rec["prev_after"] = view.attn_rows(stage.layer - 1, "after_image")
            rec["span"] = (view.vis_start.clone(), view.n_vis)
            return super().prune(i, stage, view)

    m = Spy(prune_ratio=0.5, budget="after_prune", k_layer=12)  # K = 3 in 8 layers
    k = m.plan(576, 8)[0].layer
    prepared = sdpa.prepare(batch, m, SEEDS)
    with torch.no_grad():
        sdpa.prefill(prepared, m)
        pos = (prepared.attention_mask.cumsum(-1) - 1).clamp(min=0)
        att = eager.model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                          position_ids=pos, output_attentions=True).attentions
    rows, _ = rec["prev_last"]
    torch.testing.assert_close(rows[:, :, 0], att[k - 1][:, :, -1], atol=1e-5, rtol=1e-4)
    rows, qv = rec["cur_after"]
    t = att[k].shape[-1]
    n_q = rows.shape[2]
    ref = att[k][:, :, t - n_q :]
    for b in range(rows.shape[0]):
        torch.testing.assert_close(rows[b][:, qv[b]], ref[b][:, qv[b]], atol=1e-5, rtol=1e-4)
    rows, qv = rec["prev_after"]  # SparseVLM's rater rows: captured q/k of layer K-1
    ref = att[k - 1][:, :, t - rows.shape[2] :]
    for b in range(rows.shape[0]):
        torch.testing.assert_close(rows[b][:, qv[b]], ref[b][:, qv[b]], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ selection references
def _loop_fastv(attn, start, n, k):
    out = []
    for b in range(attn.shape[0]):
        s = attn[b].mean(0)[start[b] : start[b] + n]
        out.append(sorted(s.topk(k).indices.tolist()))
    return out


def test_fastv_selection_matches_loop():
    from methods.fastv import fastv_scores, topk_sorted

    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 8, 700, generator=g).softmax(-1)
    start = torch.tensor([35, 40, 52])
    got = topk_sorted(fastv_scores(attn, start, 576), 64)
    assert got.tolist() == _loop_fastv(attn, start, 576, 64)


def _loop_dart(keys, hidden, start, n, pi, pt, topk_per):
    """Per-sample transcription of the official rule (sets, list order, L1 norms, -cos topk)."""
    res = []
    for b in range(keys.shape[0]):
        s = int(start[b])
        kn = keys[b].abs().sum(-1)
        img = (kn[s : s + n].topk(pi).indices + s).tolist()
        txt = (kn[s + n :].topk(pt).indices + s + n).tolist()
        chosen = set(img + txt)
        valid = set(range(s, s + n))
        valid.difference_update(img)
        for item in list(set(img + txt)):
            vl = sorted(valid)
            cos = -torch.nn.functional.cosine_similarity(hidden[b, item], hidden[b, vl], dim=-1)
            top = [vl[j] for j in cos.topk(topk_per).indices.tolist()]
            chosen.update(top)
            valid.difference_update(top)
        chosen.difference_update(txt)
        res.append(sorted(i - s for i in chosen))
    return res


def test_dart_selection_matches_loop():
    from methods.dart import dart_select

    g = torch.Generator().manual_seed(0)
    t, n = 680, 576
    keys = torch.randn(2, t, 64, generator=g)
    hidden = torch.randn(2, t, 32, generator=g)
    start = torch.tensor([35, 35])
    valid = torch.ones(2, t, dtype=torch.bool)
    got = dart_select(keys, hidden, valid, start, n, 4, 4, [24] * 8)
    assert got.shape == (2, 196)
    assert got.tolist() == _loop_dart(keys, hidden, start, n, 4, 4, 24)
    # left padding: the same sample shifted right by 5 pads gives the same selection
    pad = 5
    keys_p = torch.cat([torch.zeros(2, pad, 64), keys], 1)
    hid_p = torch.cat([torch.zeros(2, pad, 32), hidden], 1)
    valid_p = torch.cat([torch.zeros(2, pad, dtype=torch.bool), valid], 1)
    got_p = dart_select(keys_p, hid_p, valid_p, start + pad, n, 4, 4, [24] * 8)
    assert torch.equal(got, got_p)


def test_dart_pivot_order_is_python_set_order():
    from methods.pyset import pivot_order

    img, txt = [300, 40, 575, 100], [620, 612, 700, 650]
    assert pivot_order(img, txt) == list(set(img + txt))


def test_dart_set_order_matches_python():
    """The device replay of CPython's set (insertions, probing, resizes) gives ``list(set(...))`` exactly."""
    import random

    from methods.pyset import set_order

    rng = random.Random(0)
    rows, ts = [], []
    for n, t, step in [(8, 700, 1)] * 40 + [(8, 2000, 32)] * 20 + [(5, 300, 1)] * 10 + [(20, 5000, 1)] * 10 + [(2, 50, 1)] * 5:
        rows.append(rng.sample(range(0, t, step), n))
        ts.append(t)
    for r, t in zip(rows, ts):
        assert set_order(torch.tensor([r]), t)[0].tolist() == list(set(r))
    batch = torch.tensor(rows[:40])  # batched rows are independent
    assert set_order(batch, 700).tolist() == [list(set(r)) for r in rows[:40]]


_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item", "aten.unique")


def _hook_ops(monkeypatch):
    """Count aten ops run inside the pruning hooks (runner hooks and method-installed ones)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.models import llm_pruning as lp

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.on = collections.Counter(), False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.on:
                name = str(func)
                bool_index = name.startswith("aten.index.Tensor") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None)
                self.ops["SYNC:" + name if bool_index or name.startswith(_SYNC_OPS) else name] += 1
            return func(*args, **(kwargs or {}))

    cnt = Count()
    for name in ("lm_pre", "layer_pre", "sub_hook", "capture_out"):
        orig = getattr(lp._Runner, name)

        def wrapped(self, *a, _orig=orig, **k):
            prev, cnt.on = cnt.on, True
            try:
                return _orig(self, *a, **k)
            finally:
                cnt.on = prev

        monkeypatch.setattr(lp._Runner, name, wrapped)
    return cnt


@pytest.mark.parametrize("padded", [False, True])
def test_hooks_never_sync_and_decode_is_cheap(padded, sdpa, batch, monkeypatch):
    """No host sync inside the hooks (so the pruned prefill can be captured in a CUDA graph), and a
    decoding step costs, per stage and call, at most a table lookup (shifted positions) and a padding mask."""
    cnt = _hook_ops(monkeypatch)
    b = batch if padded else _single(batch, 2)
    for name in METHOD_NAMES + ["sparsevlm2"]:
        m = _methods(ratio=0.75)[name]
        prepared = sdpa.prepare(b, m, SEEDS if padded else SEEDS[2:])
        with torch.no_grad(), sdpa.llm_pruning(m, prepared):
            sdpa.prefill(prepared)  # layouts are built on the first prefill of a context
            cnt.ops.clear()
            with cnt:
                out = sdpa.prefill(prepared)
            syncs = {k: v for k, v in cnt.ops.items() if k.startswith("SYNC:")}
            assert not syncs, (name, syncs)
            tok = out.logits[:, -1:].argmax(-1)
            mask = prepared.attention_mask
            for step in range(2):  # the first step of a context builds the rotary table once
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                pos = mask.long().sum(-1, keepdim=True) - 1
                cnt.ops.clear()
                with cnt:
                    sdpa.model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
        plan = m.plan(576, 8)
        shifted = len({s.layer for s in plan if s.renumber})
        kernels = sum(v for k, v in cnt.ops.items() if not k.startswith(("aten.view", "aten.expand", "aten.slice", "aten.unsqueeze")))
        budget = 3 * shifted + (4 * len(plan) if padded else 0)
        assert kernels <= budget, (name, dict(cnt.ops))


def test_budgets_and_schedules():
    from methods.dart import DART
    from methods.fastv import FastV
    from methods.pdrop import PyramidDrop

    assert [s.n_keep for s in DART(prune_ratio=1 - 192 / 576, budget="official").plan(576, 32)] == [196]
    assert [s.n_keep for s in DART(prune_ratio=1 - 64 / 576, budget="official").plan(576, 32)] == [68]
    assert [s.n_keep for s in DART(prune_ratio=1 - 192 / 576, budget="after_prune").plan(576, 32)] == [192]
    st = FastV(prune_ratio=1 - 192 / 576).plan(576, 32)  # official by default: B kept after layer K = 2
    assert st[0].layer == 2 and st[0].n_keep == 192 and not st[0].renumber
    st = FastV(prune_ratio=1 - 192 / 576, budget="layer_mean").plan(576, 32)
    assert st[0].layer == 2 and st[0].n_keep == 166  # (32*192 - 2*576) / 30
    pd = PyramidDrop(prune_ratio=0.5).plan(576, 32)  # official: λ = 1 - ratio, the official scripts' 0.5
    assert [(s.layer, s.n_keep) for s in pd] == [(8, 288), (16, 144), (24, 72)] and pd[0].renumber
    assert [s.n_keep for s in PyramidDrop(prune_ratio=0.0, budget="official", lambda_=0.5).plan(576, 32)] == [288, 144, 72]
    assert PyramidDrop(prune_ratio=0.0).plan(576, 32) == []
    assert [s.n_keep for s in PyramidDrop(prune_ratio=1 - 192 / 576).plan(576, 32)] == [192, 64, 21]
    pd = PyramidDrop(prune_ratio=1 - 192 / 576, budget="layer_mean").plan(576, 32)
    mean = (8 * 576 + sum(8 * s.n_keep for s in pd)) / 32
    assert abs(mean - 192) <= 1.0
    assert [s.layer for s in PyramidDrop(prune_ratio=0.5).plan(576, 8)] == [2, 4, 6]


def test_unreachable_budget_is_said_once(caplog):
    """The schedule is solved at every prefill (every batch): its warning must not repeat per batch."""
    from methods.pdrop import PyramidDrop

    m = PyramidDrop(prune_ratio=0.75, budget="layer_mean")
    with caplog.at_level("WARNING", logger="methods.inllm"):
        for _ in range(3):
            m.plan(576, 6)  # pruning layers 2/3/5 of 6 cannot bring the layer mean down to 144
        m.plan(576, 7)  # another LLM depth is another schedule: said again
    said = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(said) == 2 and "6-layer" in said[0] and "7-layer" in said[1]


# ---- SparseVLM: a per-sample transcription of the official rule on random inputs
def _loop_cluster(x, c, noise):
    """Official ``cluster_and_merge`` for one sample (explicit pairwise distances, index_add merge)."""
    n, d = x.shape
    dist = (x[:, None] - x[None]).norm(dim=-1) / d**0.5
    dn = dist.topk(c, dim=-1, largest=False).values
    dens = (-(dn**2).mean(-1)).exp() + noise * 1e-6
    mask = (dens[None, :] > dens[:, None]).to(x.dtype)
    dmax = dist.max()
    par = (dist * mask + dmax * (1 - mask)).min(-1).values
    centres = (par * dens).topk(c).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(c)
    out = torch.zeros(c, d)
    cnt = torch.zeros(c).index_add_(0, assign, torch.ones(n)) + 1e-6
    out.index_add_(0, assign, x / cnt[assign, None])
    return out


def _loop_sparsevlm(attn_full, embeds, hidden, s0, n, k, noise):
    """Official steps for one sample: raters, head-mean rows, topk mask, top-30% dropped, cluster."""
    t = embeds.shape[0]
    mvt = (embeds[s0 : s0 + n] @ embeds[s0 + n :].T).softmax(1).mean(0)
    raters = torch.where(mvt > mvt.mean())[0] + s0 + n
    rel = attn_full.mean(0)[raters][:, s0 : s0 + n].mean(0)
    keep = sorted(rel.topk(min(k, n - 1)).indices.tolist())
    dropped = [j for j in range(n) if j not in set(keep)]
    cand_n = int(len(dropped) * 0.3) + 1
    cand = rel[dropped].topk(cand_n).indices
    x = hidden[s0 + torch.tensor(dropped)[cand]]
    return keep, _loop_cluster(x, int(cand_n / 10) + 1, noise)


class _FakeView:
    def __init__(self, attn_rows, embeds, hidden, s0, n, noise):
        b, t = hidden.shape[:2]
        self.hidden, self.n_vis, self.layer = hidden, n, 3
        self.vis_start = torch.full((b,), s0)
        self.valid = torch.ones(b, t, dtype=torch.bool)
        self.state, self.static = {}, {"jitter": {0: noise * 1e-6}}
        self.uniform_start, self.vis_start_min = True, s0
        self._rows, self._embeds = attn_rows, embeds

    def attn_rows(self, layer, queries):
        return self._rows, torch.ones(self._rows.shape[0], self._rows.shape[2], dtype=torch.bool)

    def input_embeds(self):
        return self._embeds

    def visual(self, x, dim=1):
        return x.narrow(dim, self.vis_start_min, self.n_vis)


def test_sparsevlm_selection_matches_loop():
    from methods.inllm import Stage
    from methods.sparsevlm import SparseVLM, merge_counts

    g = torch.Generator().manual_seed(0)
    b, h, s0, n, t = 2, 4, 35, 576, 640
    attn = torch.rand(b, h, t, t, generator=g).softmax(-1)
    embeds = torch.randn(b, t, 32, generator=g)
    hidden = torch.randn(b, t, 32, generator=g)
    k = 300
    cand, c = merge_counts(n, k)
    noise = torch.rand(b, cand, generator=g)
    view = _FakeView(attn[:, :, s0 + n :], embeds, hidden, s0, n, noise)
    out = SparseVLM(prune_ratio=0.5).prune(0, Stage(3, k + c, True, n_select=k), view)
    for i in range(b):
        keep, merged = _loop_sparsevlm(attn[i], embeds[i], hidden[i], s0, n, k, noise[i])
        assert out.keep[i].tolist() == keep
        torch.testing.assert_close(out.extra[i], merged, atol=1e-5, rtol=1e-5)


def test_transprune_scores_match_loop():
    from methods.transprune import transition_weight

    g = torch.Generator().manual_seed(0)
    a, o = torch.randn(2, 50, 16, generator=g), torch.randn(2, 50, 16, generator=g)
    got = transition_weight(a, o, torch.ones(2, 50, dtype=torch.bool))
    for i in range(2):  # official compute_transf_weight, batch 1
        ratio = o[i].norm(dim=-1) / a[i].norm(dim=-1)
        e = torch.exp(1 - torch.nn.functional.cosine_similarity(a[i], o[i], dim=-1))
        torch.testing.assert_close(got[i], ratio * e / e.sum(), atol=1e-6, rtol=1e-5)


def test_new_method_budgets():
    from methods.sparsevlm import SparseVLM
    from methods.transprune import TransPrune

    def mean(plan, n=576, layers=32):
        c = [n] * layers
        for s in plan:
            for j in range(s.layer, layers):
                c[j] = s.n_keep
        return sum(c) / layers

    p = SparseVLM(prune_ratio=1 - 192 / 576, budget="official").plan(576, 32)
    assert [(s.layer, s.n_keep) for s in p] == [(3, 309), (7, 204), (16, 113)] and mean(p) == 206.5 and p[0].renumber
    assert abs(mean(SparseVLM(prune_ratio=1 - 128 / 576, budget="official").plan(576, 32)) - 145.4) < 0.1
    assert abs(mean(SparseVLM(prune_ratio=1 - 64 / 576, budget="official").plan(576, 32)) - 82.3) < 0.1
    assert abs(mean(SparseVLM(prune_ratio=1 - 192 / 576, budget="layer_mean").plan(576, 32)) - 192) <= 1.0
    assert SparseVLM(prune_ratio=1 - 192 / 576, budget="after_prune").plan(576, 32)[0].n_keep == 192
    v2 = SparseVLM(prune_ratio=1 - 192 / 576, budget="official", version="2.0").plan(576, 32)
    assert [s.n_keep for s in v2] == [300, 200, 118] and not v2[0].renumber
    tp = TransPrune(prune_ratio=1 - 236 / 576, budget="official").plan(576, 32)  # the published setting
    assert [(s.layer, s.n_keep) for s in tp] == [(7, 504), (9, 360), (12, 72)] and mean(tp) == 236.25
    assert abs(mean(TransPrune(prune_ratio=1 - 192 / 576).plan(576, 32)) - 192) <= 1.0
    assert TransPrune(prune_ratio=1 - 192 / 576, budget="after_prune").plan(576, 32)[0].n_keep == 192


def test_overhead_script_smoke(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "o.csv"
    r = subprocess.run([sys.executable, "benchmarks/bench_inllm_overhead.py", "--smoke", "--repeats", "1", "--warmup", "0",
                        "--batches", "1", "--methods", "transprune,dart", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:6] == ["method", "batch", "mode", "prefill_ms", "prefill_fixed_ms", "overhead_ms"]
    assert {(x["method"], x["mode"]) for x in rows} == {(m, md) for m in ("transprune", "dart") for md in ("eager", "graph")}
    for x in rows:
        assert x["fixed_equals_method"] == "True"
        if x["mode"] == "eager":
            assert float(x["prefill_ms"]) > 0 and float(x["decode_step_ms"]) > 0 and float(x["decode_step_unpruned_ms"]) > 0
        else:  # CPU: no CUDA graphs, recorded as null with the reason
            assert x["prefill_ms"] == "" and "CUDA" in x["note"]


# ---- kernel-count rewrites (issue 5) against the formulations they replace, bit for bit
def _old_cluster_and_merge(x, c, jitter):
    """``cluster_and_merge`` as written before its kernel-count rewrite (same ops, same order)."""
    b, m, dd = x.shape
    xd = x.double()
    gram = torch.bmm(xd, xd.transpose(1, 2))
    sq = gram.diagonal(dim1=1, dim2=2)
    dist = torch.add(sq.unsqueeze(2) + sq.unsqueeze(1), gram, alpha=-2.0).clamp_min_(0.0).sqrt_().to(x.dtype) / dd**0.5
    nearest = dist.topk(c, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp() + jitter
    higher = density[:, None, :] > density[:, :, None]
    dist_max = dist.flatten(1).max(-1).values.view(b, 1, 1)
    parent = torch.where(higher, dist, dist_max).min(-1).values
    centres = (parent * density).topk(c, dim=-1).indices
    assign = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, m)).argmin(1)
    assign.scatter_(1, centres, torch.arange(c, device=x.device).view(1, -1).expand(b, -1))
    onehot = x.new_zeros(b, m, c).scatter_(2, assign.unsqueeze(-1), 1.0)
    weight = (onehot.sum(1) + 1e-6).reciprocal()
    return (onehot * weight.unsqueeze(1)).transpose(1, 2) @ x


def _old_pivot_picks(cos, img_piv, per_pivot):
    """DART's pivot loop as written before (a 0 / -inf "taken" mask added to each pivot's row)."""
    neg_cos = -cos
    taken = torch.zeros(cos.shape[0], cos.shape[2], dtype=cos.dtype, device=cos.device)
    taken.scatter_(1, img_piv, float("-inf"))
    parts = [img_piv]
    for j, cnt in enumerate(per_pivot):
        top = (neg_cos[:, j] + taken).topk(cnt, dim=1, sorted=False).indices
        taken.scatter_(1, top, float("-inf"))
        parts.append(top)
    return torch.cat(parts, dim=1).sort(dim=1).values


def check_rewrites(device: str) -> None:
    from methods.dart import pivot_picks
    from methods.sparsevlm import cluster_and_merge

    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32,) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    dim = 64 if device == "cpu" else 4096
    for dt in dtypes:
        for b, m, c in ((1, 156, 16), (3, 40, 5), (2, 61, 7)):
            x = (torch.randn(b, m, dim, generator=g) * 2).to(device, dt)
            x[:, 1] = x[:, 0]  # duplicate tokens: zero distances, density ties
            jitter = (torch.rand(b, m, generator=g) * 1e-6).to(device, dt)
            assert torch.equal(cluster_and_merge(x, c, jitter), _old_cluster_and_merge(x, c, jitter)), (dt, b, m, c)
        for b, p, n in ((1, 8, 576), (4, 8, 576), (2, 3, 50)):
            # coarse values: many ties, exact zeros of both signs
            cos = ((torch.rand(b, p, n, generator=g) * 2 - 1) * 8).round() / 8
            cos = torch.where(torch.rand(b, p, n, generator=g) < 0.05, -cos * 0, cos).to(device, dt)
            img = torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(b)]).to(device)
            per = [(n - 4) // (2 * p)] * p
            assert torch.equal(pivot_picks(cos, img, per), _old_pivot_picks(cos, img, per)), (dt, b, p, n)


def test_rewrites_equal_previous_formulations():
    check_rewrites("cpu")


_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@_gpu
@pytest.mark.gpu
def test_rewrites_equal_previous_formulations_cuda():
    check_rewrites("cuda")


@_gpu
@pytest.mark.gpu
def test_fused_kernels_equal_their_parts_cuda():
    """CUDA semantics the adapter relies on, at LLaVA-1.5-7B shapes: :func:`rms_norm` == ``LlamaRMSNorm``; projections written into one buffer and rotated once == the
    separate ``F.linear`` + rotations, and attention rows from those strided views == from contiguous ones."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from bench.models.llm_pruning import apply_rope, attention_rows, rms_norm, rope_table

    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    for dt in (torch.float16, torch.bfloat16):
        norm = LlamaRMSNorm(4096, eps=1e-5).to(dev, dt)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(4096, generator=g) * 2)
            for shape in ((1, 636, 4096), (16, 124, 4096), (1, 1, 4096)):
                h = (torch.randn(shape, generator=g) * 3).to(dev, dt)
                assert torch.equal(rms_norm(norm, h), norm(h)), (dt, shape)
            t, d, heads = 636, 128, 32
            wq, wk = ((torch.randn(4096, 4096, generator=g) / 64).to(dev, dt) for _ in range(2))
            pos = torch.arange(t, device=dev, dtype=torch.float32)
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
            ang = torch.cat([pos[:, None] * inv] * 2, -1)[None]
            table = rope_table(ang.cos().to(dt), ang.sin().to(dt))
            x = (torch.randn(1, t, 4096, generator=g)).to(dev, dt)
            for q_rows in (25, 1):
                first = t - q_rows
                q_ref = apply_rope(torch.nn.functional.linear(x[:, first:], wq).view(1, q_rows, heads, d), table[:, first:])
                k_ref = apply_rope(torch.nn.functional.linear(x, wk).view(1, t, heads, d), table)
                buf = x.new_empty(t + q_rows, 4096)
                torch.mm(x[0], wk.t(), out=buf[:t])
                torch.mm(x[0, first:], wq.t(), out=buf[t:])
                rot = apply_rope(buf.view(1, t + q_rows, heads, d), torch.cat([table, table[:, first:]], 1))
                q, k = rot[:, :, t:], rot[:, :, :t]
                assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
                bias = torch.zeros(1, 1, q_rows, t, device=dev, dtype=dt)
                bias[..., -3:] = torch.finfo(dt).min
                assert torch.equal(attention_rows(q, k, None, None, d**-0.5, bias=bias),
                                   attention_rows(q_ref, k_ref, None, None, d**-0.5, bias=bias))


@_gpu
@pytest.mark.gpu
def test_one_rotation_keeps_the_same_tokens_cuda():
    """PDrop / TransPrune (both backends) on a 32-layer tiny LLaVA in fp16, batch 1: the same kept tokens
    and logits with the one-rotation path as with the separate rotations."""
    import sys
    from pathlib import Path

    import bench.models.llm_pruning as lp
    from bench.models.base import PreparedBatch
    from methods.pdrop import PyramidDrop
    from methods.transprune import TransPrune

    sys.path.insert(0, str(Path(__file__).parent))
    from test_transprune_kernels import _tiny_adapter

    ad = _tiny_adapter("cuda", torch.float16)
    t, d = 35 + 576 + 25, ad.model.config.text_config.hidden_size
    emb = (torch.randn(1, t, d, generator=torch.Generator().manual_seed(0)) * 0.5).to("cuda", torch.float16)
    prepared = PreparedBatch(torch.zeros(1, t, dtype=torch.long, device="cuda"), emb,
                             torch.ones(1, t, dtype=torch.long, device="cuda"), [576], [576],
                             extras={"image_spans": torch.tensor([[35, 611]]), "sample_seeds": torch.arange(1)})
    for m in (PyramidDrop(prune_ratio=1 - 64 / 576, budget="after_prune"),
              TransPrune(prune_ratio=1 - 64 / 576, budget="after_prune", backend="torch"),
              TransPrune(prune_ratio=1 - 64 / 576, budget="after_prune", backend="auto")):
        out = {}
        for fuse in (True, False):
            lp.FUSE_QK = fuse
            try:
                with torch.no_grad():
                    logits = ad.prefill(prepared, m).logits
                out[fuse] = ([s["kept_index"] for s in prepared.extras["llm_stages"]], logits)
            finally:
                lp.FUSE_QK = True
        assert all(torch.equal(a, b) for a, b in zip(out[True][0], out[False][0])), m
        assert torch.equal(out[True][1], out[False][1])


def test_budget_met_is_recorded_and_unreachable_budgets_are_refused():
    """A run records its budget mode, the count its budget names and whether it is within a token of B; a mode
    that solves a schedule for B and cannot reach it is refused (exit code 2) before any model work."""
    from bench.errors import IncompatibleMethodError
    from methods.dart import DART
    from methods.fastv import FastV
    from methods.pdrop import PyramidDrop
    from methods.sparsevlm import SparseVLM
    from methods.transprune import TransPrune

    def fields(m, n=576, layers=32):
        m.check_budget(n, layers)
        return m.budget_fields(n, layers, None, m.planned_counts(n, layers))

    f = fields(FastV(prune_ratio=1 - 192 / 576))
    assert f == {"budget_mode": "official", "budget_tokens": 192, "budget_measure": "after_prune", "budget_measured": 192.0, "budget_met": True}
    f = fields(DART(prune_ratio=1 - 192 / 576))  # the official 4 + 8 floor(B/8) = 196: flagged, not passed off as 192
    assert (f["budget_measure"], f["budget_measured"], f["budget_met"]) == ("after_prune", 196.0, False)
    f = fields(SparseVLM(prune_ratio=1 - 192 / 576))  # the published "192" averages 206.5 tokens
    assert (f["budget_measure"], f["budget_measured"], f["budget_met"]) == ("layer_mean", 206.5, False)
    f = fields(SparseVLM(prune_ratio=1 - 192 / 576, budget="layer_mean"))
    assert f["budget_mode"] == "layer_mean" and f["budget_met"] and abs(f["budget_measured"] - 192) <= 1
    for m in (PyramidDrop(prune_ratio=1 - 64 / 576, budget="layer_mean"), PyramidDrop(prune_ratio=1 - 128 / 576, budget="layer_mean"),
              TransPrune(prune_ratio=1 - 64 / 576), TransPrune(prune_ratio=1 - 64 / 576, budget="layer_mean"),
              FastV(prune_ratio=1 - 16 / 576, budget="layer_mean")):
        with pytest.raises(IncompatibleMethodError, match="cannot reach") as e:
            m.check_budget(576, 32)
        assert e.value.exit_code == 2
    assert fields(PyramidDrop(prune_ratio=1 - 64 / 576))["budget_met"]  # official: λ = 1/9, the first stage keeps 64
    # measured counts (means over samples) are read the same way
    m = DART(prune_ratio=1 - 192 / 576, budget="after_prune")
    assert m.budget_fields(576, 32, None, [576.0, 576.0] + [192.0] * 30)["budget_met"]
    assert not m.budget_fields(576, 32, None, [576.0, 576.0] + [194.5] * 30)["budget_met"]
