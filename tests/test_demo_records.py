"""Every committed SynthVQA demo record still reproduces: the demo sweep with ``verify=true`` re-answers each
recorded run with today's code and compares the answers one by one (issue 22: behaviour is unchanged).

A method whose selection changes without a config change keeps its run id, so only re-answering catches a stale
record. Slow (the whole sweep, about 3 minutes on 2 cores): run by ``make test``, not ``make check``.

Records made on this CPU must reproduce exactly. On another CPU (or one the record does not name) kernels reduce in
another order (their vector width: AVX2, AVX512), and a near-tied answer can round the other way. Observed with every
package the record's, on the 58 records made elsewhere:

* AMD EPYC / AVX512: 6 records differed, in 1 or 2 answers each, always at the same two yes/no documents (44 and 94),
  the near ties of the tiny model;
* AMD EPYC / AVX2: 9 records, 1 or 2 answers each, at 5 documents: 44 and 94 again (FlowCut, G-Prune, HoloV,
  PruMerge, PruMerge+), and 7, 62 and 67 for VisPruner alone, whose official ``argsort`` breaks exact score ties in
  the order of the device's (here the CPU's vector) sort.

So there a record may differ in at most 2 answers, all records together in at most 15 records and at no more than 10
distinct documents, each reported as a warning. A change of a rule moves more than the same few near ties of a
record (and fails exactly on the record's own CPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_committed_demo_records_reproduce(tmp_path):
    shutil.copytree(ROOT / "results" / "runs", tmp_path / "runs")  # verify writes nothing, but never risk the committed tree
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "-m", "+sweep=demo", "benchmark.limit=100", "benchmark.batch_size=16",
         "logger=none", f"results_dir={tmp_path}", "verify=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    reproduced = [line for line in lines if ": reproduced: 100/100 answers identical" in line]
    rounding, different, documents = [], [], set()
    for i, line in enumerate(lines):
        if "NOT reproduced" not in line:
            continue
        hint = " ".join(lines[i + 1 : i + 4])  # verify's environment and CPU lines
        n = re.search(r"NOT reproduced: (\d+) of \d+ answers differ \(documents ([\d, ]+)\)", line)
        other_cpu = "recorded on another CPU" in hint or "names no CPU" in hint
        if other_cpu and n and int(n.group(1)) <= 2:
            rounding.append(f"{line} {hint}")
            documents |= {d.strip() for d in n.group(2).split(",")}
        else:
            different.append(f"{line} {hint}")
    assert not different, different
    assert len(rounding) <= 15 and len(documents) <= 10, (sorted(documents), rounding)
    for line in rounding:
        warnings.warn(f"answers differ on this CPU, within float rounding: {line}", stacklevel=1)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    # the demo sweep holds one combination `run` refuses by design (TransPrune's official schedule cannot reach 0.9
    # on the tiny model's 6 layers): exit 2 for that refusal only
    refused_only = bool(errors) and all("cannot reach" in e for e in errors)
    # a record not reproduced outweighs refusals in the exit code (3); here only when every difference is rounding
    assert proc.returncode == 0 or (proc.returncode == 2 and refused_only) or (proc.returncode == 3 and rounding), out[-3000:]
    assert len(reproduced) + len(rounding) >= 57, f"only {len(reproduced)} records verified:\n{out[-3000:]}"
