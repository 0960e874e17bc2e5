"""TorchTitan 0.2.2's integration matrix, run on the hybrid (`llama3_mixed`, ratio 0.5).

    python scripts/integration_matrix.py --list
    python scripts/integration_matrix.py --dry-cpu                  # the cases that fit 2 gloo ranks
    python scripts/integration_matrix.py --ngpu 8 --out outputs/matrix_h200x8
    python scripts/integration_matrix.py --ngpu 4 --cases pp4_interleaved_1f1b ckpt_fsdp4_to_hsdp_2x2

A driver of a repository checkout (it needs run_train.sh and train_configs/), so it lives in
scripts/. The torchtitan 0.2.2 wheel does not ship its `tests/integration_tests/` package
(OverrideDefinitions and the case lists stay in its git repository), so the cases are restated
here, each naming the upstream case it stands for: FSDP, HSDP, DDP, TP, PP with the 1F1B, GPipe,
Interleaved1F1B, InterleavedZeroBubble and ZBVZeroBubble schedules, their 2-D and 3-D products,
the AC modes (none, selective per-op, selective per-layer, full), torch.compile, float8,
context parallel, and checkpoints saved under one parallel layout and resumed under another.
Upstream cases that cannot apply to this model are listed too, skipped with the reason.

Every case trains the debug hybrid (train_configs/debug_model.toml) with 8 layers and an
explicit layer map of 4 linear layers (ratio 0.5) placed on the pipeline-stage boundaries of
the case's own pipeline split (TorchTitan's `generate_llm_fqn_per_model_part`), so that the
activations and gradients crossing stages come from and go into linear layers. Each run goes
through run_train.sh (the project's launcher, its checks and its ranks) and its losses are read
from its TensorBoard events by `titan_linear.analysis.runs`. What each case checks:
- training: every step logged, finite, and the mean of the last 3 losses at least
  LOSS_DROP below the mean of the first 3;
- checkpoint: run A trains CKPT_STEPS steps under layout 1 saving at step CKPT_AT; run B starts
  from A's step-CKPT_AT checkpoint under layout 2 (same data-parallel degree, so the same
  batches) and must log exactly steps CKPT_AT+1 .. CKPT_STEPS with A's losses within a relative
  RESUME_RTOL (fp32 on CPU) or RESUME_RTOL_GPU;
- refusal: a setting the hybrid refuses (context parallel with linear layers) must stop before
  any rank starts, exit status 2, with one line naming the key.
A case that cannot run here (too few GPUs, no CUDA for compile, no float8 hardware or torchao)
is reported as skipped with the reason. Results: `<out>/results.json` and `<out>/results.md`
(case, status, first/last loss, seconds, error line); each run's folder is `<out>/runs/<case>`.
Exit status 0 when no case failed, 1 otherwise, 2 on a bad flag.
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from titan_linear.cli import check_at_least, Parser, run_main, write_json, write_text

PROG = "scripts/integration_matrix.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TRAIN = os.path.join(ROOT, "run_train.sh")
CONFIG = os.path.join(ROOT, "train_configs", "debug_model.toml")

N_LAYERS = 8
STEPS = 10
CKPT_STEPS, CKPT_AT = 8, 4
LOSS_DROP = 0.1  # nats, mean of the last 3 logged losses against the first 3
RESUME_RTOL = 1e-4  # fp32 on the CPU
RESUME_RTOL_GPU = 2e-3  # fp32 with GPU kernels whose reduction order differs by layout; not yet measured
DRY_NGPU = 2

# Small and reproducible; TensorBoard on, since the losses are read from its events.
BASE = [
    "--model.n_layers", str(N_LAYERS), "--model.linear_attn_ratio", "0.5",
    "--training.seq_len", "64", "--training.local_batch_size", "4",
    "--lr_scheduler.warmup_steps", "2", "--debug.seed", "42", "--debug.deterministic",
    "--metrics.log_freq", "1", "--metrics.disable_color_printing",
    "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
]

LOOPED = ("Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


@dataclass(frozen=True)
class Layout:
    """One parallel layout; its ranks are the product of the degrees."""

    shard: int = 1
    replicate: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    schedule: str = "1F1B"

    @property
    def ngpu(self) -> int:
        return self.shard * self.replicate * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.shard * self.replicate

    @property
    def stages(self) -> int:
        return self.pp * (2 if self.schedule in LOOPED else 1) if self.pp > 1 else 1

    def args(self) -> list[str]:
        p = "--parallelism."
        out = [p + "data_parallel_shard_degree", str(self.shard), p + "data_parallel_replicate_degree",
               str(self.replicate), p + "tensor_parallel_degree", str(self.tp),
               p + "pipeline_parallel_degree", str(self.pp), p + "context_parallel_degree", str(self.cp)]
        if self.pp > 1:
            out += [p + "pipeline_parallel_schedule", self.schedule]
        return out


@dataclass(frozen=True)
class Case:
    """One case of the matrix.

    Args:
        name: the case's id (`--cases`).
        layout: the parallel layout of the (first) run.
        extra: more TorchTitan overrides for every run of the case.
        resume: checkpoint cases: the layout run B resumes under (None: no checkpoint check).
        needs: what the hardware must offer: "cuda" (compile: minutes of C++ builds on a CPU),
            "float8" (SM 8.9 or later and torchao).
        refused: the key of the one-line refusal the case expects (None: it must train).
        upstream: the TorchTitan 0.2.2 case (tests/integration_tests/features.py) it restates.
        not_applicable: why an upstream case cannot apply to this model (always skipped).
    """

    name: str
    layout: Layout = Layout()
    extra: tuple[str, ...] = ()
    resume: Layout | None = None
    needs: tuple[str, ...] = ()
    refused: str | None = None
    upstream: str = ""
    not_applicable: str | None = None

    @property
    def ngpu(self) -> int:
        return max(self.layout.ngpu, self.resume.ngpu if self.resume else 1)


AC_OP = ("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op")
COMPILE = ("--compile.enable",)
FLOAT8 = ("--model.converters", "quantize.linear.float8")
F2, T2 = Layout(shard=2), Layout(tp=2)

CASES = [
    # data parallel
    Case("fsdp2", F2, upstream="default (FSDP, AC none)"),
    Case("fsdp8", Layout(shard=8), upstream="default at 8 GPUs"),
    Case("fsdp2_reshard_always", F2, ("--parallelism.fsdp_reshard_after_forward", "always"),
         upstream="fsdp_reshard_always"),
    Case("fsdp2_foreach", F2, ("--optimizer.implementation", "foreach"), upstream="optimizer_foreach"),
    Case("ddp2", Layout(replicate=2), upstream="ddp (at 2)"),
    Case("ddp4", Layout(replicate=4), upstream="ddp"),
    Case("hsdp_2x2", Layout(shard=2, replicate=2), upstream="hsdp"),
    # activation checkpointing (AC none is fsdp2)
    Case("fsdp2_ac_full", F2, ("--activation_checkpoint.mode", "full"), upstream="AC full"),
    Case("fsdp2_ac_selective_op", F2, AC_OP, upstream="AC selective op"),
    Case("fsdp2_ac_selective_layer", F2, ("--activation_checkpoint.mode", "selective",
                                          "--activation_checkpoint.selective_ac_option", "2"),
         upstream="AC selective layer"),
    # torch.compile
    Case("fsdp2_compile", F2, COMPILE, needs=("cuda",), upstream="1d_compile"),
    Case("fsdp2_compile_ac_selective_op", F2, COMPILE + AC_OP, needs=("cuda",), upstream="1d_compile_sac_op"),
    Case("fsdp2_tp2_compile", Layout(shard=2, tp=2), COMPILE, needs=("cuda",), upstream="2d_compile"),
    Case("fsdp2_tp2_async_compile", Layout(shard=2, tp=2), COMPILE + ("--parallelism.enable_async_tensor_parallel",),
         needs=("cuda",), upstream="2d_asynctp_compile"),
    # tensor parallel
    Case("tp2", T2, upstream="2d_eager (TP alone)"),
    Case("fsdp2_tp2", Layout(shard=2, tp=2), upstream="2d_eager"),
    Case("hsdp_2x2_tp2", Layout(shard=2, replicate=2, tp=2), upstream="hsdp+tp"),
    # pipeline parallel
    Case("pp2_1f1b", Layout(pp=2, schedule="1F1B"), upstream="pp_1f1b"),
    Case("pp2_gpipe", Layout(pp=2, schedule="GPipe"), upstream="pp_gpipe"),
    Case("pp2_zbv", Layout(pp=2, schedule="ZBVZeroBubble"), upstream="pp_zbv"),
    Case("pp2_interleaved_1f1b", Layout(pp=2, schedule="Interleaved1F1B"), upstream="pp_looped_1f1b (at 2)"),
    Case("pp2_interleaved_zb", Layout(pp=2, schedule="InterleavedZeroBubble"),
         upstream="pp_looped_zero_bubble (at 2)"),
    Case("pp4_interleaved_1f1b", Layout(pp=4, schedule="Interleaved1F1B"), upstream="pp_looped_1f1b"),
    Case("pp4_interleaved_zb", Layout(pp=4, schedule="InterleavedZeroBubble"), upstream="pp_looped_zero_bubble"),
    Case("pp2_fsdp2_1f1b", Layout(pp=2, shard=2, schedule="1F1B"), upstream="pp_dp_1f1b"),
    Case("pp2_fsdp2_gpipe", Layout(pp=2, shard=2, schedule="GPipe"), upstream="pp_dp_gpipe"),
    Case("pp2_tp2", Layout(pp=2, tp=2), upstream="pp_tp"),
    Case("pp2_fsdp2_tp2", Layout(pp=2, shard=2, tp=2), upstream="pp_dp_tp"),
    Case("pp2_fsdp2_tp2_compile", Layout(pp=2, shard=2, tp=2), COMPILE, needs=("cuda",), upstream="3d_compile"),
    # float8 (TorchTitan's converter; refuses hardware before SM 8.9)
    Case("fsdp2_float8", F2, FLOAT8, needs=("float8",), upstream="float8 (h100 tests)"),
    Case("fsdp2_tp2_float8", Layout(shard=2, tp=2), FLOAT8, needs=("float8",), upstream="float8 + TP (h100 tests)"),
    # context parallel: the hybrid refuses it while it has linear layers
    Case("cp2", Layout(cp=2), refused="parallelism.context_parallel_degree", upstream="cp_allgather / cp_alltoall"),
    Case("fsdp2_cp2", Layout(shard=2, cp=2), refused="parallelism.context_parallel_degree", upstream="fsdp+cp"),
    # checkpoints: save under one layout, resume under another with the same data-parallel degree
    Case("ckpt_fsdp2_to_ddp2", F2, resume=Layout(replicate=2), upstream="full_checkpoint, across layouts"),
    Case("ckpt_tp2_to_pp2", T2, resume=Layout(pp=2, schedule="1F1B"), upstream="full_checkpoint, across layouts"),
    Case("ckpt_pp2_to_single", Layout(pp=2, schedule="GPipe"), resume=Layout(),
         upstream="full_checkpoint, across layouts"),
    Case("ckpt_fsdp4_to_hsdp_2x2", Layout(shard=4), resume=Layout(shard=2, replicate=2),
         upstream="full_checkpoint, across layouts"),
    Case("ckpt_pp2_fsdp2_tp2_to_fsdp2_tp4", Layout(pp=2, shard=2, tp=2), resume=Layout(shard=2, tp=4),
         upstream="pp_dp_tp (save/load, across layouts)"),
    # upstream cases that do not apply to this model
    Case("flex_attn", not_applicable="llama3_mixed has no flex/varlen-attention flavor (its linear layers "
         "take no attention mask)", upstream="fsdp+flex_attn, fsdp+varlen_attn"),
    Case("model_only_hf_checkpoint", not_applicable="no Hugging Face definition of the hybrid's linear layers "
         "to save in HF format", upstream="model_only_hf_checkpoint"),
    Case("pp_custom_csv", not_applicable="its schedule CSV is a torchtitan repository asset, not in the wheel",
         upstream="pp_custom_csv"),
    Case("cpu_offload_opt_in_bwd_cp", not_applicable="needs context parallel, which the hybrid refuses (cp2)",
         upstream="cpu_offload+opt_in_bwd+TP+DP+CP"),
]
BY_NAME = {c.name: c for c in CASES}


def layer_map(layout: Layout) -> list[int]:
    """N_LAYERS // 2 linear layers such that every pipeline-stage boundary has one on a side.

    The split is TorchTitan's own (embeddings and the output each weigh one layer); without
    PP the 2-stage 1F1B split is used, so that every case shares a map with its PP twin.
    First the layer after each uncovered boundary (a stage that starts linear), then the
    layers before the boundaries (stages that end linear), then the odd layers (the uniform
    placement's), then any.
    """
    from torchtitan.distributed.pipeline_parallel import generate_llm_fqn_per_model_part

    stages = layout.stages if layout.pp > 1 else 2
    parts = generate_llm_fqn_per_model_part(stages, N_LAYERS)
    firsts = [min(int(m.split(".")[1]) for m in part if m.startswith("layers."))
              for part in parts[1:] if any(m.startswith("layers.") for m in part)]
    chosen: list[int] = []
    for b in firsts:
        if b - 1 not in chosen and b not in chosen:
            chosen.append(b)
    for i in [b - 1 for b in firsts] + list(range(1, N_LAYERS, 2)) + list(range(N_LAYERS)):
        if i not in chosen and len(chosen) < N_LAYERS // 2:
            chosen.append(i)
    return sorted(chosen[:N_LAYERS // 2])


def map_args(case: Case) -> list[str]:
    """The layer map of a case: its PP layout's, the same for both runs of a checkpoint case."""
    pp = next((lay for lay in (case.layout, case.resume) if lay is not None and lay.pp > 1), case.layout)
    return ["--model.linear_attn_layers", *map(str, layer_map(pp))]


def skip_reason(case: Case, ngpu: int, dry: bool) -> str | None:
    """Why `case` cannot run with `ngpu` ranks here (None: it can)."""
    if case.not_applicable:
        return f"not applicable: {case.not_applicable}"
    if case.ngpu > ngpu:
        where = f"--dry-cpu runs {DRY_NGPU} gloo ranks" if dry else f"--ngpu {ngpu}"
        return f"needs {case.ngpu} ranks; {where}"
    if dry and "cuda" in case.needs:
        return "needs CUDA (torch.compile of the model on a CPU builds C++ for minutes)"
    if "float8" in case.needs:
        import importlib.util

        import torch

        if dry or not torch.cuda.is_available():
            return "needs float8 hardware (CUDA SM 8.9 or later); none here"
        if torch.cuda.get_device_capability() < (8, 9):
            return f"needs float8 hardware (SM 8.9 or later); this GPU is SM {torch.cuda.get_device_capability()}"
        if importlib.util.find_spec("torchao") is None:
            return "needs torchao (TorchTitan's float8 converter); not installed"
    return None


def train(args: list[str], ngpu: int, dump: str, dry: bool, timeout: int) -> tuple[int, str, float]:
    """One run_train.sh run: (exit status, its output, seconds). A run past `timeout` is killed
    (the launcher's process group; its ranks die with it) and reported as exit status 124."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "WORLD_SIZE",
                        "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env.update(NGPU=str(ngpu), LOG_RANK="0", PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # titan_linear then trains on the CPU with gloo
    os.makedirs(dump, exist_ok=True)
    cmd = [RUN_TRAIN, "--config", CONFIG, *BASE, "--job.dump_folder", dump, *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n{PROG}: killed after {timeout} s\n"
        rc = 124
    with open(os.path.join(dump, "train.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + out)
    return rc, out, time.monotonic() - t0


def losses_of(dump: str) -> dict[int, float]:
    """{step: loss} from the run's TensorBoard events (the metrics rank writes them)."""
    from titan_linear.analysis.runs import read_scalars, TAG_LOSS

    return dict(read_scalars(os.path.join(dump, "tb")).get(TAG_LOSS, []))


def error_line(rc: int, out: str) -> str:
    """The one line that says why a run failed: the launcher's, else the last line of the log."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    mine = [line for line in lines if "titan_linear: error:" in line or f"{PROG}:" in line]
    return (mine or lines or [f"exit status {rc}, no output"])[-1][:400]


def check_falls(losses: dict[int, float], steps: int) -> str | None:
    """None when steps 1..`steps` are all logged, finite, and the loss fell; else why not."""
    if sorted(losses) != list(range(1, steps + 1)):
        return f"logged steps {sorted(losses)}, expected 1..{steps}"
    values = [losses[s] for s in sorted(losses)]
    if not all(math.isfinite(v) for v in values):
        return f"non-finite loss: {values}"
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    if last > first - LOSS_DROP:
        return f"loss did not fall by {LOSS_DROP}: first 3 mean {first:.4f}, last 3 mean {last:.4f}"
    return None


def check_resumed(a: dict[int, float], b: dict[int, float], rtol: float) -> str | None:
    """None when run B logged exactly CKPT_AT+1..CKPT_STEPS with run A's losses within `rtol`."""
    want = list(range(CKPT_AT + 1, CKPT_STEPS + 1))
    if sorted(b) != want:
        return f"resumed run logged steps {sorted(b)}, expected {want[0]}..{want[-1]}"
    worst = max(want, key=lambda s: abs(b[s] - a[s]) / abs(a[s]))
    rel = abs(b[worst] - a[worst]) / abs(a[worst])
    if rel > rtol:
        return f"step {worst}: resumed loss {b[worst]:.6f} vs uninterrupted {a[worst]:.6f} (rel {rel:.2e} > {rtol:g})"
    return None


@dataclass
class Result:
    case: str
    ngpu: int
    status: str  # passed, failed, skipped
    upstream: str
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    error: str = ""
    layer_map: str = ""
    detail: dict = field(default_factory=dict)


def run_case(case: Case, out: str, dry: bool, timeout: int) -> Result:
    """Run every run of `case` and check it (module docstring)."""
    r = Result(case.name, case.ngpu, "failed", case.upstream)
    maps = map_args(case)
    linear = {int(i) for i in maps[1:]}
    r.layer_map = "".join("L" if i in linear else "S" for i in range(N_LAYERS))
    dump = os.path.join(out, "runs", case.name)
    shutil.rmtree(dump, ignore_errors=True)
    ckpt = (["--checkpoint.enable", "--checkpoint.interval", str(CKPT_AT), "--training.steps", str(CKPT_STEPS)]
            if case.resume else ["--checkpoint.no-enable", "--training.steps", str(STEPS)])
    first = os.path.join(dump, "a") if case.resume else dump
    rc, log, secs = train([*maps, *case.layout.args(), *case.extra, *ckpt], case.layout.ngpu, first, dry, timeout)
    r.seconds = secs
    if case.refused:
        line = error_line(rc, log)
        if rc == 2 and case.refused in line and "is not allowed" in line:
            r.status, r.error = "passed", f"refused as expected: {line}"
        else:
            r.error = f"expected a refusal naming {case.refused} (exit 2); got exit {rc}: {line}"
        return r
    if rc != 0:
        r.error = error_line(rc, log)
        return r
    if f"layer map {r.layer_map}" not in log:
        r.error = f"the log does not show layer map {r.layer_map}"
        return r
    a = losses_of(first)
    if a:
        r.first_loss, r.last_loss = a[min(a)], a[max(a)]
    problem = check_falls(a, CKPT_STEPS if case.resume else STEPS)
    if problem is None and case.resume:
        second = os.path.join(dump, "b")
        step = f"step-{CKPT_AT}"
        shutil.copytree(os.path.join(first, "checkpoint", step), os.path.join(second, "checkpoint", step))
        rc, log, secs = train([*maps, *case.resume.args(), *case.extra, *ckpt], case.resume.ngpu, second, dry,
                              timeout)
        r.seconds += secs
        if rc != 0:
            r.error = f"resumed run: {error_line(rc, log)}"
            return r
        b = losses_of(second)
        rtol = RESUME_RTOL if dry else RESUME_RTOL_GPU
        problem = check_resumed(a, b, rtol)
        r.detail = {"uninterrupted": a, "resumed": b, "rtol": rtol}
        if b:
            r.last_loss = b[max(b)]
    if problem:
        r.error = problem
    else:
        r.status = "passed"
    return r


def markdown(results: list[Result], title: str) -> str:
    def num(x):
        return "" if x is None else f"{x:.4f}"

    rows = [f"# {title}", "", "| case | ranks | status | first loss | last loss | seconds | layer map | "
            "TorchTitan case | error / reason |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        err = r.error.replace("|", "\\|")
        rows.append(f"| {r.case} | {r.ngpu} | {r.status} | {num(r.first_loss)} | {num(r.last_loss)} | "
                    f"{r.seconds:.0f} | {r.layer_map} | {r.upstream} | {err} |")
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    rows += ["", ", ".join(f"{n} {s}" for s, n in counts.items())]
    return "\n".join(rows) + "\n"


def _parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ngpu", type=int, default=None, help="GPUs to use: the cases that fit them run")
    mode.add_argument("--dry-cpu", action="store_true", help=f"run the cases that fit {DRY_NGPU} gloo ranks on the CPU")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME", help="only these cases (default: all)")
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "integration_matrix"),
                   help="folder for results.json, results.md and runs/")
    p.add_argument("--timeout", type=int, default=900, help="seconds one run may take before it is killed")
    return p


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check_at_least("--ngpu", args.ngpu)
    check_at_least("--timeout", args.timeout)
    for name in args.cases or []:
        if name not in BY_NAME:
            raise ValueError(f"--cases = {name!r} is not allowed: one of {', '.join(BY_NAME)} (see --list)")
    cases = [BY_NAME[n] for n in args.cases] if args.cases else CASES
    if args.list:
        for c in cases:
            print(f"{c.name:34s} {c.ngpu} ranks  {_describe(c)}  [TorchTitan: {c.upstream}]")
        return 0
    import torch

    dry = args.dry_cpu
    if dry:
        ngpu = DRY_NGPU
    else:
        present = torch.cuda.device_count()
        if present == 0:
            raise ValueError("--ngpu is not allowed here: no CUDA device is visible (on a CPU use --dry-cpu)")
        ngpu = args.ngpu or present
        if ngpu > present:
            raise ValueError(f"--ngpu = {ngpu} is not allowed: at most the {present} GPUs visible here")
    os.makedirs(args.out, exist_ok=True)
    hardware = f"CPU, gloo, {DRY_NGPU} ranks" if dry else f"{ngpu} x {torch.cuda.get_device_name()}"
    title = f"Integration matrix on llama3_mixed ({hardware})"
    results = []
    for c in cases:
        reason = skip_reason(c, ngpu, dry)
        if reason:
            r = Result(c.name, c.ngpu, "skipped", c.upstream, error=reason)
        else:
            print(f"{PROG}: {c.name} ({c.ngpu} ranks) ...", file=sys.stderr, flush=True)
            r = run_case(c, args.out, dry, args.timeout)
        print(f"{PROG}: {c.name}: {r.status}{' (' + r.error + ')' if r.error else ''}", file=sys.stderr, flush=True)
        results.append(r)
        doc = {"title": title, "dry_cpu": dry, "ngpu": ngpu, "steps": STEPS, "ckpt_steps": CKPT_STEPS,
               "ckpt_at": CKPT_AT, "loss_drop": LOSS_DROP, "results": [vars(x) for x in results]}
        write_json(os.path.join(args.out, "results.json"), doc)
        write_text(os.path.join(args.out, "results.md"), markdown(results, title))
    return 1 if any(r.status == "failed" for r in results) else 0


def _layout_text(lay: Layout) -> str:
    parts = [f"{k} {v}" for k, v in (("FSDP", lay.shard), ("DDP", lay.replicate), ("TP", lay.tp), ("PP", lay.pp),
                                     ("CP", lay.cp)) if v > 1]
    if lay.pp > 1:
        parts[-1 if lay.cp == 1 else -2] += f" {lay.schedule}"
    return " x ".join(parts) or "1 process"


def _describe(case: Case) -> str:
    """What `--list` shows of a case: layouts, overrides, what it needs or why it is not run."""
    if case.not_applicable:
        return f"not applicable: {case.not_applicable}"
    text = _layout_text(case.layout) + (f" -> resumed under {_layout_text(case.resume)}" if case.resume else "")
    if case.extra:
        text += " " + " ".join(case.extra)
    if case.needs:
        text += f" (needs {', '.join(case.needs)})"
    if case.refused:
        text += f" (must be refused: {case.refused})"
    return text


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
