"""Timing with warm-up and repeats: CUDA events on GPU, ``perf_counter`` on CPU (labelled as such)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    repeats: int
    timer: str  # "cuda_events" | "wall_clock"
    samples_ms: list[float]


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> Timing:
    """Median and inter-quartile range of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        timer = "cuda_events"
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        timer = "wall_clock"
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(statistics.median(samples), q[2] - q[0], repeats, timer, samples)
