"""bench/host_overhead.py engine still times every phase of a decode step: it wraps engine internals
(ModelRunner.execute's model, sampling kernel, sample_step and record_samples), so a rename there
would silently zero a row."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_host_overhead_engine_reports_every_phase_for_every_batch():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "host_overhead.py"), "engine", "--batches", "1", "4",
                          "--steps", "5", "--runs", "1"], capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    rows = {line[:46].strip(): line[46:].split() for line in out.splitlines()[2:] if line[:46].strip()}
    for phase in ("schedule", "inputs (update_states, pack_step, tensors)", "model call (subtracted)",
                  "sampling bookkeeping (sample_step, record)", "sampling kernel (CPU reference)", "apply (core.apply)",
                  "detokenize (NewToken, _on_token)", "stream (chat chunk + SSE)"):
        assert len(rows[phase]) == 2 and all(float(v) > 0 for v in rows[phase]), (phase, out)
    assert "target: engine host at batch 1 <= 300 us" in out
