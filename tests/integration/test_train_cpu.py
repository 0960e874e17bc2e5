"""End-to-end training runs on the CPU through run_train.sh (and the stock torchtitan entry point).

Every test launches real processes (torchrun, gloo) and parses what torchtitan logs.
Settings are kept small (seq 64, batch 4) so the whole module runs in a few minutes
on two cores. Run with `pytest -q tests/integration -m integration`.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import (
    ckpt_args, clean_env, DEBUG_TOML, descendants, dump_stacks, free_port, is_zombie, kill_tree, listening,
    losses_of, no_core_dumps, REPO, RUN_TIMEOUT, RUN_TRAIN, run_train, SMALL, strip_ansi, tail, VALIDATION_LINE,
)

pytestmark = pytest.mark.integration
























# --------------------------------------------------------------------------------------
# Run A: one process, 12 steps, checkpoint enabled. Shared by the resume and layer-map tests.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    dump = tmp_path_factory.mktemp("run_a") / "dump"
    proc = run_train(ckpt_args(dump))
    assert proc.returncode == 0, tail(proc.stdout)
    losses = losses_of(proc.stdout)
    assert sorted(losses) == list(range(1, 13)), tail(proc.stdout)
    # Saved only at the last step (interval 50 > 12 steps).
    assert (dump / "checkpoint" / "step-12" / ".metadata").is_file()
    return dump, losses, proc.stdout


# --------------------------------------------------------------------------------------
# 1. Two-rank FSDP
# --------------------------------------------------------------------------------------


def test_two_rank_fsdp_loss_falls(tmp_path):
    dump = tmp_path / "dump"
    proc = run_train(
        [*SMALL, "--training.steps", "14", "--parallelism.data_parallel_shard_degree", "-1",
         "--job.dump_folder", str(dump)],
        env=clean_env(NGPU=2),
    )
    log = proc.stdout
    assert proc.returncode == 0, tail(log)
    assert "Applied FSDP to the model" in log, tail(log)
    assert "dp_shard=2" in log, tail(log)
    assert "global batch size 8" in log, tail(log)  # 2 ranks x local batch 4
    assert "layer map SLSLSL" in log, tail(log)
    assert re.search(r"\[rank0\]:.*titan_linear layer map SLSLSL .*layers \[1, 3, 5\]", log), tail(log)

    losses = losses_of(log)
    assert sorted(losses) == list(range(1, 15)), tail(log)
    values = [losses[s][0] for s in sorted(losses)]
    assert all(v == v and 0 < v < 20 for v in values), values  # finite, plausible
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: first3 {values[:3]} last3 {values[-3:]}"


# --------------------------------------------------------------------------------------
# 2. Kill after the step-6 checkpoint, resume, match the uninterrupted run
# --------------------------------------------------------------------------------------










def _run_until_checkpoint(args, dump: Path, step: int, timeout=RUN_TIMEOUT) -> tuple[str, list[int]]:
    """Start run_train.sh in its own process group; SIGKILL it and all its workers as soon as
    the checkpoint for `step` is complete. DCP writes step-N/.metadata last, by an atomic
    rename, and torchtitan only resumes from a step-N folder that has it, so its presence
    is the mark of a finished save. Returns the output up to the kill and the killed pids."""
    proc = subprocess.Popen(
        [RUN_TRAIN, *args],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group
        preexec_fn=no_core_dumps,
    )
    lines: list[str] = []
    t = threading.Thread(target=lambda: lines.extend(strip_ansi(l) for l in proc.stdout), daemon=True)
    t.start()
    meta = dump / "checkpoint" / f"step-{step}" / ".metadata"
    deadline = time.monotonic() + timeout
    killed: list[int] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if meta.is_file():
                killed = [proc.pid, *descendants(proc.pid)]
                kill_tree(proc)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed:
            dump_stacks(proc)
            kill_tree(proc)
        proc.wait(timeout=60)
        t.join(timeout=30)
    out = "".join(lines)
    assert killed, f"run ended or timed out before the step-{step} checkpoint was saved:\n{tail(out)}"
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return out, killed


def test_resume_after_kill_matches_uninterrupted_run(run_a, tmp_path):
    _, losses_a, _ = run_a
    dump = tmp_path / "dump"
    args = ckpt_args(dump, interval=6)

    first, killed = _run_until_checkpoint(args, dump, step=6)
    assert len(killed) >= 2, killed  # torchrun (run_train.sh exec's it) and its worker
    time.sleep(1)
    for pid in killed:  # the kill was real: nothing of run B's first part lives on
        assert not Path(f"/proc/{pid}").exists() or is_zombie(pid), f"pid {pid} survived the kill"
    # It never reached its end: no final checkpoint, no clean finish.
    assert not (dump / "checkpoint" / "step-12").exists(), sorted(os.listdir(dump / "checkpoint"))
    assert "Training completed" not in first
    # What it logged before the kill agrees with run A.
    for s, (loss, _) in losses_of(first).items():
        assert loss == pytest.approx(losses_a[s][0], rel=1e-5, abs=0), s

    proc = run_train(args)
    log = proc.stdout
    assert proc.returncode == 0, tail(log)
    assert re.search(r"Loading the checkpoint from \S*step-6\b", log), tail(log)
    assert "Finished loading the checkpoint" in log, tail(log)
    assert "Training starts at step 7" in log, tail(log)
    losses_b = losses_of(log)
    assert sorted(losses_b) == list(range(7, 13)), tail(log)
    for s in range(7, 13):
        loss_b, gn_b = losses_b[s]
        loss_a, gn_a = losses_a[s]
        assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=0), (s, loss_b, loss_a)
        assert gn_b == pytest.approx(gn_a, rel=1e-4, abs=1e-4), (s, gn_b, gn_a)
    assert (dump / "checkpoint" / "step-12" / ".metadata").is_file()


# --------------------------------------------------------------------------------------
# 3. Resuming into a different layer map fails
# --------------------------------------------------------------------------------------


def test_resume_with_other_layer_map_fails(run_a, tmp_path):
    src, _, log_a = run_a
    assert "layer map SLSLSL" in log_a
    dump = tmp_path / "dump"
    shutil.copytree(src, dump)
    proc = run_train([*ckpt_args(dump, steps=14), "--model.linear_attn_ratio", "1.0"])
    log = proc.stdout
    assert proc.returncode != 0, tail(log)
    assert "layer map LLLLLL" in log, tail(log)  # the check passed and the model was built
    assert "SLSLSL" in log and "LLLLLL" in log, tail(log)
    # One error line names both maps: the checkpoint's and the model's.
    assert re.search(r"checkpoint layer map SLSLSL\b.*\blayer map LLLLLL\b", log), tail(log)
    assert losses_of(log) == {}, "trained on after a layer-map mismatch"


# --------------------------------------------------------------------------------------
# 4. Two nodes x one process on localhost
# --------------------------------------------------------------------------------------


# Milestones of a run in one node's log (torchrun's own lines need LOGLEVEL=INFO), in order,
# with what reaching one (and no later one) means.
_STAGES = (
    ("config OK", "config checked, torchrun started: in the rendezvous"),
    ("Rendezvous complete for workers", "rendezvous done: the worker is starting (process group, model)"),
    ("Training starts at step", "the worker is training"),
    ("worker group successfully finished",
     "the worker exited 0: torchrun is in its exit barrier, waiting for the other node's torchrun"),
    ("Done waiting for other agents", "past the exit barrier: torchrun is closing the rendezvous and exiting"),
)
NODE_SKEW = 90  # seconds one node may outlive the other before it counts as hung


def _stage(log: str) -> str:
    """Where a node's run got to, from its log."""
    reached = [i for i, (marker, _) in enumerate(_STAGES) if marker in log]
    where = _STAGES[max(reached)][1] if reached else "before the config check passed"
    steps = losses_of(log, rank=0)
    where += f"; last step logged: {max(steps)}" if steps else "; no step logged"
    return where + ("; 'Training completed' logged" if "Training completed" in log else "")


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> str | None:
    """Wait for every process; None when all exited, else why the wait stopped: the deadline,
    or a node still running NODE_SKEW s after another exited (the nodes train in lockstep)."""
    first_exit = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        done = [n for n, p in enumerate(procs) if p.poll() is not None]
        if done and first_exit is None:
            first_exit = (now, done[0])
        if now > deadline:
            return f"timed out after {RUN_TIMEOUT} s"
        if first_exit and now - first_exit[0] > NODE_SKEW:
            return f"still running {NODE_SKEW} s after node {first_exit[1]} exited"
        time.sleep(0.2)
    return None


def _nodes_report(what: str, states: list[str], logs: list[str], before: list[str] | None = None) -> str:
    """One message on all nodes: state and stage, the last 40 lines of each log and, after a
    timeout, the Python stacks each node's processes wrote when aborted (the log after `before`)."""
    before = before or logs
    out = [what]
    for node, (state, log) in enumerate(zip(states, before)):
        out.append(f"node {node}: {state}; {_stage(log)}")
    for node, log in enumerate(logs):
        stacks = log[len(before[node]):]
        out += [f"----- node {node}: last 40 lines -----", tail(before[node], 40)]
        if stacks.strip():
            out += [f"----- node {node}: Python stacks at the timeout -----", tail(stacks, 150)]
    return "\n".join(out)


def test_two_nodes_localhost(tmp_path):
    port = free_port()
    dump = tmp_path / "dump"
    args = [RUN_TRAIN, *SMALL, "--training.steps", "4", "--job.dump_folder", str(dump)]
    paths = [tmp_path / f"node{node}.log" for node in (0, 1)]

    def read() -> list[str]:
        return [strip_ansi(p.read_text(errors="replace")) for p in paths]

    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    problem, states, before = None, [], None
    try:
        for node, path in enumerate(paths):
            env = clean_env(NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NGPU=1,
                       RDZV_ID=f"titan_linear_test_{port}", LOGLEVEL="INFO")
            with open(path, "w") as f:
                procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True, preexec_fn=no_core_dumps))
            if node == 0:
                # Node 0 hosts the rendezvous store (run_train.sh: is_host=1); node 1 starts once it listens.
                while not listening(port) and procs[0].poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not listening(port):
                    problem = f"node 0 never listened on the rendezvous port {port}"
                    break
        problem = problem or _wait_all(procs, deadline)
        states = [f"exit code {p.returncode}" if p.poll() is not None else "still running" for p in procs]
        if problem:
            before = read()
            for p in procs:
                if p.poll() is None:
                    dump_stacks(p)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
            p.wait(timeout=60)
    logs = read()
    states += ["not started"] * (2 - len(states))
    assert not problem, _nodes_report(f"two-node run: {problem}", states, logs, before)
    for node, p in enumerate(procs):
        assert p.returncode == 0, _nodes_report(f"two-node run: node {node} failed", states, logs)
    # Each node shows its local rank 0 (LOG_RANK=0). With the c10d rendezvous torchrun
    # ignores NODE_RANK ("node_rank is only used for static rdzv_backend") and hands out
    # global ranks in join order, so either node may hold global rank 0; torchtitan logs
    # the globally averaged loss on every rank, so both nodes must show the same numbers.
    per_node = []
    for node, log in enumerate(logs):
        assert "dp_shard=2" in log, f"node {node}:\n{tail(log)}"  # world size 2
        assert "global batch size 8" in log, f"node {node}:\n{tail(log)}"  # 2 x local batch 4
        assert "Applied FSDP to the model" in log, f"node {node}:\n{tail(log)}"
        assert not re.search(r"^\[rank[1-9]\]:", log, re.M), f"node {node} shows another local rank"
        losses = losses_of(log, rank=0)
        assert sorted(losses) == [1, 2, 3, 4], f"node {node}:\n{tail(log)}"
        per_node.append(losses)
    for s in range(1, 5):
        assert per_node[0][s][0] == pytest.approx(per_node[1][s][0], rel=1e-6), s
        assert per_node[0][s][1] == pytest.approx(per_node[1][s][1], rel=1e-5), s


# --------------------------------------------------------------------------------------
# 5. Stock torchtitan entry point
# --------------------------------------------------------------------------------------


def test_stock_torchtitan_entry_point(tmp_path):
    dump = tmp_path / "dump"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
        "--local-ranks-filter", "0", "--role", "rank", "--tee", "3",
        "-m", "torchtitan.train",
        "--job.config_file", str(DEBUG_TOML),
        "--training.steps", "3",
        *SMALL,
        "--job.dump_folder", str(dump),
    ]
    proc = run_train(argv)
    log = proc.stdout
    assert proc.returncode == 0, tail(log)
    assert "titan_linear layer map SLSLSL" in log, tail(log)
    losses = losses_of(log)
    assert sorted(losses) == [1, 2, 3], tail(log)


# --------------------------------------------------------------------------------------
# 6. Bad configs stop before torchrun
# --------------------------------------------------------------------------------------


def _bad_toml(tmp_path: Path) -> Path:
    text = DEBUG_TOML.read_text()
    new, n = re.subn(r"(?m)^linear_attn_ratio\s*=.*$", 'linear_attn_ratio = "abc"', text)
    assert n == 1
    path = tmp_path / "bad_ratio.toml"
    path.write_text(new)
    return path


BAD = [
    pytest.param(["--model.linear_attn_ratio", "1.5"], "linear_attn_ratio", "1.5", id="ratio-1.5"),
    pytest.param(["--model.linear_attn_layers", "0", "0"], "linear_attn_layers", "0, 0", id="layers-dup"),
    pytest.param(["--model.linear_attn_layers", "0", "99"], "linear_attn_layers", "99", id="layers-99"),
    pytest.param(["--model.linear_attn_placement", "sideways"], "linear_attn_placement", "sideways",
                 id="placement"),
    pytest.param(["--model.n_heads", "7"], "n_heads", "7", id="n_heads-7"),
    pytest.param(None, "linear_attn_ratio", "abc", id="toml-ratio-abc"),
]


@pytest.mark.parametrize("args, key, value", BAD)
def test_bad_config_stops_before_torchrun(tmp_path, args, key, value):
    dump = tmp_path / "dump"
    prefix = ["--config", str(_bad_toml(tmp_path))] if args is None else []
    proc = run_train([*prefix, *(args or []), "--training.steps", "2", "--job.dump_folder", str(dump)],
                timeout=120, merge=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines, proc.stdout
    last = lines[-1]
    assert key in last and value in last, f"last stderr line: {last!r}\nstderr:\n{proc.stderr}"
    assert last.startswith("titan_linear: error:"), f"last stderr line: {last!r}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    # torchrun never started: no rank output, nothing written.
    assert "[rank0]" not in proc.stdout + proc.stderr
    assert not dump.exists()


# --------------------------------------------------------------------------------------
# 7. Validation
# --------------------------------------------------------------------------------------


def test_validation_loss_logged(tmp_path):
    dump = tmp_path / "dump"
    proc = run_train([*SMALL, "--training.steps", "6", "--job.dump_folder", str(dump),
                 "--validation.enable", "--validation.freq", "5", "--validation.steps", "2",
                 "--validation.seq_len", "64"])
    log = proc.stdout
    assert proc.returncode == 0, tail(log)
    assert sorted(losses_of(log)) == list(range(1, 7)), tail(log)
    vals = {int(m.group(1)): float(m.group(2)) for m in VALIDATION_LINE.finditer(log)}
    assert 5 in vals, tail(log)
    assert 0 < vals[5] < 20, vals
