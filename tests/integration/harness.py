"""The harness of the integration tests: run run_train.sh for real (torchrun, gloo, CPU),
read what TorchTitan logs, and clean up whole process trees, hung or killed."""

import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


RUN_TRAIN = str(REPO / "run_train.sh")


DEBUG_TOML = REPO / "train_configs" / "debug_model.toml"


# Small, reproducible, quiet: what every training run here gets.
SMALL = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "4",
    "--metrics.log_freq", "1",
    "--metrics.disable_color_printing",
    "--metrics.no-enable-tensorboard",
    "--debug.seed", "42",
    "--debug.deterministic",
]


RUN_TIMEOUT = 240  # seconds for one run; a hang fails the test instead of the suite


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# torchtitan's training line: "step:  3  loss:  7.94247  grad_norm:  1.3369 ..."
# (the validation line, "validate step: 5  loss: ...", must not match).
STEP_LINE = re.compile(r"(?<!validate )\bstep:\s*(\d+)\s+loss:\s*([-+0-9.eE]+)\s+grad_norm:\s*([-+0-9.eE]+)")


VALIDATION_LINE = re.compile(r"validate step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+)")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def clean_env(**extra) -> dict:
    """The caller's environment minus anything that would steer torchrun, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "NGPU",
                     "LOG_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                     "TORCHELASTIC_RUN_ID", "TITAN_LINEAR_NO_CPU_SHIM")
    }
    # PYTHONFAULTHANDLER: a process sent SIGABRT (by dump_stacks, on a timeout) first writes
    # the Python stacks of all its threads to its stderr.
    env.update(PYTHON=sys.executable, NGPU="1", LOG_RANK="0", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def no_core_dumps() -> None:
    """Popen preexec_fn: the SIGABRT of dump_stacks must not leave core files behind."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_train(args, env=None, timeout=RUN_TIMEOUT, merge=True) -> subprocess.CompletedProcess:
    """Run run_train.sh (or any argv when args[0] is not an option) to completion.

    On a timeout the test fails with the tail of the output, which ends with the Python stacks
    of every process of the run (dump_stacks); the whole process tree is killed, workers too."""
    argv = args if args and not args[0].startswith("-") else [RUN_TRAIN, *args]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=no_core_dumps,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks(proc)
        kill_tree(proc)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, argv))}\n"
                    f"{tail(strip_ansi((out or '') + (err or '')), 120)}", pytrace=False)
    return subprocess.CompletedProcess(argv, proc.returncode, strip_ansi(out or ""),
                                       None if merge else strip_ansi(err or ""))


def losses_of(log: str, rank: int | None = 0) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad_norm)} from the training lines of `rank` (None: any line)."""
    out = {}
    for line in log.splitlines():
        if rank is not None and not line.startswith(f"[rank{rank}]:"):
            continue
        m = STEP_LINE.search(line)
        if m:
            out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return out


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def listening(port: int) -> bool:
    """Whether a TCP socket on this machine listens on `port` (read from /proc/net: no connection
    is made, so nothing is disturbed)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return True
    return False


def free_port() -> int:
    """A free port below the kernel's ephemeral range: no outgoing connection can take it before
    torchrun binds it, and a client that retries connecting to it cannot connect to itself (a TCP
    self-connect needs the port to be one the kernel hands out as a source port)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 20000))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        if not listening(port):
            return port
    raise AssertionError("no free TCP port found in 200 tries")


def ckpt_args(dump: Path, steps: int = 12, interval: int | None = None) -> list[str]:
    args = [
        *SMALL,
        "--training.steps", str(steps),
        "--job.dump_folder", str(dump),
        "--checkpoint.enable",
    ]
    if interval is not None:
        args += ["--checkpoint.interval", str(interval)]
    return args


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL run_train.sh's process group and every process under it.

    torchrun starts each worker in a session (process group) of its own, so killing
    the launcher's group alone would orphan the workers, which would train on. Stop
    the whole tree first (so nothing moves or forks), then kill it."""
    pids = [proc.pid, *descendants(proc.pid)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for pid in descendants(proc.pid):  # anything forked before the stop landed
        if pid not in pids:
            pids.append(pid)
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
    groups.discard(os.getpgid(0))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def dump_stacks(proc: subprocess.Popen) -> None:
    """SIGABRT every process of `proc`'s tree so that each writes its Python stacks to its stderr
    (PYTHONFAULTHANDLER=1, see clean_env) before dying: where a hung run was stuck. The deepest
    processes (the workers) go first, while torchrun still lives to copy their stderr to its own;
    then torchrun itself."""
    def abort(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass

    for pid in reversed(descendants(proc.pid)):
        abort(pid)
    time.sleep(3)
    abort(proc.pid)
    time.sleep(2)


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True
