"""Shared fixtures: tiny random-config LLaVA models saved like a hub checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_SIZES = {"vision_hidden": 32, "vision_layers": 3, "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 2, "text_heads": 2, "text_mlp": 128}


def save_tiny_random_llava(path: Path, seed: int = 0) -> Path:
    """A random-weight LLaVA-1.5-architecture model (576 visual tokens) + processor in ``path``."""
    from bench.tiny_llava import build_model, build_processor

    model = build_model(TINY_SIZES, seed=seed)
    model.save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_random_llava(tmp_path_factory.mktemp("tiny-random-llava"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
