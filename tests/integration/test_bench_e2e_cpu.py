"""benchmarks/e2e_train.py end to end on CPU: it drives run_train.sh with NGPU processes, reads the
run's TensorBoard events (titan_linear.analysis.runs) and writes rows the report reads (tokens/s
per process, every loss); the losses it read are those TorchTitan printed.

Run with `pytest -q tests/integration/test_bench_e2e_cpu.py -m integration`.
"""

import json
import subprocess
import sys

import pytest

from tests.integration.harness import clean_env, losses_of, run_train, strip_ansi, tail, REPO

pytestmark = pytest.mark.integration


def test_e2e_bench_two_processes_writes_a_row(tmp_path):
    out = tmp_path / "scaling.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "e2e_train.py"), "--configs", "debug_model",
            "--seq-lens", "64:2", "--steps", "12", "--log-freq", "1", "--ngpu", "2", "--out", str(out),
            "--log-dir", str(tmp_path / "logs"), "--device", "cpu"]
    proc = run_train(argv, env=clean_env())
    assert proc.returncode == 0, tail(proc.stdout)
    (row,) = json.loads(out.read_text())
    assert row["returncode"] == 0, row.get("error")
    assert (row["config"], row["seq_len"], row["local_batch_size"], row["ngpu"]) == ("debug_model", 64, 2, 2)
    assert row["linear_attn_impl"] == "torch (chunked)"  # CPU tensors take the torch path
    steps = [s for s, _ in row["losses"]]
    assert steps == list(range(1, 13)), steps  # rank 0's lines only, each step once
    losses = [loss for _, loss in row["losses"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it trained
    assert row["tokens_per_s"] > 0 and row["final_loss"] == losses[-1]
    printed = losses_of(strip_ansi((tmp_path / "logs" / "debug_model_64_2gpu.log").read_text()))
    assert sorted(printed) == steps
    for step, loss in row["losses"]:
        assert loss == pytest.approx(printed[step][0], abs=1e-5)  # the console prints 5 decimals

    # the report reads such rows as a scaling table
    (tmp_path / "scaling_cpu.json").write_text(out.read_text())
    rep = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "| debug_model | 64 | 2 | 2 | FSDP |" in (tmp_path / "SUMMARY.md").read_text()
