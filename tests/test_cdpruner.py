"""CDPruner (issue 24), on CPU.

* the vectorised rule == a plain loop reference of the official rule (``tests/reference_vision.py``) on random
  inputs of the real shapes (576 tokens, D = 1024 / 4096, CLIP joint width 768), float64: exact kept sets;
* bit-identical to a line-by-line transcription of the official ``encode_images`` at batch 1 in float32
  (projected features in float16, as on the GPU), where near-ties decide picks;
* batch == per sample; a degenerate kernel (T > rank) keeps the official mask's count; FLOPs counted vs the formula;
* the adapter: the question reaches a (tiny, random) CLIP text tower through ``bench.models.clip_text`` (77-token
  chunks), the tokens chosen depend on the question, a model without a text tower is refused (exit 2).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reference_vision import ref_cdpruner

from methods.base import VisionContext
from methods.cdpruner import CDPruner, conditional_kernel, greedy_dpp, picks_to_kept


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ctx_of(image_embeds, text_embeds, chunks) -> VisionContext:
    b = image_embeds.shape[0]
    return VisionContext((24, 24), True, torch.zeros(b, dtype=torch.long), {
        "clip_image_embeds": lambda: image_embeds, "clip_text_embeds": lambda: text_embeds, "clip_text_chunks": lambda: chunks})


def inputs(b, n, d, c, m, seed, dtype=torch.float64):
    g = gen(seed)
    vis = torch.randn(b, n, d, generator=g, dtype=dtype)
    img = torch.randn(b, n, c, generator=g, dtype=dtype)
    txt = torch.randn(b, m, c, generator=g, dtype=dtype)
    return vis, img, txt


@pytest.mark.parametrize("ratio,d,m", [(0.5, 1024, 1), (0.75, 4096, 2), (0.889, 4096, 1), (0.9, 1024, 3)])
def test_matches_loop_reference(ratio, d, m):
    vis, img, txt = inputs(2, 576, d, 768, m, int(ratio * 1000) + d + m)
    chunks = torch.tensor([m, max(1, m - 1)])  # the second sample has fewer chunks (padding rows ignored)
    meth = CDPruner(prune_ratio=ratio)
    sel = meth.reduce(vis, ctx_of(img, txt, chunks))
    t = meth.n_keep(576)
    assert sel.kept_index.shape == (2, t)
    for i in range(2):
        want = ref_cdpruner(vis[i], img[i], txt[i, : int(chunks[i])], t)
        assert int(sel.n_kept[i]) == t
        assert sel.kept_index[i].tolist() == want
        assert torch.equal(sel.features[i], vis[i, want])


def official_selection(image_features, image_embeds, text_embeds, t):
    """The official ``encode_images`` (CDPruner, llava_arch.py) after the projector, transcribed op by op, batch 1."""
    b, n, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((t, b, n))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((t, b), dtype=torch.long)
    for i in range(t):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(b), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(b), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(b), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(b), j] = -float("inf")
    select_idx = torch.sort(select_idx.t()).values
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask.scatter_(1, select_idx, True)
    return mask


@pytest.mark.parametrize("t,d,m", [(64, 4096, 1), (128, 1024, 2), (192, 4096, 1)])
def test_bit_identical_to_official_float32(t, d, m):
    vis, img, txt = inputs(1, 576, d, 768, m, t + d, torch.float32)
    vis = vis.half()  # the projector's output dtype on the GPU
    meth = CDPruner(prune_ratio=1 - t / 576)
    assert meth.n_keep(576) == t
    idx, n_kept = meth.select_with_counts(vis, ctx_of(img, txt[0:1].expand(1, m, 768).clone() if m == 1 else txt, torch.tensor([m])))
    mask = official_selection(vis, img, txt[0], t)
    assert int(n_kept[0]) == t
    assert idx[0].tolist() == mask[0].nonzero().flatten().tolist()


def test_batch_equals_per_sample():
    vis, img, txt = inputs(3, 576, 256, 64, 1, 7, torch.float32)
    meth = CDPruner(prune_ratio=0.75)
    whole = meth.select(vis, ctx_of(img, txt, torch.ones(3, dtype=torch.long)))
    for i in range(3):
        one = meth.select(vis[i : i + 1], ctx_of(img[i : i + 1], txt[i : i + 1], torch.ones(1, dtype=torch.long)))
        assert torch.equal(whole[i], one[0])


def test_relevance_is_negated_and_min_max_normalised():
    # two tokens: token 0 points at the question, token 1 away; orthogonal projected features (S = I)
    vis = torch.eye(2, dtype=torch.float64).unsqueeze(0)
    img = torch.tensor([[[1.0, 0.0], [-1.0, 0.2]]], dtype=torch.float64)
    txt = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    k = conditional_kernel(vis, img, txt, torch.tensor([1]))
    # r = -cos: token 0 -> -1 (the minimum), token 1 -> +0.98; min-max: (r - min + 1e-6) / (max - min)
    assert k[0, 0, 0] == pytest.approx((1e-6 / 1.98058) ** 2, rel=1e-3)
    assert k[0, 1, 1] > 0.99
    picks = greedy_dpp(k, 1)
    assert picks.tolist() == [[1]]  # the token least similar to the question is picked first


def test_degenerate_kernel_keeps_the_official_mask_count():
    # D = 8 < T = 32: the kernel's rank runs out, picks repeat; the official mask holds the distinct ones
    vis, img, txt = inputs(1, 64, 8, 16, 1, 3, torch.float32)
    meth = CDPruner(prune_ratio=0.5)
    sel = meth.reduce(vis, ctx_of(img, txt, torch.ones(1, dtype=torch.long)))
    k = conditional_kernel(vis, img, txt, torch.ones(1, dtype=torch.long))
    picks = greedy_dpp(k, 32)
    distinct = sorted(set(picks[0].tolist()))
    assert int(sel.n_kept[0]) == len(distinct) <= 32
    assert sel.kept_index[0, : len(distinct)].tolist() == distinct


def test_picks_to_kept_orders_and_pads():
    idx, n = picks_to_kept(torch.tensor([[5, 1, 3], [2, 2, 0]]), 6)
    assert idx.tolist()[0] == [1, 3, 5] and n.tolist() == [3, 2]
    assert idx.tolist()[1][:2] == [0, 2]


def test_ratio_zero_keeps_everything():
    vis, img, txt = inputs(1, 16, 8, 8, 1, 1, torch.float32)
    sel = CDPruner(prune_ratio=0.0).reduce(vis, ctx_of(img, txt, torch.ones(1, dtype=torch.long)))
    assert sel.kept_index[0].tolist() == list(range(16))


def test_bad_theta_refused():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError):
        CDPruner(prune_ratio=0.5, theta=1.5)
    assert CDPruner(prune_ratio=0.5, theta=0.5).theta == 0.5


def test_selection_flops_counts_products():
    from bench.measure.flops import count_flops

    n, d, dv, c, t = 96, 32, 24, 16, 20
    g = gen(4)
    vis, img, txt = torch.randn(1, n, d, generator=g), torch.randn(1, n, c, generator=g), torch.randn(1, 2, c, generator=g)
    proj = torch.nn.Linear(dv, c, bias=False)
    h = torch.randn(1, n, dv, generator=g)
    meth = CDPruner(prune_ratio=1 - t / n)

    def run():
        e = proj(h)
        return greedy_dpp(conditional_kernel(vis, e, txt, torch.tensor([2])), t)

    counted, _ = count_flops(run)
    shapes = SimpleNamespace(text_chunks=(2,), text_tower_flops=0, clip_projection_dim=c)
    cost = SimpleNamespace(batch=1, n_visual=n, llm_width=d, vision_width=dv, shapes=shapes)
    # the DPP's first einsum (a 1 x 1 by 1 x N contraction) runs as an elementwise product, which the counter does
    # not see; like all elementwise work the formula leaves it out too, so analytic == counted exactly
    assert meth.selection_flops(cost) == counted
    shapes.text_tower_flops = 1000
    assert meth.selection_flops(cost) == counted + 1000
    assert CDPruner(prune_ratio=0.0).selection_flops(cost) == 0


# ----------------------------------------------------------------------------- the adapter's CLIP text side
TEXT_SIZES = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "projection": 24}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from conftest import save_tiny_random_llava

    return save_tiny_random_llava(tmp_path_factory.mktemp("cdp-llava"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, llava_dir):
    """A tiny random CLIP checkpoint (CLIPModel layout + CLIP BPE tokenizer), as the training script writes one."""
    from transformers import LlavaForConditionalGeneration

    from bench.tiny_clip_text import build_clip, build_clip_tokenizer

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    tok = build_clip_tokenizer()
    clip = build_clip(llava.config.vision_config, len(tok), TEXT_SIZES, seed=1)
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    path = tmp_path_factory.mktemp("cdp-clip")
    clip.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(llava_dir, clip_dir):
    from bench.models.llava import LlavaAdapter

    return LlavaAdapter("tiny", str(llava_dir), device="cpu", dtype="float32", text_tower={"source": str(clip_dir)}).load()


def make_batch(adapter, questions):
    import numpy as np
    from PIL import Image

    from bench.tiny_llava import prompt_text

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in questions]
    batch = adapter.processor(images=imgs, text=[prompt_text(q) for q in questions], return_tensors="pt", padding=True)
    batch["texts"] = [q + "\nAnswer the question using a single word." for q in questions]
    return batch


def test_text_side_chunks_like_the_official_code(adapter):
    side = adapter.clip_text()
    short = side.encode_question("what color is the star?")
    assert short.shape == (1, TEXT_SIZES["projection"]) and short.dtype == torch.float32
    long_q = " ".join(["what color is the star?"] * 20)  # > 77 tokens: two chunks, the second zero-padded
    n_tok = len(side.tokenizer(text=long_q)["input_ids"])
    assert 77 < n_tok <= 154
    emb = side.encode_question(long_q)
    assert emb.shape[0] == 2
    ids = side.tokenizer(text=long_q, return_tensors="pt")["input_ids"]
    first = side.text_tower(input_ids=ids[:, :77], attention_mask=torch.ones(1, 77, dtype=torch.long)).text_embeds
    torch.testing.assert_close(emb[0], first[0])
    from bench.models.clip_text import question_text

    assert question_text("<image>\nwhat color?\nAnswer the question using a single word or phrase.") == "what color?"


@pytest.mark.integration
def test_prepare_uses_the_question(adapter):
    m = CDPruner(prune_ratio=0.75)
    adapter.check_method(m)
    batch = make_batch(adapter, ["what color is the star?", "how many circles are there?"])
    seeds = torch.tensor([1, 2])
    prepared = adapter.prepare(batch, m, seeds)
    assert prepared.visual_tokens_kept == [144, 144] or all(k <= 144 for k in prepared.visual_tokens_kept)
    assert prepared.extras["clip_text"]["chunks"] == [1, 1]
    assert adapter.generate(prepared, max_new_tokens=2, method=m).shape[0] == 2
    # per sample: the batch's second sample alone gives the same tokens
    one = adapter.prepare({k: v[1:] for k, v in batch.items()}, m, seeds[1:])
    tok = prepared.inputs_embeds[1][prepared.input_ids[1] == adapter.image_token_id]
    tok1 = one.inputs_embeds[0][one.input_ids[0] == adapter.image_token_id]
    torch.testing.assert_close(tok, tok1)
    # the same image with another question: the relevance (and so the kernel) changes
    hs = adapter.encode_images(batch["pixel_values"][:1], output_hidden_states=True)
    k = [m.kernel(hs[0], adapter.vision_context(seeds[:1], hs[1], m.needs, [q])) for q in ("what color is the star?", "is there a red square?")]
    assert not torch.equal(k[0], k[1])


def test_image_embeds_are_the_official_projection(adapter):
    from bench.models.clip_extras import vision_model

    batch = make_batch(adapter, ["what color is the star?"])
    feats, hidden = adapter.encode_images(batch["pixel_values"], output_hidden_states=True)
    ctx = adapter.vision_context(torch.zeros(1, dtype=torch.long), hidden, CDPruner.needs, batch["texts"])
    got = ctx.get("clip_image_embeds")
    vm = vision_model(adapter.model)
    side = adapter.clip_text()
    want = side.visual_projection(vm.post_layernorm(hidden[adapter.config.vision_feature_layer][:, 1:]).float())
    assert got.shape == (1, 576, TEXT_SIZES["projection"])
    assert torch.equal(got, want)
    assert ctx.get("clip_text_chunks").tolist() == [1]


def test_refused_without_text_tower(llava_dir, tmp_path):
    from bench.errors import IncompatibleMethodError, MissingWeightsError
    from bench.models.llava import LlavaAdapter

    with pytest.raises(IncompatibleMethodError, match="text tower"):
        LlavaAdapter("tiny", str(llava_dir), device="cpu", dtype="float32").check_method(CDPruner(prune_ratio=0.5))
    with pytest.raises(MissingWeightsError, match="no CLIP text tower"):
        LlavaAdapter("tiny", str(llava_dir), device="cpu", dtype="float32",
                     text_tower={"source": str(tmp_path / "absent")}).check_method(CDPruner(prune_ratio=0.5))
    # other methods do not care
    from methods.divprune import DivPrune

    LlavaAdapter("tiny", str(llava_dir), device="cpu", dtype="float32").check_method(DivPrune(prune_ratio=0.5))


def test_batch_without_texts_is_refused(adapter):
    from bench.errors import IncompatibleMethodError

    batch = make_batch(adapter, ["what color is the star?"])
    del batch["texts"]
    with pytest.raises(IncompatibleMethodError, match="question text"):
        adapter.prepare(batch, CDPruner(prune_ratio=0.5), torch.zeros(1, dtype=torch.long))


def test_probe_batch_carries_a_question(adapter):
    b = adapter.probe_batch(batch_size=2)
    assert b["texts"] == [adapter.PROBE_QUESTION] * 2
    prepared = adapter.prepare(b, CDPruner(prune_ratio=0.9), torch.zeros(2, dtype=torch.long))
    assert prepared.extras["clip_text"]["tower_flops"] > 0


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_analytic_flops_match_the_counter(adapter, ratio):
    """prepare + prefill counted by torch's FLOP counter == the analytic model (text tower included), exactly."""
    from test_flops import check  # tests/ is on sys.path

    _, analytic = check(adapter, CDPruner(prune_ratio=ratio), adapter.probe_batch(batch_size=1))
    assert analytic.selection > adapter.clip_text().tower_flops(1) > 0


def test_llava_next_only_per_tile():
    """LLaVA-NeXT runs CDPruner as its official code does, per full tile (tests/test_llava_next.py); other budgets are refused."""
    from bench.errors import IncompatibleMethodError
    from bench.families import adapter_for

    adapter_for("llava_next_7b", budget="tile").check_method(CDPruner(prune_ratio=0.5))
    with pytest.raises(IncompatibleMethodError, match="model.budget=tile"):
        adapter_for("llava_next_7b", budget="image").check_method(CDPruner(prune_ratio=0.5))


# ----------------------------------------------------------------------------- end to end through the CLI
def cli(*args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_cli_run_on_the_embedded_model(tmp_path):
    import json

    results = tmp_path / "results"
    r = cli("run", "model=tiny_llava_synth", "method=cdpruner", "ratio=0.75", "benchmark=synthvqa", "benchmark.limit=20",
            "measure=quick", f"results_dir={results}", "logger=none")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec_path,) = list((results / "runs").glob("*/record.json"))
    rec = json.loads(rec_path.read_text())
    assert rec["status"] == "completed" and rec["method"] == "cdpruner" and rec["n_samples"] == 20
    e = rec["efficiency"]
    assert e["visual_tokens_in"] == 576 and e["budget_tokens"] == 144
    # the tiny LLM is 128 wide: the kernel's rank ends the DPP's distinct picks before T = 144 (official arithmetic)
    assert 120 <= e["visual_tokens_kept"] <= 144 and e["budget_measured"] == pytest.approx(e["visual_tokens_kept"], abs=1e-3)
    assert e["tflops_selection_analytic"] > 0
    assert rec["config"]["model"]["text_tower"]["source"] == "bench:tiny-llava-synth/clip-text"


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("model.text_tower=null", "has none (model.text_tower is null)"),
    ("model.text_tower.source=/nonexistent/clip", "no CLIP text tower at /nonexistent/clip"),
])
def test_cli_refuses_a_missing_text_tower(tmp_path, override, message):
    results = tmp_path / "results"
    r = cli("run", "model=tiny_llava_synth", "method=cdpruner", "ratio=0.5", "benchmark=synthvqa", "benchmark.limit=4",
            "measure=quick", f"results_dir={results}", "logger=none", override)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert message in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert not (results / "runs").exists() or not any((results / "runs").iterdir())


def test_random_weights_build_a_random_text_side(llava_dir, tmp_path):
    """model.weights=random (efficiency-only runs): the text tower and visual_projection are built at the shapes of
    model.text_tower.config_file, no download; a hub text tower that is not cached is refused before model work."""
    import json

    from bench.errors import MissingWeightsError
    from bench.models.llava import LlavaAdapter

    cfg = json.loads((__import__("pathlib").Path(__file__).resolve().parent.parent / "bench/assets/configs/clip-vit-large-patch14-336.json").read_text())
    cfg["text_config"].update(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, projection_dim=40)
    cfg["projection_dim"] = 40
    (tmp_path / "clip.json").write_text(json.dumps(cfg))
    tower = {"source": "openai/clip-vit-large-patch14-336", "config_file": str(tmp_path / "clip.json")}
    ad = LlavaAdapter("tiny", str(llava_dir), weights="random", device="cpu", dtype="float32", config_file=None, text_tower=tower).load()
    ad.check_method(CDPruner(prune_ratio=0.9))
    side = ad.clip_text()
    assert side.projection_dim == 40 and side.visual_projection.in_features == ad.config.vision_config.hidden_size
    assert ad.text_tower_fingerprint() == "random-init"
    prepared = ad.prepare(ad.probe_batch(1), CDPruner(prune_ratio=0.9), torch.zeros(1, dtype=torch.long))
    assert prepared.visual_tokens_kept == [58]

    import os

    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(tmp_path / "empty-hf-home")
    try:
        pretrained = LlavaAdapter("tiny", str(llava_dir), device="cpu", dtype="float32", text_tower=tower)
        with pytest.raises(MissingWeightsError, match="not in the local Hugging Face cache"):
            pretrained.check_method(CDPruner(prune_ratio=0.9))
    finally:
        if old is None:
            os.environ.pop("HF_HOME")
        else:
            os.environ["HF_HOME"] = old
