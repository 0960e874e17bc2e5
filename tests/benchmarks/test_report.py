"""benchmarks/report.py renders SUMMARY.md (and plots, with matplotlib) from result JSON files."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

import pytest

REPORT = REPO / "benchmarks" / "report.py"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None

DEV = "Test GPU"
ATTENTION = [
    {"impl": "sdpa", "T": 1024, "batch": 8, "heads": 4, "head_dim": 64, "device": DEV, "ms": 10.0, "peak_gib": 0.5},
    {"impl": "chunked", "T": 1024, "batch": 8, "heads": 4, "head_dim": 64, "device": DEV, "ms": 4.0, "peak_gib": 1.25},
    {"impl": "sdpa", "T": 4096, "batch": 2, "heads": 4, "head_dim": 64, "device": DEV, "ms": 30.0, "peak_gib": 0.5},
    {"impl": "chunked", "T": 4096, "batch": 2, "heads": 4, "head_dim": 64, "device": DEV,
     "error": "OutOfMemoryError: CUDA out of memory"},
]
E2E = [
    # a failed first attempt, then the rerun that replaces it (the last row wins)
    {"config": "llama3_1b", "seq_len": 2048, "local_batch_size": 4, "returncode": 1, "error": ["boom"]},
    {"config": "llama3_1b", "seq_len": 2048, "local_batch_size": 4, "returncode": 0,
     "tokens_per_s": 40000, "mfu": 40.07, "peak_gib": 26.33, "final_loss": 5.34603, "device": DEV},
    {"config": "llama3_1b_linear_0.50", "seq_len": 2048, "local_batch_size": 4, "returncode": 0,
     "tokens_per_s": 30000, "mfu": 31.3, "peak_gib": 20.0, "final_loss": 5.25074, "device": DEV},
    {"config": "llama3_1b_linear_0.50", "seq_len": 8192, "local_batch_size": 1, "returncode": 0,
     "tokens_per_s": 35000, "mfu": 34.27, "peak_gib": 21.0, "final_loss": 5.2, "device": DEV},
]
INFERENCE = [
    {"config": "llama3_1b", "ratio": r, "context": c, "prefill_ms": 1.5 * c / 1024, "decode_ms_per_token": 7.25 + r,
     "cache_gib": 0.125 * c / 1024 * (1 - r) + 0.01, "peak_gib": 3.0, "device": DEV}
    for r in (0.0, 0.5) for c in (1024, 4096)
]


def _write(folder: Path, **files) -> None:
    for name, rows in files.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))


def _run(folder: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPORT), "--results", str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _rows(md: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell is `first_cell`."""
    out = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            out.append(cells)
    return out


def test_report_tables(tmp_path):
    _write(tmp_path, attention_h100=ATTENTION, e2e_h100=E2E, inference_h100=INFERENCE)
    proc = _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()

    # attention: T | batch | sdpa ms | chunked ms | chunked vs sdpa | sdpa GiB | chunked GiB
    assert "| T | batch | sdpa ms | chunked ms | chunked vs sdpa | sdpa GiB | chunked GiB |" in md
    assert _rows(md, "1024") == [["1024", "8", "10.0", "4.00", "2.50×", "0.500", "1.25"]]
    assert _rows(md, "4096")[0] == ["4096", "2", "30.0", "error", "—", "0.500", "—"]
    assert "chunked T=4096 head_dim=64: OutOfMemoryError: CUDA out of memory" in md

    # e2e: tokens/s relative to llama3_1b at the same seq_len; no baseline at 8192
    assert _rows(md, "llama3_1b") == [["llama3_1b", "2048", "4", "—", "40,000", "40.1%", "26.3", "1.00", "5.346"]]
    assert _rows(md, "llama3_1b_linear_0.50") == [
        ["llama3_1b_linear_0.50", "2048", "4", "—", "30,000", "31.3%", "20.0", "0.75", "5.251"],
        ["llama3_1b_linear_0.50", "8192", "1", "—", "35,000", "34.3%", "21.0", "—", "5.200"],
    ]
    assert "boom" not in md  # the failed row was replaced by its rerun

    # inference: ratio | context | batch | compile | prefill ms | decode ms/step | tokens/s | cache GiB |
    # peak GiB; rows without batch or compile (written before they existed) are batch 1, "off"
    assert _rows(md, "0.0") == [["0.0", "1024", "1", "off", "1.50", "7.25", "—", "0.135", "3.00"],
                                ["0.0", "4096", "1", "off", "6.00", "7.25", "—", "0.510", "3.00"]]
    assert _rows(md, "0.5")[1] == ["0.5", "4096", "1", "off", "6.00", "7.75", "—", "0.260", "3.00"]

    pngs = {"attention_h100_time.png", "attention_h100_memory.png", "inference_h100_decode.png",
            "inference_h100_memory.png"}
    if not HAS_MPL:
        assert "plots skipped: matplotlib is not installed" in proc.stdout
        pytest.skip("matplotlib is not installed: tables checked, plots not")
    for name in pngs:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"![{name}]({name})" in md


def test_report_inference_batches_and_compile_settings(tmp_path):
    step_ms = lambda ms, b: ms * (1 + b / 64)  # noqa: E731
    rows = [{"config": "llama3_1b", "ratio": 0.5, "context": 4096, "batch": b, "compile": comp, "device": DEV,
             "prefill_ms": 10.0 * b, "decode_ms_per_token": step_ms(ms, b), "tokens_per_s": 1000 * b / step_ms(ms, b),
             "cache_gib": 0.1 * b, "peak_gib": 3.0}
            for comp, ms in (("off", 2.0), ("on", 1.0)) for b in (1, 8, 64)]
    _write(tmp_path, inference_h200=rows)
    proc = _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    got = {(r[2], r[3], r[5], r[6]) for r in _rows(md, "0.5")}
    assert got == {("1", "off", "2.03", "492"), ("8", "off", "2.25", "3,556"), ("64", "off", "4.00", "16,000"),
                   ("1", "on", "1.02", "985"), ("8", "on", "1.12", "7,111"), ("64", "on", "2.00", "32,000")}
    if HAS_MPL:
        assert (tmp_path / "inference_h200_batch.png").exists() and "inference_h200_batch.png" in md
    assert "Traceback" not in proc.stderr


def test_report_inference_keeps_kv_splits_apart(tmp_path):
    # The same graph setting with and without splits are two rows, not one overwriting the other.
    rows = [{"config": "llama3_1b", "ratio": 0.5, "context": 32768, "batch": 1, "compile": "on", "decode": "cuda graph",
             "kv_splits": k, "device": DEV, "prefill_ms": 200.0, "decode_ms_per_token": ms,
             "tokens_per_s": 1000 / ms, "cache_gib": 0.5, "peak_gib": 5.0}
            for k, ms in ((1, 2.3), (16, 1.8))]
    _write(tmp_path, inference_h200=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    got = {(r[3], r[5]) for r in _rows(md, "0.5")}
    assert got == {("on", "2.30"), ("on, 16 kv splits", "1.80")}


def test_report_inference_keeps_fused_projections_apart(tmp_path):
    rows = [{"config": "llama3_1b", "ratio": 1.0, "context": 1024, "batch": 1, "compile": "on", "decode": "cuda graph",
             "kv_splits": 1, "fused_projections": f, "device": DEV, "prefill_ms": 50.0, "decode_ms_per_token": ms,
             "tokens_per_s": 1000 / ms, "cache_gib": 0.01, "peak_gib": 3.0}
            for f, ms in ((False, 1.43), (True, 1.25))]
    _write(tmp_path, inference_h200=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    assert {(r[3], r[5]) for r in _rows(md, "1.0")} == {("on", "1.43"), ("on, fused projections", "1.25")}


def test_report_reads_whichever_files_exist(tmp_path):
    _write(tmp_path, e2e_h100=E2E[1:3])
    proc = _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    assert "## End-to-end training (e2e_h100.json)" in md
    assert "Attention" not in md and "Inference" not in md
    assert _rows(md, "llama3_1b_linear_0.50")[0][7] == "0.75"
    assert not list(tmp_path.glob("*.png"))  # e2e has no plots
    assert "Traceback" not in proc.stderr


def test_report_keeps_linear_impls_apart(tmp_path):
    # the torch and the Triton path of linear layers, each against its own campaign's baseline
    rows = [dict(r, linear_attn_impl=impl, tokens_per_s=r["tokens_per_s"] * f)
            for impl, f in (("torch (chunked)", 1), ("triton", 2)) for r in E2E[1:3]]
    _write(tmp_path, e2e_h100=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    got = {(r[3], r[4], r[7]) for r in _rows(md, "llama3_1b_linear_0.50")}
    assert got == {("torch (chunked)", "30,000", "0.75"), ("triton", "60,000", "0.75")}


def test_report_scaling(tmp_path):
    base = {"config": "llama3_1b_linear_0.50", "seq_len": 8192, "local_batch_size": 1, "returncode": 0,
            "peak_gib": 30.0, "final_loss": 5.5, "device": DEV}
    rows = [dict(base, ngpu=1, extra_args="", tokens_per_s=40000),
            dict(base, ngpu=2, extra_args="", tokens_per_s=37000),
            dict(base, ngpu=2, extra_args="--parallelism.tensor_parallel_degree 2", tokens_per_s=30000),
            dict(base, ngpu=4, extra_args="", returncode=1, error=["NCCL timeout"]),
            dict(base, ngpu=4, extra_args="--parallelism.tensor_parallel_degree=2", tokens_per_s=15000)]
    _write(tmp_path, scaling_h200=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    assert "## Scaling (scaling_h200.json)" in md
    got = {(r[3], r[4], r[5], r[6]) for r in _rows(md, "llama3_1b_linear_0.50")}
    assert got == {("1", "—", "40,000", "100.0%"), ("2", "FSDP", "37,000", "92.5%"),
                   ("2", "--parallelism.tensor_parallel_degree 2", "30,000", "150.0% per TP group of 2"),
                   ("4", "--parallelism.tensor_parallel_degree=2", "15,000", "75.0% per TP group of 2"),
                   ("4", "FSDP", "failed", "—")}
    assert "llama3_1b_linear_0.50 seq_len 8192 on 4 GPUs: NCCL timeout" in md


def test_report_scaling_compares_within_a_campaign(tmp_path):
    """Each host / code version is set against its own one-GPU row, not the last one written."""
    base = {"config": "llama3_1b_linear_0.50", "seq_len": 8192, "local_batch_size": 1, "extra_args": "",
            "returncode": 0, "device": DEV}
    rows = [dict(base, campaign="host A", ngpu=1, tokens_per_s=50000),
            dict(base, campaign="host A", ngpu=4, tokens_per_s=46000),
            dict(base, campaign="host B", ngpu=1, tokens_per_s=40000),
            dict(base, campaign="host B", ngpu=2, tokens_per_s=38000)]
    _write(tmp_path, scaling_h200=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    got = {(r[3], r[6], r[9]) for r in _rows(md, "llama3_1b_linear_0.50")}
    assert got == {("1", "100.0%", "host A"), ("4", "92.0%", "host A"),
                   ("1", "100.0%", "host B"), ("2", "95.0%", "host B")}


def test_report_e2e_rows_with_overrides_compare_with_the_baseline_run_the_same_way(tmp_path):
    run = {"seq_len": 8192, "local_batch_size": 1, "returncode": 0, "device": DEV, "linear_attn_impl": "triton"}
    no_ac = "--activation_checkpoint.mode none"
    rows = [dict(run, config="llama3_1b", extra_args="", tokens_per_s=40000, peak_gib=26.0),
            dict(run, config="llama3_1b_linear_0.50", extra_args="", tokens_per_s=44000, peak_gib=26.0),
            dict(run, config="llama3_1b", extra_args=no_ac, tokens_per_s=50000, peak_gib=60.0),
            dict(run, config="llama3_1b_linear_0.50", extra_args=no_ac, tokens_per_s=60000, peak_gib=50.0)]
    _write(tmp_path, e2e_h100=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    got = {(r[4], r[5], r[8]) for r in _rows(md, "llama3_1b_linear_0.50")}
    assert got == {("—", "44,000", "1.10"), (no_ac, "60,000", "1.20")}


def test_report_e2e_compares_each_hybrid_with_the_softmax_config_of_its_shape(tmp_path):
    # One file with two shapes: each hybrid against its own shape's baseline, not llama3_1b's.
    run = {"seq_len": 8192, "local_batch_size": 1, "returncode": 0, "device": DEV, "linear_attn_impl": "triton",
           "extra_args": "", "peak_gib": 50.0}
    rows = [dict(run, config="llama3_1b", tokens_per_s=40000),
            dict(run, config="llama3_1b_linear_0.50", tokens_per_s=44000),
            dict(run, config="llama3_3b", tokens_per_s=20000),
            dict(run, config="llama3_3b_linear_0.50", tokens_per_s=21000),
            dict(run, config="llama3_3b_linear_1.00", tokens_per_s=30000)]
    _write(tmp_path, e2e_h200=rows)
    _run(tmp_path)
    md = (tmp_path / "SUMMARY.md").read_text()
    ratio = {c: _rows(md, c)[0][7] for c in ("llama3_1b", "llama3_1b_linear_0.50", "llama3_3b",
                                               "llama3_3b_linear_0.50", "llama3_3b_linear_1.00")}
    assert ratio == {"llama3_1b": "1.00", "llama3_1b_linear_0.50": "1.10", "llama3_3b": "1.00",
                     "llama3_3b_linear_0.50": "1.05", "llama3_3b_linear_1.00": "1.50"}
