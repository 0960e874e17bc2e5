"""OELM end to end on the CPU: 2-rank FSDP2 through run_train.sh, frozen weights bit-identical
to their seeded orthogonal init after training and after checkpoint resume, absent from
optimizer state, never reduce-scattered; the parameter report in the run folder."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.harness import clean_env, losses_of, run_train, tail, REPO, SMALL
from titan_linear.models.oelm import orthogonal_weight

pytestmark = pytest.mark.integration

OELM_TOML = str(REPO / "train_configs" / "debug_oelm.toml")
SEED = 42  # SMALL's --debug.seed


def _load(step_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=False)


def _expected(i: int, proj: str, shape) -> torch.Tensor:
    return orthogonal_weight(tuple(shape), SEED * 1_000_003 + 8 * i + ("wq", "wk", "wv").index(proj))


def _check_frozen(sd: dict, ref: dict | None = None):
    """Frozen weights: the seeded orthogonal matrices (generated here with another thread count
    than the run's), orthogonal, equal to `ref`'s bit for bit, and without optimizer state."""
    torch.set_num_threads(2)
    for i in range(6):
        for proj in ("wq", "wk"):
            w = sd[f"layers.{i}.attention.{proj}.weight"]
            # the seeded matrix, to the float32 ulp (the run used 1 BLAS thread, this 2)
            torch.testing.assert_close(w, _expected(i, proj, w.shape), atol=1e-7, rtol=0)
            torch.testing.assert_close(w.T @ w, torch.eye(w.shape[1]), atol=1e-5, rtol=0)
            if ref is not None:
                assert torch.equal(w, ref[f"layers.{i}.attention.{proj}.weight"]), (i, proj)
    opt_keys = list(sd["optimizer"])
    assert not [k for k in opt_keys if ".attention.wq." in k or ".attention.wk." in k]
    assert [k for k in opt_keys if ".attention.wv.weight.exp_avg" in k]


def test_oelm_two_rank_fsdp_frozen_exact_through_resume(tmp_path):
    dump = tmp_path / "dump"
    common = ["--config", OELM_TOML, *SMALL, "--job.dump_folder", str(dump), "--checkpoint.enable",
              "--checkpoint.interval", "4"]
    proc = run_train([*common, "--training.steps", "8", "--training.max_norm", "1.0"], env=clean_env(NGPU=2))
    log = proc.stdout
    assert proc.returncode == 0, tail(log)
    assert "Applied FSDP to the model" in log and "dp_shard=2" in log, tail(log)
    assert "freeze map FFFFFF" in log, tail(log)
    losses = losses_of(log)
    assert sorted(losses) == list(range(1, 9)), tail(log)
    first_log = log
    assert losses[8][0] < losses[1][0] - 0.3, losses

    report = json.loads((dump / "param_report.json").read_text())
    assert report["frozen"] == 6 * 2 * 256 * 256
    assert report["trainable"] + report["frozen"] == report["total"]
    assert "Frozen parameters: 786,432" in (dump / "param_report.md").read_text()

    sd4 = _load(dump / "checkpoint" / "step-4", tmp_path)
    sd8 = _load(dump / "checkpoint" / "step-8", tmp_path)
    _check_frozen(sd8, ref=sd4)
    assert not torch.equal(sd4["layers.0.attention.wv.weight"], sd8["layers.0.attention.wv.weight"])

    # resume from step 8 with 4 more steps, under full activation checkpointing and a tiny
    # grad-norm threshold: loaded, trained on, spikes warned about, frozen weights unchanged
    proc = run_train([*common, "--training.steps", "12", "--activation_checkpoint.mode", "full",
                 "--monitor.grad_norm_warn", "1e-4"], env=clean_env(NGPU=2))
    log = proc.stdout
    assert proc.returncode == 0, tail(log)
    assert "Training starts at step 9" in log, tail(log)
    assert "Applied full activation checkpointing" in log, tail(log)
    assert re.search(r"WARNING - titan_linear: gradient norm spike at step 9: .*monitor.grad_norm_warn = 0.0001", log), tail(log)
    assert "gradient norm spike" not in first_log  # default threshold 100
    sd12 = _load(dump / "checkpoint" / "step-12", tmp_path)
    _check_frozen(sd12, ref=sd8)
    assert not torch.equal(sd12["layers.0.attention.wv.weight"], sd8["layers.0.attention.wv.weight"])


def test_fsdp2_reduce_scatters_only_trainable_grads(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "localhost:0", str(REPO / "tests" / "integration" / "fsdp_frozen_worker.py"),
            str(tmp_path)]
    proc = run_train(argv, env=clean_env(PYTHONPATH=str(REPO)), timeout=180)
    assert proc.returncode == 0, tail(proc.stdout)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["frozen_numel"] == 2 * 2 * 256 * 256
        assert r["frozen_names"] == [f"layers.{i}.attention.{p}.weight" for i in (0, 1) for p in ("wk", "wq")]
        assert r["frozen_grads"] == [] and r["trainable_without_grad"] == []
        # 3 steps; each reduce-scatter input holds the (unpadded: every dim0 is even) full gradients
        # of the trainable parameters of its group: the frozen weights are never communicated.
        assert r["reduce_scatter_numel"] == 3 * r["trainable_numel"], r
        assert r["frozen_unchanged"]
