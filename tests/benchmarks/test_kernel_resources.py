"""benchmarks/kernel_resources.py: the kernels compiled ahead of time for sm_90 on a machine
without a GPU, their registers, spills and tensor-core instructions read from the cubin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kernel_resources.py"


def _run(tmp_path, *args) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET: the interpreter replaces @triton.jit, and nothing would compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def _ptxas_or_skip():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no CUDA tools (ptxas)")


def test_compiles_every_kernel_for_sm90_and_honours_a_register_cap(tmp_path):
    _ptxas_or_skip()
    proc = _run(tmp_path, "--head-dim", "16", "--seq-len", "64", "--heads", "2", "--candidate", "chunk=32",
                "--candidate", "chunk=32,max_registers=32", "--out", "r.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["arch"] == 90
    free, capped = result["calls"]
    names = {(r["kernel"], r["variant"]) for r in free["kernels"]}
    # Forward and backward: the summary, both scans, and both variants of each per-chunk kernel.
    assert {("chunk_summary_kernel", ""), ("state_scan_kernel", ""), ("reverse_scan_kernel", "")} <= names
    for kernel in ("chunk_output_kernel", "bwd_query_kernel", "bwd_key_kernel"):
        assert {(kernel, "fast"), (kernel, "exact")} <= names
    for row in free["kernels"] + capped["kernels"]:
        assert 0 < row["registers"] <= 255 and row["instructions"] > 0
    per_chunk = [r for r in capped["kernels"] if "scan" not in r["kernel"]]
    assert all(r["registers"] <= 32 for r in per_chunk)
    # The products are tensor-core instructions in the compiled SASS.
    assert sum(r["hmma"] + r["hgmma"] for r in free["kernels"]) > 0


def test_bad_values_are_refused_in_one_line(tmp_path):
    for args, needle in ((["--head-dim", "48"], "--head-dim 48"), (["--seq-len", "100"], "--seq-len 100"),
                         (["--candidate", "max_registers=100", "--head-dim", "16"], "max_registers = 100"),
                         (["--arch", "9"], "--arch 9")):
        proc = _run(tmp_path, *args, "--out", "r.json")
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "r.json").exists()
