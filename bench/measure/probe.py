"""The fixed input of a run's efficiency pass: the benchmark's first sample, or the adapter's synthetic one."""

from __future__ import annotations

import io
from typing import Any

import torch


def probe_batch(adapter, acc: dict[str, Any] | None, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """``batch_size`` copies of one processed sample (``input_ids``, ``attention_mask`` ``(B, L)``,
    ``pixel_values`` and whatever else the family's processor returns).

    With an accuracy pass (``acc``, from ``bench.evaluate.accuracy_pass``) whose documents carry an
    image: its first document, prompted as the evaluation prompted it. Otherwise the adapter's synthetic
    batch at the family's real shapes (``ModelAdapter.probe_batch``, seed 0; for LLaVA-1.5: 35 text
    tokens, the image, 25 text tokens). Costs and latency do not depend on the values, so methods
    compared on it see identical work.
    """
    if acc is not None and adapter.processor is not None and acc.get("split"):
        lm = acc["lm"]
        doc = lm.task_dict[acc["task"]][acc["split"]][0]
        image = _first_image(doc)
        if image is not None:
            prompt = lm._prompt(str(doc.get("question", "What is shown in the image?")))
            batch = adapter.process([image.convert("RGB")] * batch_size, [prompt] * batch_size)
            batch["texts"] = [str(doc.get("question", "What is shown in the image?"))] * batch_size  # the user text (CDPruner)
            return batch
    return adapter.probe_batch(batch_size=batch_size)


def _first_image(doc: Any):
    from PIL import Image

    if doc is None:
        return None
    for v in doc.values():
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, dict) and isinstance(v.get("bytes"), (bytes, bytearray)):
            return Image.open(io.BytesIO(v["bytes"]))
    return None
