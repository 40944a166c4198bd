"""Official Qwen2.5-VL ports on a tiny random-config ``Qwen2_5_VLForConditionalGeneration`` (CPU, float32).

HoloV (``obananas/HoloV``, ``qwen-model-HoloV``): the score substitute (attention received in the tower's last
block, merged 2x2, in window order) and the chunk count ``max(1, int(1024/576 * N / T))``, checked against loop
references written from the official code; then the adapter contract (ratio 0, physical removal, batch 8 == 1,
3-D positions).
"""

from __future__ import annotations

import math

import pytest
import torch

from methods.registry import create
from reference_vision import ref_holov
from test_qwen25vl import IMG, PAD, make_batch, manual_decode, one_sample, seeds, tiny_qwen

#: patch grids (H, W); merged N = 16..36 tokens: every image has >= 2 windows of 2 x 2 merged tokens
HGRIDS = [(8, 8), (6, 10), (10, 8), (8, 12), (12, 12), (12, 8), (8, 10), (10, 10)]


@pytest.fixture(scope="module")
def adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen(seed=3)
    with torch.no_grad():  # larger vision weights than the 0.02 init: attention far from uniform
        for blk in a.model.model.visual.blocks:
            blk.attn.qkv.weight.mul_(25.0)
    return a


def ref_window_order(h: int, w: int, win: int) -> list[int]:
    """Merged-token raster indices in the tower's window order (the official ``get_window_index`` loop):
    windows of ``win x win`` merged tokens, row-major over windows, raster inside a window."""
    out = []
    for wy in range(0, h, win):
        for wx in range(0, w, win):
            out += [y * w + x for y in range(wy, min(wy + win, h)) for x in range(wx, min(wx + win, w))]
    return out


def ref_received_attention(adapter, px, thw, block: int = -1):
    """Official: last block's ``(H, L, L)`` softmax under the segment mask, ``mean(heads)`` then ``mean(queries)``;
    then ``view(N, 4).mean(1)`` in window order. Inputs of the last block captured by a hook."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = adapter.model.model.visual
    got = {}
    h = visual.blocks[block].attn.register_forward_pre_hook(lambda m, a, k: got.update(x=a[0] if a else k["hidden_states"], **k), with_kwargs=True)
    with torch.no_grad():
        adapter.model.model.get_image_features(px, thw)
    h.remove()
    at = visual.blocks[block].attn
    x, cu = got["x"], got["cu_seqlens"].tolist()
    n = x.shape[0]
    with torch.no_grad():
        q, k, _ = at.qkv(x).reshape(n, 3, at.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *got["position_embeddings"])
        logits = torch.einsum("qhd,khd->hqk", q, k) * at.scaling
        mask = torch.full((n, n), float("-inf"))
        for s, e in zip(cu[:-1], cu[1:]):
            mask[s:e, s:e] = 0
        p = torch.softmax(logits + mask, dim=-1)  # (H, L, L)
        per_patch = p.mean(dim=0).mean(dim=0)  # (L,)
    return [float(per_patch[4 * j: 4 * j + 4].mean()) for j in range(n // 4)]


def test_received_attention_matches_the_official_computation(adapter):
    for h, w in HGRIDS[:4]:
        batch = make_batch([(h, w)])
        feats, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"],
                                              ("merged_attn_received:window", "merged_attn_received:raster"))
        ref = ref_received_attention(adapter, batch["pixel_values"], batch["image_grid_thw"])
        win = extras[0]["merged_attn_received:window"][0]
        torch.testing.assert_close(win, torch.tensor(ref), rtol=1e-5, atol=1e-9)
        order = ref_window_order(h // 2, w // 2, adapter.config.vision_config.window_size // 28)
        raster = extras[0]["merged_attn_received:raster"][0]
        assert [float(raster[r]) for r in order] == [float(v) for v in win]
        assert order != sorted(order)  # several windows: the two orders differ
        assert abs(float(win.sum()) * 4 - 1.0) < 1e-5  # a column mean of a row-stochastic matrix, /4 per merge unit


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("order", ["window", "raster"])
def test_holov_selection_equals_the_official_loop(adapter, ratio, order):
    m = create("holov", ratio, qwen_order=order)
    for i, (h, w) in enumerate(HGRIDS):
        batch = make_batch([(h, w)], seed=i)
        feats, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"], (f"merged_attn_received:{order}",))
        x, a = feats[0], extras[0][f"merged_attn_received:{order}"][0]
        n = x.shape[0]
        t = m.n_keep(n)
        chunks = max(1, int(((1024 / 576) * n) / t))  # official num_patches
        if n < 2 * chunks:
            continue
        sel = m.reduce(x.unsqueeze(0), adapter.image_context(((h // 2), (w // 2)), seeds(1), extras[0]))
        assert sel.extras["source_index"][0].tolist() == ref_holov(x, a, t, chunks)


def test_window_order_is_the_official_misalignment(adapter):
    """With window order, token j is ranked by the score of the j-th token in window order, not its own."""
    batch = make_batch([(8, 12)])
    feats, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"],
                                          ("merged_attn_received:window", "merged_attn_received:raster"))
    picks = {o: create("holov", 0.5, qwen_order=o).reduce(feats[0].unsqueeze(0), adapter.image_context((4, 6), seeds(1), extras[0]))
             .extras["source_index"][0].tolist() for o in ("window", "raster")}
    assert picks["window"] != picks["raster"]


def test_holov_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    one = make_batch(HGRIDS[1:2])
    with torch.no_grad():
        full = adapter.model(**one, logits_to_keep=1)
    assert torch.equal(adapter.prefill(adapter.prepare(one, create("holov", 0.0), seeds(1))).logits, full.logits)


def _reference_tokens(adapter, batch, i, m, steps):
    """Physical removal from the unpruned model's own embeddings and get_rope_index positions: the image rows
    replaced by HoloV's output rows (zero rows at the block's last token's id and position)."""
    with torch.no_grad():
        pos_full, _ = adapter.model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    offs = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    h, w = batch["image_grid_thw"][i, 1:].tolist()
    feats, extras = adapter.encode_images(batch["pixel_values"][offs[i]:offs[i + 1]], batch["image_grid_thw"][i:i + 1],
                                          (f"merged_attn_received:{m.qwen_order}",))
    x, a = feats[0], extras[0][f"merged_attn_received:{m.qwen_order}"][0]
    n = x.shape[0]
    t = m.n_keep(n)
    chunks = max(1, int(((1024 / 576) * n) / t)) if m.qwen_chunks == "official" else m.chunks
    idx = ref_holov(x, a, t, chunks)
    valid = batch["attention_mask"][i].bool()
    seq = batch["input_ids"][i][valid]
    emb = adapter.model.get_input_embeddings()(seq).detach()
    at = (seq == IMG).nonzero().flatten()
    pos = pos_full[:, i][:, valid]
    rows = [emb[j] for j in range(int(at[0]))] + [x[j] if j >= 0 else torch.zeros_like(x[0]) for j in idx] + [emb[j] for j in range(int(at[-1]) + 1, len(seq))]
    cols = list(range(int(at[0]))) + [int(at[j]) for j in idx] + list(range(int(at[-1]) + 1, len(seq)))
    with torch.no_grad():
        return manual_decode(adapter.model, torch.stack(rows).unsqueeze(0), pos[:, cols].unsqueeze(1), steps), idx


@pytest.mark.parametrize("ratio,kw", [(0.2, {}), (0.6, {}), (0.1, {"qwen_chunks": "fixed", "chunks": 2})])
def test_holov_pruned_generate_equals_physical_removal(adapter, ratio, kw):
    """The last case overflows quotas on the first image: zero rows reach the LLM (official)."""
    batch = make_batch(HGRIDS[:4])
    m = create("holov", ratio, **kw)
    prepared = adapter.prepare(batch, m, seeds(4))
    ours = adapter.generate(prepared, max_new_tokens=5)
    for i in range(4):
        toks, idx = _reference_tokens(adapter, batch, i, m, 5)
        assert prepared.visual_tokens_kept[i] == len(idx)
        assert ours[i].tolist()[: len(toks)] == toks


def test_holov_zero_rows_take_the_last_image_position(adapter):
    """Overflowing quotas (forced by few, large chunks) pad with zero rows at the block's last token's 3-D position."""
    batch = make_batch(HGRIDS[:1])
    m = create("holov", 0.1, qwen_chunks="fixed", chunks=2)
    pos_full = adapter.rope_positions(batch)
    prepared = adapter.prepare(batch, m, seeds(1))
    s0, s1 = prepared.extras["image_spans"][0].tolist()
    at = (batch["input_ids"][0] == IMG).nonzero().flatten()
    feats = prepared.inputs_embeds[0, s0:s1]
    zero = (feats == 0).all(-1)
    kept_pos = prepared.extras["position_ids"][:, 0, s0:s1]
    assert zero.any()
    assert (kept_pos[:, zero] == pos_full[:, 0, at[-1]].unsqueeze(1)).all()
    assert s1 - s0 == m.n_keep(len(at))


def test_holov_batch_of_8_equals_batch_of_1(adapter):
    batch = make_batch(HGRIDS)
    m = create("holov", 0.5)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4)
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        t0, t1 = p1.extras["image_spans"][0].tolist()
        assert torch.equal(prepared.extras["position_ids"][:, i, s0:s1], p1.extras["position_ids"][:, 0, t0:t1])
        assert together[i].tolist() == adapter.generate(p1, max_new_tokens=4)[0].tolist()


def test_holov_kept_tokens_keep_their_3d_positions_in_holov_order(adapter):
    batch = make_batch(HGRIDS[:2])
    m = create("holov", 0.5)
    prepared = adapter.prepare(batch, m, seeds(2))
    pos_full = adapter.rope_positions(batch)
    for i in range(2):
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        at = (batch["input_ids"][i] == IMG).nonzero().flatten()
        _, idx = _reference_tokens(adapter, batch, i, m, 0)
        want = pos_full[:, i, at[torch.tensor(idx) % len(at)]]
        assert torch.equal(prepared.extras["position_ids"][:, i, s0:s1], want)
        assert int(prepared.extras["position_ids"][:, i].max()) == int(pos_full[:, i].max())


def test_holov_allowed_on_qwen_and_other_cls_methods_refused(adapter):
    from bench.errors import IncompatibleMethodError

    adapter.check_method(create("holov", 0.5))
    for name in ("fastervlm", "vispruner"):
        with pytest.raises(IncompatibleMethodError):
            adapter.check_method(create(name, 0.5))
    assert math.isfinite(create("holov", 0.5).n_chunks(256, 28, False))
    assert create("holov", 0.9).n_chunks(576, 64, False) == 16 and create("holov", 0.9).n_chunks(576, 64, True) == 16
