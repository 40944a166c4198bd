"""The fixed input of a run's efficiency pass: the benchmark's first sample, or a synthetic one."""

from __future__ import annotations

import io
from typing import Any

import torch


def probe_batch(adapter, acc: dict[str, Any] | None, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """``batch_size`` copies of one processed sample: ``input_ids``, ``attention_mask`` ``(B, L)`` and
    ``pixel_values`` ``(B, 3, H, W)``.

    With an accuracy pass (``acc``, from ``bench.evaluate.accuracy_pass``) whose documents carry an
    image, its first document, prompted as the evaluation prompted it. Otherwise synthetic: a
    LLaVA-1.5-shaped prompt (35 text tokens, the image, 25 text tokens; 60 text tokens as in
    methods.md's worked example) with seeded random token ids and pixels. Costs and latency do not
    depend on the values, so methods compared on it see identical work.
    """
    if acc is not None and adapter.processor is not None and acc.get("split"):
        lm = acc["lm"]
        doc = lm.task_dict[acc["task"]][acc["split"]][0]
        image = _first_image(doc)
        if image is not None:
            prompt = lm._prompt(str(doc.get("question", "What is shown in the image?")))
            return dict(adapter.processor(images=[image.convert("RGB")] * batch_size, text=[prompt] * batch_size, return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(0)
    cfg = adapter.config
    n = adapter.grid[0] * adapter.grid[1]
    vocab = cfg.text_config.vocab_size
    text = torch.randint(3, min(vocab, 32000), (60,), generator=g)
    text[text == adapter.image_token_id] = 3
    ids = torch.cat([text[:35], torch.full((n,), adapter.image_token_id), text[35:]]).unsqueeze(0).repeat(batch_size, 1)
    side = cfg.vision_config.image_size
    pix = torch.randn(1, 3, side, side, generator=g).repeat(batch_size, 1, 1, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix}


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
