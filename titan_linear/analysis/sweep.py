"""Train a grid of runs from one spec: `python -m titan_linear.analysis.sweep SPEC.toml`.

    python -m titan_linear.analysis.sweep sweeps/ratio_sweep.toml --dry-run
    python -m titan_linear.analysis.sweep sweeps/ratio_sweep.toml --gpus 0 --per-gpu 4 --eval
    python -m titan_linear.analysis.sweep sweeps/ratio_sweep.toml --parallel 2      # CPU
    python -m titan_linear.analysis.sweep sweeps/ratio_sweep.toml --slurm sweep.sbatch
    python -m titan_linear.analysis.sweep sweeps/ratio_sweep.toml --only 'ratio0.5-*'

The spec format is in titan_linear/analysis/sweep_spec.py and docs/sweeps.md. Before anything
runs, every run's config is built and checked as `python -m titan_linear.launch check` does
(keys, values, layer map, tokenizer, data, resume point, the dump folder's lock); a problem
stops the sweep with one line and exit status 2, nothing written or launched.

Each run trains in its own dump folder `<out>/<name>`, holding `run.json` (name, group,
base_config, overrides, seed; written before it starts) and `train.log`, launched as
run_train.sh launches (`python -m titan_linear.launch run`, one process, torchrun's c10d store on
a port the system picks, so runs share a machine without port clashes). The driver adds
`--checkpoint.enable` to every run: a run whose final step is checkpointed is skipped on a
re-run, and a cut one resumes from its newest checkpoint (TorchTitan's own resume); and
`--metrics.enable_tensorboard`, the events `python -m titan_linear.analysis.runs` reads.

Scheduling: one run at a time by default; `--gpus 0,1 --per-gpu K` runs K at once on each
listed GPU (CUDA_VISIBLE_DEVICES), `--parallel K` K at once without choosing GPUs (CPU). A
failed run is reported with the last line of its log and the others go on; the exit status is
1 when any run (or its evaluation) failed. `--eval` runs `python -m titan_linear.eval.perplexity`
on each final checkpoint with the run's validation data at 1x and 4x its training length
(`[eval]` in the spec), writing `<run>/eval/perplexity.json`, and with `[eval] harness_tasks` the
lm-eval harness on those tasks, writing `<run>/eval/harness.json`. `--slurm FILE` writes an sbatch
array script (one task per run) instead of running; `--dry-run` prints the runs and commands.
"""

import argparse
import concurrent.futures
import importlib.util
import fnmatch
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from titan_linear.analysis.sweep_spec import DRIVER_ON, Run, Spec, cli_args, load_spec
from titan_linear.cli import Parser, run_main, write_json, write_text
from titan_linear.config_errors import first_line

PROG = "titan_linear.analysis.sweep"
# Set by the driver for every run, after the spec's overrides (which may not turn DRIVER_ON off).
DRIVER_ARGS = [*(f"--{key}" for key in DRIVER_ON), "--metrics.disable_color_printing"]
# What would steer torchrun or the launcher away from a single-node, single-process run.
_STEERING = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_CONF", "NGPU",
             "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def _parser() -> Parser:
    p = Parser(prog="python -m titan_linear.analysis.sweep", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="the sweep spec (TOML)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the runs and their commands; run nothing")
    mode.add_argument("--slurm", metavar="FILE", help="write an sbatch array script (one task per run) instead of running")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", help="GPU indices to run on, e.g. 0,1 (one process per run)")
    where.add_argument("--parallel", type=int, default=None, help="runs at once, without choosing GPUs (CPU)")
    p.add_argument("--per-gpu", type=int, default=None, help="with --gpus: runs at once on each GPU (default 1)")
    p.add_argument("--eval", action="store_true",
                   help="evaluate each final checkpoint (perplexity at 1x and 4x seq_len; [eval] harness_tasks: lm-eval)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs (names or shell patterns)")
    return p


def slot_envs(args) -> list[dict[str, str]]:
    """One environment delta per concurrent slot; raises ValueError naming the flag."""
    if args.per_gpu is not None and args.gpus is None:
        raise ValueError(f"--per-gpu = {args.per_gpu} is not allowed: it needs --gpus")
    if args.gpus is not None:
        try:
            gpus = [int(g) for g in args.gpus.split(",")]
        except ValueError:
            gpus = []
        if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
            raise ValueError(f"--gpus = {args.gpus!r} is not allowed: distinct GPU indices separated by commas, e.g. 0,1")
        per = 1 if args.per_gpu is None else args.per_gpu
        if per < 1:
            raise ValueError(f"--per-gpu = {per} is not allowed: an integer >= 1")
        if not (args.dry_run or args.slurm):
            import torch

            if max(gpus) >= torch.cuda.device_count():
                raise ValueError(f"--gpus = {args.gpus!r} is not allowed: {torch.cuda.device_count()} CUDA devices are visible here")
        return [{"CUDA_VISIBLE_DEVICES": str(g)} for _ in range(per) for g in gpus]
    k = 1 if args.parallel is None else args.parallel
    if k < 1:
        raise ValueError(f"--parallel = {k} is not allowed: an integer >= 1")
    threads = {} if k == 1 or "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))}
    return [dict(threads) for _ in range(k)]


def train_args(spec: Spec, run: Run) -> list[str]:
    """The TorchTitan arguments of `run`."""
    return ["--job.config_file", spec.base, *cli_args(run.overrides), "--job.dump_folder", run.dump_folder, *DRIVER_ARGS]


def launch_command(spec: Spec, run: Run, python: str) -> list[str]:
    """`run` launched as run_train.sh does, with one process; port 0: the system picks a free one."""
    return [python, "-m", "titan_linear.launch", "run", "--nproc_per_node", "1", "--nnodes", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "--local-ranks-filter", "0",
            "--role", "rank", "--tee", "3", "--", *train_args(spec, run)]


def final_checkpoint(run: Run) -> str:
    from titan_linear.checkpoint import checkpoint_folder

    return os.path.join(checkpoint_folder(run.job_config), f"step-{run.steps}")


def last_step(run: Run) -> int | None:
    """The newest finished checkpoint step of `run` (None: none)."""
    from titan_linear.checkpoint import checkpoint_folder, complete_steps, step_folders

    steps = complete_steps(step_folders(checkpoint_folder(run.job_config)))
    return steps[-1] if steps else None


def finished(run: Run) -> bool:
    step = last_step(run)
    return step is not None and step >= run.steps


def eval_file(run: Run, name: str, ext: str) -> str:
    """<run>/eval/<name><ext>: an evaluation's result (".json") or log (".log")."""
    return os.path.join(run.dump_folder, "eval", name + ext)


def eval_commands(spec: Spec, run: Run, python: str) -> list[tuple[str, list[str]]]:
    """(name, command) of each evaluation of the final checkpoint; each writes eval_file(run, name, ".json").
    Perplexity on the run's validation data at each [eval] factor x seq_len; the lm-eval harness
    on [eval] harness_tasks when the spec lists any."""
    jc = run.job_config
    model = ["--config", spec.base, "--checkpoint", final_checkpoint(run)]
    ppl = [python, "-m", "titan_linear.eval.perplexity", *model, "--dataset", jc.validation.dataset,
           "--seq-lens", *(str(f * jc.training.seq_len) for f in spec.eval_factors), "--out", eval_file(run, "perplexity", ".json")]
    if jc.validation.dataset_path:
        ppl += ["--dataset-path", jc.validation.dataset_path]
    if spec.eval_max_tokens is not None:
        ppl += ["--max-tokens", str(spec.eval_max_tokens)]
    commands = [("perplexity", ppl)]
    if spec.eval_harness_tasks:
        harness = [python, "-m", "titan_linear.eval.harness", *model, "--tasks", *spec.eval_harness_tasks,
                   "--out", eval_file(run, "harness", ".json")]
        if spec.eval_harness_limit is not None:
            harness += ["--limit", str(spec.eval_harness_limit)]
        commands.append(("harness", harness))
    return [(name, [*cmd, "--", *cli_args(run.overrides)]) for name, cmd in commands]


def check_runs(spec: Spec, runs: list[Run], do_eval: bool) -> None:
    """Build and check every run's config as `launch check` does; raises ValueError naming the run."""
    from titan_linear.data import dataset_names
    from titan_linear.launch import check, preflight, with_config_module

    if do_eval and spec.eval_harness_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"[eval] harness_tasks = {spec.eval_harness_tasks!r} needs lm-eval, which is not "
                         "installed: pip install '.[eval]'")
    for run in runs:
        try:
            job_config, model_args = check(with_config_module(train_args(spec, run)))
            preflight(job_config, model_args)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"run {run.name}: {first_line(e)}") from None
        run.job_config, run.seed, run.steps = job_config, job_config.debug.seed, job_config.training.steps
        if do_eval and job_config.validation.dataset.lower() not in dataset_names():
            raise ValueError(f"run {run.name}: validation.dataset = {job_config.validation.dataset!r} is not allowed "
                             f"with --eval: one of {', '.join(dataset_names())}")
        record = os.path.join(run.dump_folder, "run.json")
        if os.path.isfile(record):
            with open(record) as f:
                old = json.load(f)
            new = run.record(spec.base)
            if {k: old.get(k) for k in ("base_config", "overrides")} != {k: new[k] for k in ("base_config", "overrides")}:
                raise ValueError(f"run {run.name}: {record} records other settings ({old.get('base_config')}, "
                                 f"{old.get('overrides')}); remove that folder or choose another out")


def parse_base(base: str, overrides: dict):
    """The JobConfig of `base` plus `overrides`, parsed and checked as `launch check` does."""
    from titan_linear.launch import check, with_config_module

    try:
        return check(with_config_module(["--job.config_file", base, *cli_args(overrides)]))[0]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"base = {base!r}" + (" with [fixed]" if overrides else "") + f": {first_line(e)}") from None


def select(runs: list[Run], patterns: list[str] | None) -> list[Run]:
    if not patterns:
        return runs
    for p in patterns:
        if not any(fnmatch.fnmatchcase(r.name, p) for r in runs):
            names = ", ".join(r.name for r in runs[:12]) + (", ..." if len(runs) > 12 else "")
            raise ValueError(f"--only = {p!r} is not allowed: no run of the spec is named so (runs: {names})")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


@dataclass
class Outcome:
    status: str  # done | skipped (finished before) | failed | stopped | not run
    minutes: float = 0.0
    message: str = ""
    eval: str = "-"  # - | done | skipped | failed


def last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class Runner:
    """Runs processes in slots; stops them all when the sweep is interrupted."""

    def __init__(self, slots: list[dict[str, str]]):
        self.slots: queue.Queue = queue.Queue()
        for s in slots:
            self.slots.put(s)
        self.live: set = set()
        self.lock = threading.Lock()
        self.stopping = False

    def env(self, delta: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _STEERING}
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.update(NNODES="1", PYTHONUNBUFFERED="1", **delta)
        return env

    def call(self, cmd: list[str], log: str, delta: dict[str, str]) -> int:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} titan_linear sweep: {shlex.join(cmd)}\n")
            f.flush()
            with self.lock:
                if self.stopping:
                    return -signal.SIGTERM
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(delta),
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                self.live.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.live.discard(proc)

    def stop(self) -> None:
        """SIGTERM every live launcher (torchrun stops its ranks), refuse new ones."""
        with self.lock:
            self.stopping = True
            for proc in self.live:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def execute(self, spec: Spec, run: Run, do_eval: bool, python: str) -> Outcome:
        delta = self.slots.get()
        try:
            return self._execute(spec, run, do_eval, python, delta)
        finally:
            self.slots.put(delta)

    def _execute(self, spec, run, do_eval, python, delta) -> Outcome:
        if self.stopping:
            return Outcome("not run")
        t0 = time.time()
        out = Outcome("skipped")
        if not finished(run):
            rc = self.call(launch_command(spec, run, python), os.path.join(run.dump_folder, "train.log"), delta)
            out = Outcome("done", (time.time() - t0) / 60)
            if self.stopping:
                out.status = "stopped"
            elif rc != 0 or not finished(run):
                why = last_line(os.path.join(run.dump_folder, "train.log"))
                if rc == 0:
                    why = f"ended without a checkpoint of step {run.steps} ({why})"
                return Outcome("failed", out.minutes, why)
        if do_eval and out.status in ("done", "skipped"):
            metadata = os.path.join(final_checkpoint(run), ".metadata")
            states = []
            for name, command in eval_commands(spec, run, python):
                result = eval_file(run, name, ".json")
                if os.path.isfile(result) and os.path.getmtime(result) >= os.path.getmtime(metadata):
                    states.append("skipped")  # newer than the checkpoint it evaluates
                    continue
                log = eval_file(run, name, ".log")
                rc = self.call(command, log, delta)
                states.append("done" if rc == 0 else "failed")
                if rc != 0:
                    out.message = f"eval {name}: {last_line(log)}"
            out.eval = "failed" if "failed" in states else "done" if "done" in states else "skipped"
            out.minutes = (time.time() - t0) / 60
        return out


def summary(runs: list[Run], outcomes: dict[str, Outcome]) -> str:
    rows = [("name", "status", "minutes", "step", "eval", "note")]
    for r in runs:
        o = outcomes.get(r.name, Outcome("not run"))
        step = last_step(r)
        rows.append((r.name, o.status, f"{o.minutes:.1f}", f"{'-' if step is None else step}/{r.steps}", o.eval, o.message))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + ("  " + row[5] if row[5] else "")
                     for row in rows)


def sweep(spec: Spec, runs: list[Run], slots, do_eval: bool, python: str) -> int:
    """Run `runs` in `slots`; print progress and the summary; 0 when every run (and eval) succeeded."""
    for run in runs:
        write_json(os.path.join(run.dump_folder, "run.json"), run.record(spec.base))
    runner = Runner(slots)
    outcomes: dict[str, Outcome] = {}

    def on_signal(signum, frame):
        print(f"{PROG}: signal {signum}: stopping the runs in progress", file=sys.stderr, flush=True)
        runner.stop()

    old = signal.signal(signal.SIGTERM, on_signal)
    t0 = time.time()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(slots)) as pool:
            futures = {pool.submit(runner.execute, spec, r, do_eval, python): r for r in runs}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    run, o = futures[fut], fut.result()
                    outcomes[run.name] = o
                    print(f"{PROG}: {run.name}: {o.status}" + (f" ({o.minutes:.1f} min)" if o.minutes else "")
                          + (f": {o.message}" if o.message else ""), file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                on_signal(signal.SIGINT, None)
                for fut, run in futures.items():
                    outcomes[run.name] = fut.result()
    finally:
        signal.signal(signal.SIGTERM, old)
    print(summary(runs, outcomes))
    print(f"{len(runs)} runs in {(time.time() - t0) / 60:.1f} min")
    bad = [n for n, o in outcomes.items() if o.status not in ("done", "skipped") or o.eval == "failed"]
    return 1 if bad or runner.stopping else 0


def slurm_script(spec: Spec, runs: list[Run], do_eval: bool, python: str) -> str:
    """An sbatch array script: task i trains runs[i] (skipped when its final step is saved)."""
    defaults = ["--ntasks=1", "--gpus-per-task=1", "--cpus-per-task=8"]
    given = {o.split("=")[0].split()[0] for o in spec.slurm_options}
    options = [o for o in defaults if o.split("=")[0] not in given] + spec.slurm_options
    name = os.path.splitext(os.path.basename(spec.path))[0]
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by: python -m titan_linear.analysis.sweep {shlex.quote(spec.path)} --slurm ...",
        f"# {len(runs)} runs, one array task each. Submit with: sbatch THIS_FILE",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --output={os.path.abspath(spec.out)}/slurm-%A_%a.out",
        *(f"#SBATCH {o}" for o in options),
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f"PYTHON=${{PYTHON:-{shlex.quote(python)}}}",
        "unset " + " ".join(_STEERING),
        "export NNODES=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, run in enumerate(runs):
        log = shlex.quote(os.path.join(run.dump_folder, "train.log"))
        train = '"$PYTHON" ' + shlex.join(launch_command(spec, run, python)[1:])
        lines += [f"  {i})  # {run.name}",
                  f"    if [[ ! -f {shlex.quote(os.path.join(final_checkpoint(run), '.metadata'))} ]]; then",
                  f"      {train} >> {log} 2>&1",
                  "    fi"]
        if do_eval:
            lines.append(f"    mkdir -p {shlex.quote(os.path.join(run.dump_folder, 'eval'))}")
            for name, command in eval_commands(spec, run, python):
                ev = '"$PYTHON" ' + shlex.join(command[1:])
                lines.append(f"    {ev} >> {shlex.quote(eval_file(run, name, '.log'))} 2>&1")
        lines.append("    ;;")
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    slots = slot_envs(args)
    spec = load_spec(args.spec, parse_base)
    runs = select(spec.runs, args.only)
    check_runs(spec, runs, args.eval)
    python = sys.executable
    if args.dry_run:
        for i, r in enumerate(runs):
            step = last_step(r)
            state = ("finished: skipped" if finished(r) else f"resumes from step {step}" if step is not None else "starts fresh")
            env = " ".join(f"{k}={v}" for k, v in slots[i % len(slots)].items())
            print(f"{r.name}  ({state}; group {r.group}, seed {r.seed}, {r.steps} steps)")
            print(f"  {env + ' ' if env else ''}{shlex.join(launch_command(spec, r, python))} >> {r.dump_folder}/train.log 2>&1")
            if args.eval:
                for _, command in eval_commands(spec, r, python):
                    print(f"  {shlex.join(command)}")
        print(f"{len(runs)} runs, {len(slots)} at a time")
        return 0
    if args.slurm:
        for r in runs:
            write_json(os.path.join(r.dump_folder, "run.json"), r.record(spec.base))
        write_text(args.slurm, slurm_script(spec, runs, args.eval, python), mode=0o755)
        print(f"wrote {args.slurm}: {len(runs)} array tasks; submit with: sbatch {args.slurm}")
        return 0
    return sweep(spec, runs, slots, args.eval, python)


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
