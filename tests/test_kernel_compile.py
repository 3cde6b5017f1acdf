"""Every Triton kernel compiles for an H100 (sm_90) on this machine, GPU or not (bench/compile_check.py).

The interpreter runs the kernels' Python, not the compiler: type errors in loops, dot shapes and the
like only show up here. A subprocess, because this suite imports triton in interpreter mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; the sampler sets its own
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "FAILED" not in result.stdout
    # The K/V loads must have become asynchronous copies, not scalar loads.
    for line in result.stdout.splitlines():
        if line.startswith("paged_attention"):
            assert "cp.async 0," not in line, line
