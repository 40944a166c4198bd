"""Weights identity (issue 28): sha256 pins, every weight file in the fingerprint, pickles opted in, and the
committed run ids of the embedded model unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.errors import ConfigError, CorruptFileError
from bench.models.llava import ASSETS, LlavaAdapter, local_fingerprint
from bench.records import run_id

ROOT = Path(__file__).resolve().parent.parent
TINY = ASSETS / "tiny-llava-synth"


def model_group(name: str = "tiny_llava_synth", *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}", "device=cpu", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)["model"]


def adapter(source: Path, **kw) -> LlavaAdapter:
    m = model_group()
    m.update(source=str(source), **kw)
    m.pop("_target_")
    return LlavaAdapter(**m)


def test_committed_tiny_records_keep_their_run_ids():
    """The fingerprint now covers every weight file, and the model config gained sha256 pins and
    allow_pickle_weights; the embedded model (config.json + model.safetensors + tokenizer.json, no other
    weight file) keeps its fingerprint, and a freshly composed model config gives every committed record
    its recorded run id."""
    recs = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "runs").glob("*/record.json"))]
    recs = [r for r in recs if r.get("model") == "tiny_llava_synth" and r.get("config")]
    assert recs, "no committed tiny_llava_synth records"
    fp = local_fingerprint(str(TINY))
    fresh = model_group()
    assert "sha256" in fresh and fresh["allow_pickle_weights"] is False
    text_fp = local_fingerprint(str(TINY / "clip-text"))
    for r in recs:
        assert r["provenance"]["model_fingerprint"] == fp
        cfg = json.loads(json.dumps(r["config"]))
        cfg["model"] = {**fresh, "device": cfg["model"]["device"]}
        fps = {"model": fp, "benchmark": r["provenance"]["benchmark_fingerprint"]}
        if r["method"] == "cdpruner":  # question-conditioned: the CLIP text side's weights are part of its identity
            assert r["provenance"]["text_tower_fingerprint"] == text_fp
            fps["text_tower"] = text_fp
        assert run_id(cfg, fps) == r["run_id"]


def test_every_weight_file_counts(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(TINY, d)
    base = local_fingerprint(str(d))
    assert base == local_fingerprint(str(TINY))
    (d / "MODEL_CARD.md").write_text("edited")  # not a weight file
    assert local_fingerprint(str(d)) == base
    for extra in ("pytorch_model.bin", "extra.pt", "adapter.safetensors"):
        (d / extra).write_bytes(b"\x01" * 64)
        fp = local_fingerprint(str(d))
        assert fp != base, extra
        (d / extra).write_bytes(b"\x02" * 64)  # retrained .bin weights: a new run id, not "already recorded"
        assert local_fingerprint(str(d)) != fp, extra
        (d / extra).unlink()
    assert local_fingerprint(str(d)) == base


def test_the_shipped_tiny_model_is_pinned_and_passes():
    pins = model_group()["sha256"]
    assert set(pins) == {"model.safetensors"} and len(pins["model.safetensors"]) == 64
    adapter(TINY).check_weights()


def test_a_pin_mismatch_names_the_file(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(TINY, d)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:  # 4 KB overwritten in the middle: still a valid safetensors file
        fh.seek(f.stat().st_size // 2)
        fh.write(b"\x00" * 4096)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors does not match its pinned sha256"):
        adapter(d).fingerprint()
    (d / "model.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="pinned by model.sha256 but does not exist"):
        adapter(d).check_weights()


def _pickled_copy(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(TINY, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_pickled_weights_need_an_opt_in(tmp_path):
    d = _pickled_copy(tmp_path)
    with pytest.raises(ConfigError, match=r"pickled weights \(pytorch_model\.bin\).*model\.allow_pickle_weights=true"):
        adapter(d, sha256={}).fingerprint()
    a = adapter(d, sha256={}, allow_pickle_weights=True)
    assert a.fingerprint() != local_fingerprint(str(TINY))
    assert a.weights_format() == "pickle"
    assert adapter(TINY).weights_format() == "safetensors"
    a.load()
    assert a.model is not None


def test_a_malicious_pickle_opted_in_is_refused_unread(tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(TINY, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "PWNED").encode() + b"'\ntR.")
    a = adapter(d, sha256=None, allow_pickle_weights=True)
    with pytest.raises(CorruptFileError):
        a.load()
    assert not (tmp_path / "PWNED").exists()
