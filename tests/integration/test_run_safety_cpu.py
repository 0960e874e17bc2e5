"""Run safety end to end on the CPU: non-finite values stop every model, killing the launcher ends
its ranks, a live run holds its dump folder."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.integration.harness import (
    descendants, clean_env, kill_tree, no_core_dumps, run_train, strip_ansi, tail, is_zombie, REPO, RUN_TRAIN, SMALL,
)

pytestmark = pytest.mark.integration

OELM_TOML = str(REPO / "train_configs" / "debug_oelm.toml")


def _all_finite(step_dir: Path) -> tuple[int, list[str]]:
    """(tensors read, names of non-finite ones) of a DCP checkpoint, read on the CPU."""
    meta = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in meta.items() if hasattr(m, "size")}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return len(state), bad


@pytest.mark.parametrize("config", [None, OELM_TOML], ids=["llama3_mixed", "llama3_oelm"])
def test_nonfinite_run_stops_and_leaves_only_finite_checkpoints(tmp_path, config):
    dump = tmp_path / "dump"
    args = ([] if config is None else ["--config", config]) + [
        *SMALL, "--training.steps", "10", "--job.dump_folder", str(dump), "--optimizer.lr", "1e6",
        "--lr_scheduler.warmup_steps", "1", "--checkpoint.enable", "--checkpoint.interval", "1",
        "--checkpoint.keep_latest_k", "0",
    ]
    proc = run_train(args)
    assert proc.returncode == 1, tail(proc.stdout)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("titan_linear: non-finite "), tail(proc.stdout)
    assert "before the optimizer step" in last and " at step " in last, last
    assert "Traceback" not in proc.stdout, tail(proc.stdout, 80)
    # none of the noise every CPU run used to print
    for noise in ("does not exist!", "lspci", "fallback to A100", "Warmup steps", "CPU autocast"):
        assert noise not in proc.stdout, noise
    step = int(last.split(" at step ")[1].split(":")[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (dump / "checkpoint").glob("step-*"))
    assert saved == list(range(1, step)), (saved, step)
    for s in saved:
        n, bad = _all_finite(dump / "checkpoint" / f"step-{s}")
        assert n > 10 and not bad, (s, bad)
    if saved:
        assert f"the last checkpoint on disk (step-{saved[-1]}) is finite" in last
    # the lock went with the run
    assert not (dump / ".titan_linear.lock").exists()


def test_killed_launcher_ends_its_ranks_and_a_live_run_holds_its_folder(tmp_path):
    dump = tmp_path / "dump"
    args = [RUN_TRAIN, *SMALL, "--training.steps", "500", "--job.dump_folder", str(dump),
            "--checkpoint.enable", "--checkpoint.interval", "1"]
    proc = subprocess.Popen(args, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=no_core_dumps)
    lines: list[str] = []
    t = threading.Thread(target=lambda: lines.extend(strip_ansi(l) for l in proc.stdout), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 240
        while not (dump / "checkpoint" / "step-1" / ".metadata").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, tail("".join(lines))
            time.sleep(0.05)
        # a second run on the same dump folder is refused while the first lives
        second = run_train([*SMALL, "--training.steps", "2", "--job.dump_folder", str(dump)])
        assert second.returncode == 2, tail(second.stdout)
        err = second.stdout.strip().splitlines()
        assert len(err) == 1 and "job.dump_folder" in err[0] and "a live run holds it" in err[0], err
        ranks = [p for p in descendants(proc.pid)]
        assert ranks, "no rank process found"
        # SIGKILL to the launcher's process group (ranks run in their own sessions)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(not is_zombie(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [p for p in ranks if not is_zombie(p)]
        assert not alive, f"ranks still running after the launcher was killed: {alive}"
        steps = {p.name for p in (dump / "checkpoint").glob("step-*")}
        time.sleep(3)
        assert {p.name for p in (dump / "checkpoint").glob("step-*")} == steps
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        proc.wait(timeout=60)
        t.join(timeout=30)
    # the folder is free again: the dead launcher's lock does not hold, and a resume would start
    check = subprocess.run([sys.executable, "-m", "titan_linear.launch", "check",
                            "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
                            "--job.dump_folder", str(dump), "--checkpoint.enable"],
                           cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert check.returncode == 0 and "resuming from" in check.stderr, check.stderr
