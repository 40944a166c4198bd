"""Efficiency measurement: FLOPs, latency, KV-cache and peak memory.

Must not import lmms-eval, wandb or datasets (the GPU machine has none of them).
"""
