"""Batched evaluation gives the same answers: predictions at batch 8 equal batch 1 (CPU, fp32),
and every method at ratio 0 gives exactly the unpruned predictions.

Runs the project's lmms-eval model (`TokenPruneLlava.generate_until`: length-grouped batches, left
padding, per-sample pruning) on SynthVQA test questions with the embedded default model, for every
method at ratios 0, 0.5 and 0.9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.errors import BenchError

from methods import registry

CONF = Path(__file__).resolve().parent.parent / "conf"
METHODS = registry.names()
N_DOCS = 48  # six batches of 8 of mixed prompt lengths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bench.models.llava import ASSETS, LlavaAdapter
    from bench.synthvqa.data import load_test

    src = ASSETS / "tiny-llava-synth"
    if not (src / "config.json").exists():
        pytest.fail(f"the embedded model is missing at {src}")
    # with its CLIP text side, as conf/model/tiny_llava_synth.yaml configures it (CDPruner reads the question there)
    adapter = LlavaAdapter("tiny_llava_synth", str(src), device="cpu", text_tower={"source": "bench:tiny-llava-synth/clip-text"}).load()
    docs = load_test(cache_dir=tmp_path_factory.mktemp("synth"))[:N_DOCS]
    return adapter, docs


def requests(docs):
    from lmms_eval.api.instance import Instance

    from bench.tasks.synthvqa.task_utils import synthvqa_doc_to_text, synthvqa_doc_to_visual

    kw = {"post_prompt": "\nAnswer the question using a single word."}
    return [
        Instance("generate_until", (synthvqa_doc_to_text(d, kw), {"max_new_tokens": 8, "until": ["\n\n"]}, synthvqa_doc_to_visual, i, "synthvqa", "test"), idx=0, metadata={"task": "synthvqa", "doc_id": i, "repeats": 1})
        for i, d in enumerate(docs)
    ]


def predictions(adapter, method, docs, batch_size):
    from bench.lmms_model import TokenPruneLlava

    lm = TokenPruneLlava(adapter=adapter, method=method, batch_size=batch_size, seed=0)
    lm.task_dict = {"synthvqa": {"test": docs}}
    return lm.generate_until(requests(docs)), lm.stats


def build(name, ratio):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", f"ratio={ratio}"])
    return instantiate({k: v for k, v in cfg.method.items() if k != "name"})


CASES = [(m, r) for m in METHODS for r in (0.0, 0.5, 0.9) if not (m == "none" and r)]
_UNPRUNED: dict[str, list[str]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name,ratio", CASES)
def test_batch8_equals_batch1(setup, name, ratio):
    adapter, docs = setup
    torch.manual_seed(0)
    method = build(name, ratio)
    try:
        adapter.check_method(method)
        one, stats1 = predictions(adapter, method, docs, 1)
    except BenchError as e:  # a budget the tiny model cannot reach: the method's own refusal
        pytest.skip(f"{name} at ratio {ratio} refuses this model: {e}")
    eight, stats8 = predictions(adapter, method, docs, 8)
    assert len(one) == len(eight) == N_DOCS
    same = sum(a == b for a, b in zip(one, eight))
    assert same == N_DOCS, f"{N_DOCS - same} of {N_DOCS} predictions differ between batch 1 and 8"
    kept1 = {s["doc_id"]: s["visual_tokens_kept"] for s in stats1}
    kept8 = {s["doc_id"]: s["visual_tokens_kept"] for s in stats8}
    assert kept1 == kept8
    if ratio == 0.0:
        # ratio 0 reproduces the unpruned model exactly, whatever the method
        if "ref" not in _UNPRUNED:
            _UNPRUNED["ref"] = predictions(adapter, build("none", 0.0), docs, 8)[0]
        assert eight == _UNPRUNED["ref"], f"{name} at ratio 0 changes predictions"


@pytest.mark.slow
def test_auto_batch_size_resolves_and_matches_batch1(setup):
    """``batch_size=auto`` resolves at the first call (off CUDA: AUTO_CPU_BATCH) and answers as batch 1."""
    from bench.lmms_model import AUTO_CPU_BATCH, TokenPruneLlava

    adapter, docs = setup
    method = build("divprune", 0.5)
    one, _ = predictions(adapter, method, docs, 1)
    lm = TokenPruneLlava(adapter=adapter, method=method, batch_size="auto", seed=0)
    assert lm.batch_size is None
    lm.task_dict = {"synthvqa": {"test": docs}}
    auto = lm.generate_until(requests(docs))
    assert lm.batch_size == AUTO_CPU_BATCH == lm.auto_batch["batch_size"]
    assert auto == one
    assert lm.generate_s > 0 and all(len(s["generated_ids"]) >= 1 for s in lm.stats)


def test_batch_size_setting_is_validated():
    from bench.errors import ConfigError
    from bench.lmms_model import TokenPruneLlava
    from bench.build import validate

    for bad in (0, "0", "x", None):
        with pytest.raises(ValueError):
            TokenPruneLlava(adapter=object(), method=None, batch_size=bad)
    assert TokenPruneLlava(adapter=object(), method=None, batch_size="8").batch_size == 8
    cfg = {"ratio": 0.0, "model": {"name": "m"}, "method": {"name": "none"}, "benchmark": {"name": "b", "batch_size": "auto", "limit": None}}
    validate(cfg)
    for bad in (0, True, "16", 2.0):
        cfg["benchmark"]["batch_size"] = bad
        with pytest.raises(ConfigError):
            validate(cfg)


def test_provenance_records_the_resolved_batch_size(setup):
    from bench.provenance import provenance

    adapter, _ = setup
    cfg = {"benchmark": {"batch_size": "auto"}}
    fps = {"model": "x", "benchmark": "y"}
    p = provenance(cfg, adapter, fps, 16)
    assert p["batch_size"] == 16 and p["batch_size_setting"] == "auto"
    assert provenance(cfg, adapter, fps)["batch_size"] is None  # no evaluation ran: nothing was resolved
    assert provenance({"benchmark": {"batch_size": 4}}, adapter, fps)["batch_size"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_batch_size_probes_gpu_memory(tmp_path):
    pytest.importorskip("lmms_eval", reason="the lmms-eval model class needs lmms-eval (the lent GPU machine has none)")
    from bench.lmms_model import AUTO_MAX_BATCH, TokenPruneLlava
    from bench.models.llava import ASSETS, LlavaAdapter
    from bench.synthvqa.data import load_test

    adapter = LlavaAdapter("tiny_llava_synth", str(ASSETS / "tiny-llava-synth"), device="cuda").load()
    docs = load_test(cache_dir=tmp_path, n=16)
    lm = TokenPruneLlava(adapter=adapter, method=build("divprune", 0.5), batch_size="auto", seed=0)
    lm.task_dict = {"synthvqa": {"test": docs}}
    out = lm.generate_until(requests(docs))
    assert len(out) == 16
    a = lm.auto_batch
    assert 1 <= lm.batch_size == a["batch_size"] <= AUTO_MAX_BATCH
    assert a["per_sample_bytes"] > 0 and a["available_bytes"] > 0


def test_per_image_tower_assembles_the_batch(setup):
    """The per-image tower path (CUDA's default; eager off CUDA) stacks each image's features and every
    hidden state in batch order; on CPU fp32 the batched tower gives the same values."""
    adapter, docs = setup
    pix = adapter.processor.image_processor(images=[d["image"] for d in docs[:3]], return_tensors="pt")["pixel_values"]
    feats, hidden = adapter.vision_tower_per_image(pix, output_hidden_states=True)
    ref_f, ref_h = adapter.encode_images(pix, output_hidden_states=True)
    assert feats.shape == ref_f.shape and len(hidden) == len(ref_h)
    torch.testing.assert_close(feats, ref_f, rtol=1e-5, atol=1e-5)
    for a, b in zip(hidden, ref_h):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.vision_tower_per_image(pix[1:2]), ref_f[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_vision_features_do_not_depend_on_the_batch(tmp_path):
    """fp16 cuBLAS GEMMs change with the row count, so the adapter encodes one image at a time on CUDA:
    each image's features (and hidden states) inside a batch of 8 equal its batch-1 features bit for bit."""
    from bench.models.llava import ASSETS, LlavaAdapter
    from bench.synthvqa.data import load_test

    adapter = LlavaAdapter("tiny_llava_synth", str(ASSETS / "tiny-llava-synth"), device="cuda").load()
    docs = load_test(cache_dir=tmp_path, n=40)
    pix = adapter.processor.image_processor(images=[d["image"] for d in docs[::5]], return_tensors="pt")["pixel_values"]
    feats, hidden = adapter.encode_images(pix, output_hidden_states=True)
    for i in range(pix.shape[0]):
        f1, h1 = adapter.encode_images(pix[i : i + 1], output_hidden_states=True)
        assert torch.equal(feats[i : i + 1], f1)
        assert all(torch.equal(a[i : i + 1], b) for a, b in zip(hidden, h1))
    assert ("vision_tower", True, True) in adapter._graph_cache  # the per-image passes (tower + projector) were replayed from a graph
    # the replay runs the eager kernels: features equal an eager batch-1 pass bit for bit
    adapter.selection_graphs = False
    for i in range(pix.shape[0]):
        f1, h1 = adapter.encode_images(pix[i : i + 1], output_hidden_states=True)
        assert torch.equal(feats[i : i + 1], f1)
        assert all(torch.equal(a[i : i + 1], b) for a, b in zip(hidden, h1))
    assert torch.equal(adapter.encode_images(pix), feats)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tome_merging_does_not_depend_on_the_batch(tmp_path):
    """ToMe merges inside the tower: on CUDA it too runs one image at a time (graph replay), so a batch of 8
    gives each image its batch-1 merged features bit for bit."""
    from bench.models.llava import ASSETS, LlavaAdapter
    from bench.synthvqa.data import load_test

    adapter = LlavaAdapter("tiny_llava_synth", str(ASSETS / "tiny-llava-synth"), device="cuda").load()
    docs = load_test(cache_dir=tmp_path, n=40)
    pix = adapter.processor.image_processor(images=[d["image"] for d in docs[::5]], return_tensors="pt")["pixel_values"]
    method = build("tome", 0.75)
    seeds = torch.zeros(pix.shape[0], dtype=torch.long)
    sel = adapter.visual_selection(pix, method, seeds)
    for i in range(pix.shape[0]):
        one = adapter.visual_selection(pix[i : i + 1], method, seeds[:1])
        assert torch.equal(sel.features[i : i + 1], one.features)
