"""tokenprune-bench: a reproducible harness for visual-token pruning in vision-language models.

Importing this package must stay cheap and must not import lmms-eval, wandb or datasets: the GPU
machine that runs efficiency measurements has none of them.
"""

__version__ = "0.1.0"
