"""Run Triton kernels on the CPU: a check in a fresh Python under Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is imported, so each check runs in a subprocess
(the repository on ``PYTHONPATH``). Used by the kernel tests of TransPrune, VisPruner / DivPrune, the
selection kernels and the fused RoPE / RMSNorm.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_triton_interpreted(code: str, timeout: int) -> None:
    """Run ``code`` (which prints ``ok``) under Triton's CPU interpreter; skip where Triton is missing.

    Only a missing ``triton`` skips: any other failure (an ``InterpreterError`` included) fails the test.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0 and "No module named 'triton" in r.stderr:
        pytest.skip(f"Triton interpreter unavailable: {r.stderr.splitlines()[-1:]}")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
