"""Invariants every pre-LLM method must satisfy, for every method of the registry (``methods.registry``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from methods import registry
from methods.base import VisionContext

CONF = Path(__file__).resolve().parent.parent / "conf"
METHODS = registry.names()
RATIOS = [0.0, 0.1, 0.5, 2 / 3, 0.75, 0.9, 0.95]


def make(name: str, ratio: float, seed: int = 0):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", f"ratio={ratio}", f"seed={seed}"])
    mcfg = {k: v for k, v in cfg.method.items() if k != "name"}
    return instantiate(mcfg)


def ctx(b: int, seeds=None, vis=None, method=None) -> VisionContext:
    """The plain context; methods that need vision-tower extras get tower-like ones derived from ``vis``
    (``tests/reference_vision.synthetic_extras``: per sample, so batch = per-sample still holds)."""
    s = torch.arange(b) * 7919 + 13 if seeds is None else seeds
    extras = {}
    if method is not None and method.needs:
        from reference_vision import synthetic_extras  # tests/ is on sys.path (rootdir-less test modules)

        extras = synthetic_extras(vis, method.needs)
    return VisionContext(grid=(24, 24), has_cls=True, sample_seeds=s, extras=extras)


def pre_llm_only(m) -> None:
    # in-vision methods (ToMe) merge inside the tower, in-LLM methods inside the decoder: their own
    # test files (test_vision_methods.py, test_llm_methods.py) run them there
    if m.stage == "in_vision":
        pytest.skip("in_vision method: covered through the tower in tests/test_vision_methods.py")
    if m.stage == "in_llm":
        pytest.skip("in_llm method: covered inside the LLM in tests/test_llm_methods.py")


def cases():
    for m in METHODS:
        for r in RATIOS:
            if m == "none" and r != 0.0:
                continue
            yield m, r


@pytest.fixture(scope="module")
def vis():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 576, 64, generator=g)


@pytest.mark.parametrize("name,ratio", list(cases()))
def test_shapes_counts_order(name, ratio, vis):
    m = make(name, ratio)
    pre_llm_only(m)
    out = m.reduce(vis, ctx(2, vis=vis, method=m))
    b, k, d = out.features.shape
    assert (b, d) == (2, 64)
    if name == "cdpruner" and k > d:  # a rank-d kernel: the DPP's picks repeat after ~d steps, the mask keeps fewer
        assert all(d <= c <= k for c in out.n_kept.tolist())
        c = int(out.n_kept.min())
        assert bool((out.kept_index[:, 1:c] > out.kept_index[:, : c - 1]).all())
        return
    assert out.n_kept.tolist() == [k, k]
    if out.kept_index is not None:
        assert k == m.n_keep(576)
        idx = out.kept_index
        assert idx.shape == (2, k)
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be sorted and unique"
        assert bool((idx >= 0).all() and (idx < 576).all())
        torch.testing.assert_close(out.features, vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, 64)))
    else:  # merging methods: close to the nominal budget
        assert abs(k - m.n_keep(576)) <= max(3, 0.05 * m.n_keep(576))


@pytest.mark.parametrize("name", METHODS)
def test_ratio_zero_is_identity(name, vis):
    m = make(name, 0.0)
    pre_llm_only(m)
    out = m.reduce(vis, ctx(2, vis=vis, method=m))
    assert torch.equal(out.features, vis)


@pytest.mark.parametrize("name,ratio", list(cases()))
def test_deterministic_and_batch_equals_per_sample(name, ratio, vis):
    m = make(name, ratio)
    pre_llm_only(m)
    seeds = torch.tensor([11, 22])
    a = m.reduce(vis, ctx(2, seeds, vis, m))
    b = make(name, ratio).reduce(vis, ctx(2, seeds, vis, m))
    assert torch.equal(a.features, b.features)
    for i in range(2):
        one = m.reduce(vis[i : i + 1], ctx(1, seeds[i : i + 1], vis[i : i + 1], m))
        assert torch.equal(one.features[0], a.features[i])


def test_ratio_out_of_range_is_refused():
    from bench.errors import ConfigError
    from methods.random import RandomPruning

    for bad in (-0.1, 1.0, 1.5, "x"):
        with pytest.raises(ConfigError):
            RandomPruning(prune_ratio=bad)


def test_none_refuses_nonzero_ratio():
    from bench.errors import ConfigError
    from methods.none import NoPruning

    with pytest.raises(ConfigError):
        NoPruning(prune_ratio=0.5)


def test_random_depends_on_seed_and_is_uniform(vis):
    m = make("random", 0.75)
    a = m.select(vis, ctx(2, torch.tensor([1, 1])))
    assert torch.equal(a[0], a[1])
    b = m.select(vis, ctx(2, torch.tensor([1, 2])))
    assert not torch.equal(b[0], b[1])
    counts = torch.zeros(576)
    for s in range(400):
        counts[m.select(vis[:1], ctx(1, torch.tensor([s])))[0]] += 1
    # every token is kept with probability 0.25: 100 expected out of 400 draws
    assert counts.min() > 50 and counts.max() < 160


def test_pool_windows_are_averages(vis):
    from methods.pool import Pool

    out = Pool(prune_ratio=0.75).reduce(vis, ctx(2))  # 576 -> 144 = 12x12, 2x2 windows
    grid = vis.reshape(2, 24, 24, 64)
    expect = grid[:, 0:2, 0:2].mean(dim=(1, 2))
    torch.testing.assert_close(out.features[:, 0], expect)
    expect_last = grid[:, 22:24, 22:24].mean(dim=(1, 2))
    torch.testing.assert_close(out.features[:, -1], expect_last)


def test_pooled_grid_published_sizes():
    from methods.pool import pooled_grid

    assert pooled_grid((24, 24), 144) == (12, 12)
    assert pooled_grid((24, 24), 64) == (8, 8)
    assert pooled_grid((24, 24), 192) == (16, 12)
