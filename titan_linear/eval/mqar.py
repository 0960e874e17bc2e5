"""Multi-query associative recall (MQAR): how well each layer map recalls, from the command line.

    python -m titan_linear.eval.mqar --out results/mqar.json --plot results/mqar.png \\
        [--ratios 0 0.25 0.5 0.75 1] [--layer-maps SLLL ...] [--kv-pairs 4 8 16 32 64] \\
        [--seq-len 256] [--vocab 8192] [--n-layers 4] [--dim 128] [--heads 2] [--ffn-hidden 0] \\
        [--linear-options short_conv=4 output_gate=true ...] \\
        [--lrs 1e-3 3e-3 1e-2] [--train-examples 100000] [--test-examples 3000] \\
        [--epochs 16] [--batch-size 256] [--early-stop 0.99] [--gap-power 0.01] [--zero-filler] \\
        [--device cpu|cuda] [--dtype bf16|fp32] [--compile] [--parallel 1] [--seed 0] [--seeds 0 1 2] [--resume]

For every layer map (one per `--ratios` value, placed as training places it, uniform; plus
every explicit `--layer-maps` string, S = softmax, L = linear, one letter per layer) it trains
fresh models of the project's own classes (HybridModelArgs / HybridTransformer, built on meta and
materialised with `init_weights`, vocab = the MQAR vocab), once per learning rate of `--lrs`
(and per seed of `--seeds`, which sets the initial weights and the batch order; the data stay
those of `--seed`), from the same initial weights: AdamW (weight decay 0.1), cosine decay to 0
over `--epochs`, test accuracy after every epoch, early stop once it reaches `--early-stop`.

What a model trains on (`--train-on`):
- `mix` (default, Zoology's way): one model per (layer map, lr, seed) on a mixture of every
  `--kv-pairs` count (`--train-examples` split equally), scored on a test set per count. The
  small counts teach the lookup the large ones need: trained on 64 pairs at T = 256 alone, even
  softmax learned nothing here (benchmarks/results/eval/README.md).
- `each`: one model per kv count, trained on that count alone.
The score of a run is the mean over kv counts of the test accuracy (each count weighs the
same); early stop and the choice of lr read it, and a run's accuracy per kv count is taken at
its best epoch. The result of (layer map, kv) is that accuracy at the best learning rate, with
several seeds its mean over seeds (the best lr has the best mean), with the range and std.
The data follow Zoology's recipe (titan_linear/eval/mqar_data.py).

Default grid: ratios 0, 0.25, 0.5, 0.75, 1 of 4 layers (SSSS, SSLS, SLSL, LLSL, LLLL, as
`place_layers` places them), each trained on the mix of kv 4, 8, 16, 32, 64 at T = 256,
V = 8192, dim 128, 2 heads, learning rates 1e-3, 3e-3, 1e-2 (Zoology sweeps 1e-4 ... 1e-2 or
1e-3 ... 3e-2; 1e-4 and 3e-4 learned nothing here), 100k train examples (20k per count) and 1k
test examples per count, at most 16 epochs of batch 256: 15 training runs.

`--linear-options KEY=VALUE ...` builds every linear layer with the options of the layer (the
`[model]` keys `linear_attn_KEY`, checked as a config checks them; docs/attention.md); they are
recorded in the settings and name the plot's lines.

Differences from Zoology: 4 layers by default (Zoology: 2; `--n-layers 2` gives theirs); the
blocks are llama3's, with RMSNorm and RoPE on the softmax layers; `--ffn-hidden 0` (default)
removes the SwiGLU FFN's width (Zoology's MLP-free models), a positive value keeps an FFN of
that hidden width. Loss and accuracy are computed on the queried positions only (the others
carry no label), so the output layer runs on those positions alone.

On CUDA the forward runs under bf16 autocast (`--dtype fp32` turns it off) and `--compile`
compiles it (one compiled step function, shared by every model of the same shape). The runs go
one after another, or with `--parallel N` in N worker processes at once (torch.multiprocessing,
"spawn", so each worker has its own CUDA context on the one GPU): every worker builds the data of
its kv count from the same seed and runs the same training function, the results are gathered in
the serial order, and the JSON is the same whatever N (`parallel` is recorded in the settings).
On the CPU each worker gets the parent's torch threads divided by N (at least 1). A job's
exception stops the command with one line naming its (layer map, kv, lr, seed), exit status 1,
and writes no result; the jobs finished so far stay in the journal `<out>.jobs.jsonl` (one line
each, appended as they finish), and `--resume` with the same settings runs only the others. On
one H200, 14 workers gave about 3.2 times the throughput of one (the GPU time-slices between
processes).

Output: JSON with the settings and, per (layer map, kv), the accuracy, best lr, its steps, the
accuracy per seed with its min, max and std, every learning rate's final accuracy and every run's
curve (accuracy and loss per epoch); with `--plot`, accuracy against kv pairs, one line per
layer map, error bars spanning the seeds. Bad input stops with one line
naming the flag and the value, exit status 2, and writes nothing.

Measured on one H200 (benchmarks/results/eval/README.md): the default grid with `--device cuda
--compile --parallel 15` took 10.9 minutes. Softmax (SSSS) reached >= 0.99 at every count from 4
to 64 pairs (Zoology's result); all-linear (LLLL) fell from 0.93 at 4 pairs to 0.30 at 64; the
hybrids stayed >= 0.96 up to 32 pairs. Hybrid cells move by tens of points between runs of one
seed: use several `--seeds` before comparing hybrids. The CPU tests show a tiny softmax model
learning a tiny MQAR (T 32, 4 pairs, vocab 64) to >= 0.98 within 3 epochs for 5 of 5 seeds.
"""

import importlib.util
import json
import logging
import math
import os
import sys
import time
import warnings

from titan_linear.cli import device_and_dtype, Parser, run_main, write_json
from titan_linear.config_errors import first_line
from titan_linear.eval.report import pyplot, save_figure

PROG = "titan_linear.eval.mqar"
DEFAULT_RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _parser() -> Parser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON result file")
    p.add_argument("--plot", default=None, help="a PNG of accuracy against kv pairs (needs matplotlib)")
    p.add_argument("--ratios", type=float, nargs="+", default=None,
                   help="linear-attention ratios, placed uniformly (default 0 0.25 0.5 0.75 1 "
                        "unless --layer-maps is given)")
    p.add_argument("--layer-maps", nargs="+", default=[], help="explicit maps, e.g. SLLL (S softmax, L linear)")
    p.add_argument("--kv-pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn-hidden", type=int, default=0, help="SwiGLU hidden width; 0 (default) removes the FFN")
    p.add_argument("--linear-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="options of every linear layer, as the [model] keys linear_attn_KEY (docs/attention.md), "
                        "e.g. short_conv=4 output_gate=true; default none (the seed's layer)")
    # 1e-4 and 3e-4 learned nothing in 16 epochs for any layer map on an H200 (kv 4, 8 runs), and
    # 3e-3 won most groups: the default sweep starts at 1e-3 and goes one step beyond 3e-3.
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--train-on", default="mix", choices=["mix", "each"],
                   help="mix (default, Zoology's): one model per layer map and lr trained on every --kv-pairs "
                        "count at once, scored on each; each: one model per kv count")
    p.add_argument("--train-examples", type=int, default=100_000,
                   help="training examples (with --train-on mix, split equally over the kv counts)")
    p.add_argument("--test-examples", type=int, default=1_000, help="test examples per kv count")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--early-stop", type=float, default=0.99, help="stop a run once test accuracy reaches this")
    p.add_argument("--gap-power", type=float, default=0.01, help="query-gap power law (Zoology's 0.01; 1 = uniform)")
    p.add_argument("--zero-filler", action="store_true", help="token 0 between queries (default: random tokens)")
    p.add_argument("--device", default=None, help="cpu or cuda; default cuda when there is one")
    p.add_argument("--dtype", default=None, help="bf16 (autocast, cuda only) or fp32; default bf16 on cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the training and test steps")
    p.add_argument("--parallel", type=int, default=1,
                   help="train this many models at once, in as many worker processes (default 1: one by one)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the initial weights and the batch order")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train every (layer map, kv, lr) once per seed (initial weights and batch order; the "
                        "data stay those of --seed) and report the mean over seeds (default: --seed alone)")
    p.add_argument("--resume", action="store_true",
                   help="skip the jobs that the journal <out>.jobs.jsonl of a cut run with the same settings holds")
    return p


def _bad(flag: str, value, allowed: str) -> ValueError:
    return ValueError(f"--{flag} = {value!r} is not allowed: {allowed}")


class JobFailed(Exception):
    """One (layer map, kv, lr) training run raised; the message is one line naming it."""


def layer_maps(args) -> list[tuple[str, str]]:
    """(label, map) per model to train: ratios first, then explicit maps; repeats dropped."""
    from titan_linear.models.hybrid.placement import layer_map_string, place_layers

    n = args.n_layers
    # The linear layers' options name every line of the plot (the maps are the same with or without).
    suffix = f" + {' '.join(args.linear_options)}" if getattr(args, "linear_options", None) else ""
    ratios = args.ratios if args.ratios is not None else ([] if args.layer_maps else DEFAULT_RATIOS)
    out, seen = [], set()
    for r in ratios:
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise _bad("ratios", r, "numbers in [0, 1]")
        m = layer_map_string(n, place_layers(n, r, "uniform"))
        if m not in seen:
            out.append((f"ratio {r:g} ({m}){suffix}", m))
            seen.add(m)
    for m in args.layer_maps:
        if len(m) != n or set(m) - {"S", "L"}:
            raise _bad("layer-maps", m, f"{n} letters S or L, one per layer (--n-layers {n})")
        if m not in seen:
            out.append((f"{m}{suffix}", m))
            seen.add(m)
    return out


def linear_options(items: list[str]) -> dict:
    """`--linear-options KEY=VALUE ...` as HybridModelArgs fields, checked as the [model] keys are."""
    from types import SimpleNamespace

    from titan_linear.config_errors import ConfigError
    from titan_linear.models.hybrid.args import LINEAR_OPTION_DEFAULTS as defaults, linear_options_from

    raw = {}
    for item in items:
        key, sep, value = item.partition("=")
        field = f"linear_attn_{key}"
        if not sep or field not in defaults:
            names = ", ".join(k.removeprefix("linear_attn_") for k in defaults)
            raise _bad("linear-options", item, f"KEY=VALUE with KEY one of {names}")
        kind = type(defaults[field])
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise _bad("linear-options", item, f"{key}=true or {key}=false")
            raw[field] = value.lower() == "true"
        else:
            try:
                raw[field] = kind(value)
            except ValueError:
                raise _bad("linear-options", item, f"{key}= {'an integer' if kind is int else 'a number'}") from None
    try:
        checked = linear_options_from(SimpleNamespace(**raw))
    except ConfigError as e:
        raise _bad("linear-options", " ".join(items), first_line(str(e))) from None
    return {k: v for k, v in checked.items() if k in raw}


def check_args(args):
    """Every flag checked before anything runs: (maps, device, dtype). Raises ValueError."""
    from titan_linear.eval.mqar_data import MQARSpec

    positive = ("seq-len", "vocab", "n-layers", "dim", "heads", "train-examples", "test-examples",
                "epochs", "batch-size", "parallel")
    for flag in positive:
        value = getattr(args, flag.replace("-", "_"))
        if value < 1:
            raise _bad(flag, value, "an integer >= 1")
    if args.train_on == "mix" and args.train_examples < len(args.kv_pairs):
        raise _bad("train-examples", args.train_examples,
                   f"at least one per kv count ({len(args.kv_pairs)}) with --train-on mix")
    if args.ffn_hidden < 0:
        raise _bad("ffn-hidden", args.ffn_hidden, "an integer >= 0")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        raise _bad("heads", args.heads, f"a divisor of --dim {args.dim} giving an even head dim (RoPE)")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise _bad("seeds", args.seeds, "distinct integers")
    for lr in args.lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise _bad("lrs", lr, "numbers > 0")
    if not 0 < args.early_stop <= 1:
        raise _bad("early-stop", args.early_stop, "a number in (0, 1]")
    if not (math.isfinite(args.gap_power) and args.gap_power > 0):
        raise _bad("gap-power", args.gap_power, "a number > 0")
    for kv in args.kv_pairs:
        spec = MQARSpec(args.seq_len, kv, args.vocab)
        if kv < 1:
            raise _bad("kv-pairs", kv, "integers >= 1")
        if kv > spec.max_pairs_for_len():
            raise _bad("kv-pairs", kv, f"at most {spec.max_pairs_for_len()} for --seq-len {args.seq_len} "
                                       "(pairs and queries: 4 * kv <= seq len)")
        if kv > args.vocab // 2 - 1:
            raise _bad("kv-pairs", kv, f"at most {max(args.vocab // 2 - 1, 0)} for --vocab {args.vocab} "
                                       "(distinct keys from [1, vocab / 2))")
    args.linear_option_values = linear_options(args.linear_options)
    maps = layer_maps(args)
    device, dtype = device_and_dtype(args)
    if dtype == "bf16" and device.type != "cuda":
        raise _bad("dtype", args.dtype, "fp32 on cpu (bf16 autocast is for cuda)")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise _bad("plot", args.plot, "a path only where matplotlib is installed (pip install matplotlib)")
    return maps, device, dtype


def build_model(layer_map: str, args, device, seed: int | None = None):
    """A HybridTransformer with `layer_map`, materialised on `device` with init_weights from `--seed`.

    Its output layer is returned apart, `(model, head)`, with `model.output = None` (torchtitan's
    pass-through), so the model returns hidden states and the head runs on queried positions only.
    """
    import torch

    from titan_linear.models.hybrid import HybridModelArgs, HybridTransformer

    base = int(2 * 4 * args.dim / 3)  # llama3's SwiGLU width before ffn_dim_multiplier
    margs = HybridModelArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.heads, n_kv_heads=args.heads,
        vocab_size=args.vocab, max_seq_len=args.seq_len, multiple_of=1,
        # (h + 0.5) / base makes int(multiplier * base) exactly h, 0 included.
        ffn_dim_multiplier=(args.ffn_hidden + 0.5) / base,
        linear_attn_layers=tuple(i for i, c in enumerate(layer_map) if c == "L"),
        **getattr(args, "linear_option_values", {}),
    )
    assert margs.layer_map == layer_map, (margs.layer_map, layer_map)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # --ffn-hidden 0
        model = HybridTransformer(margs)
    model.to_empty(device=device)
    torch.manual_seed(args.seed if seed is None else seed)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    head, model.output = model.output, None
    return model, head


def _query_logits(model, head, tokens, positions):
    """Logits at the queried positions: (batch, kv_pairs, vocab)."""
    h = model(tokens)  # (batch, seq_len, dim): the model's output layer is set apart
    h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
    return head(h)


def _loss_and_hits(model, head, tokens, positions, targets):
    """Cross-entropy and correct answers over the queried positions; a row with fewer pairs than
    the batch's widest pads its positions with 0 and its targets with IGNORE (-100), which both
    leave out."""
    import torch.nn.functional as F

    from titan_linear.eval.mqar_data import IGNORE

    logits = _query_logits(model, head, tokens, positions).float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    hits = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum()
    return loss, hits


def train_one(layer_map: str, lr: float, data, args, device, dtype, step_fn, seed: int | None = None) -> dict:
    """Train one model at one learning rate from `seed` (default --seed); its curve and results."""
    import torch

    (x_train, q_train, y_train), tests = data
    seed = args.seed if seed is None else seed
    model, head = build_model(layer_map, args, device, seed)
    params = list(model.parameters()) + list(head.parameters())
    # fused: one kernel per step on CUDA; these models are small enough that launches, not
    # arithmetic, bound a step.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=device.type == "cuda")
    n = x_train.shape[0]
    per_epoch = math.ceil(n / args.batch_size)
    total = per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    order = torch.Generator().manual_seed(seed)
    curve, step, best, stopped, diverged = [], 0, 0.0, False, False
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            with autocast:
                loss, _ = step_fn(model, head, x_train[idx], q_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            step += 1
        train_loss = (loss_sum / per_epoch).item()
        by_kv = {str(kv): evaluate(model, head, test, args.batch_size, autocast, step_fn) for kv, test in tests.items()}
        # Every kv count weighs the same in the score that early stop and the lr choice read.
        acc = sum(by_kv.values()) / len(by_kv)
        curve.append({"epoch": epoch, "step": step, "train_loss": train_loss, "test_accuracy": acc,
                      "test_accuracy_by_kv": by_kv})
        if acc > best or epoch == 1:
            best, best_by_kv = acc, by_kv
        if not math.isfinite(train_loss):
            diverged = True
            break
        if acc >= args.early_stop:
            stopped = True
            break
    return {
        "lr": lr, "seed": seed, "accuracy": best, "accuracy_by_kv": best_by_kv,
        "final_accuracy": curve[-1]["test_accuracy"], "final_accuracy_by_kv": curve[-1]["test_accuracy_by_kv"],
        "steps": step,
        "epochs": len(curve), "early_stopped": stopped, "diverged": diverged,
        "seconds": round(time.perf_counter() - t0, 2), "curve": curve,
    }


def evaluate(model, head, test, batch_size, autocast, step_fn) -> float:
    """Accuracy over the queried positions of the test set."""
    import torch

    from titan_linear.eval.mqar_data import IGNORE

    x, q, y = test
    model.eval()
    hits = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.no_grad(), autocast:
        for i in range(0, x.shape[0], batch_size):
            hits += step_fn(model, head, x[i:i + batch_size], q[i:i + batch_size], y[i:i + batch_size])[1]
    return hits.item() / (y != IGNORE).sum().item()


def _split(kv: int, width: int, n: int, split: str, args):
    """(inputs, query positions, targets) of `n` examples with `kv` pairs, the queries padded to
    `width` columns (position 0, target IGNORE): one fixed shape for the compiled step."""
    import torch

    from titan_linear.eval.mqar_data import IGNORE, make_mqar, MQARSpec

    spec = MQARSpec(args.seq_len, kv, args.vocab, args.gap_power, not args.zero_filler)
    x, y = make_mqar(spec, n, args.seed, split)
    q = (y != IGNORE).int().topk(kv, dim=1).indices.sort(dim=1).values
    t = y.gather(1, q)
    pad = width - kv
    q = torch.cat([q, q.new_zeros(n, pad)], dim=1)
    t = torch.cat([t, t.new_full((n, pad), IGNORE)], dim=1)
    return x, q, t


def load_data(kv, args, device):
    """(train (inputs, query positions, targets), {kv: test}) on `device`.

    `kv` is a pair count, or "mix": the training set then holds `--train-examples` split equally
    over every `--kv-pairs` count (Zoology trains one model on such a mixture: the small counts
    teach the lookup that the large ones need), and there is one test set per count.
    """
    import torch

    counts = list(args.kv_pairs) if kv == "mix" else [kv]
    width = max(counts)
    parts = [_split(c, width, args.train_examples // len(counts), "train", args) for c in counts]
    train = tuple(torch.cat([p[i] for p in parts]).to(device) for i in range(3))
    tests = {c: tuple(t.to(device) for t in _split(c, width, args.test_examples, "test", args)) for c in counts}
    return train, tests


def _step_fn(args, n_graphs: int):
    """The loss-and-hits step: compiled with `--compile` (room for `n_graphs` graphs)."""
    import torch

    if not args.compile:
        return _loss_and_hits
    # Every layer map and kv count is a new graph; keep them all compiled.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * n_graphs)
    return torch.compile(_loss_and_hits)


def _seeds(args) -> list[int]:
    return args.seeds if args.seeds else [args.seed]


def _kv_keys(args) -> list:
    """The data of each training run: "mix" (every kv count at once) or one kv count per run."""
    return ["mix"] if args.train_on == "mix" else list(args.kv_pairs)


def _jobs(maps, args) -> list[tuple[int | str, str, float, int]]:
    """(kv or "mix", layer map, lr, seed) per training run, in the serial order: kv, map, lr, then seed."""
    return [(kv, m, lr, s) for kv in _kv_keys(args) for _, m in maps for lr in args.lrs for s in _seeds(args)]


def _job_name(job) -> str:
    kv, layer_map, lr, seed = job
    return f"layer map {layer_map}, kv {kv}, lr {lr:g}, seed {seed}"


def _failure(job, e: BaseException) -> str:
    message = str(e).strip()
    return f"job ({_job_name(job)}) failed: {type(e).__name__}" + (f": {first_line(e)}" if message else "")


class _Runner:
    """Runs jobs one at a time with the same training function, holding one kv count's data."""

    def __init__(self, args, device, dtype, n_graphs: int):
        self.args, self.device, self.dtype = args, device, dtype
        self.step_fn = _step_fn(args, n_graphs)
        self.kv, self.data = None, None

    def __call__(self, job) -> dict:
        kv, layer_map, lr, seed = job
        if kv != self.kv:
            self.kv, self.data = None, None  # free the last kv count's data first
            self.data, self.kv = load_data(kv, self.args, self.device), kv
        return train_one(layer_map, lr, self.data, self.args, self.device, self.dtype, self.step_fn, seed)


_worker_runner = None  # one per worker process


def _init_worker(args, device, dtype, n_graphs: int, threads: int) -> None:
    global _worker_runner
    import torch

    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    torch.set_num_threads(threads)
    _worker_runner = _Runner(args, device, dtype, n_graphs)


def _worker_job(job):
    """("ok", run) or ("error", one line): an exception never crosses back with its traceback."""
    try:
        return "ok", _worker_runner(job)
    except Exception as e:  # noqa: BLE001 - reported as one line naming the job
        return "error", _failure(job, e)


def _run_parallel(jobs, args, device, dtype, n_graphs: int, done) -> None:
    """Run `jobs` in `args.parallel` spawned workers; `done(i, run)` in any order. Raises JobFailed."""
    from concurrent.futures import as_completed, ProcessPoolExecutor

    import torch
    import torch.multiprocessing as tmp

    threads = max(1, torch.get_num_threads() // args.parallel)
    pool = ProcessPoolExecutor(max_workers=min(args.parallel, len(jobs)), mp_context=tmp.get_context("spawn"),
                               initializer=_init_worker, initargs=(args, device, dtype, n_graphs, threads))
    failed = None
    try:
        futures = {pool.submit(_worker_job, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                status, value = fut.result()
            except Exception as e:  # noqa: BLE001 - a worker died (BrokenProcessPool) or did not start
                status, value = "error", _failure(jobs[i], e)
            if status == "error":
                failed = value
                break
            done(i, value)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed is not None:
        raise JobFailed(failed)


# Flags that do not change what a job computes: a journal written under other values still holds.
_NOT_SETTINGS = ("out", "plot", "parallel", "resume")


def _settings_key(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}


class Journal:
    """`<out>.jobs.jsonl`: one line per finished (layer map, kv, lr) job, appended as it finishes,
    so that a cut grid (a time limit, a lost machine) resumes with `--resume` where it stopped.

    The first line holds the settings; `--resume` refuses a journal written with other ones.
    Each job line holds the job, its result and the seconds since its invocation began, so the
    final JSON can state the time of every invocation that built it. The file is removed once the
    final JSON is written.
    """

    def __init__(self, out: str, args, resume: bool):
        self.path = f"{out}.jobs.jsonl"
        self.settings = json.loads(json.dumps(_settings_key(args)))
        self.done: dict[tuple, dict] = {}
        self.earlier_seconds: list[float] = []
        self.t0 = time.perf_counter()
        if resume and os.path.exists(self.path):
            self._read()
        if not self.done:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                f.write(json.dumps({"settings": self.settings}) + "\n")

    def _read(self) -> None:
        spans: dict[int, float] = {}
        with open(self.path) as f:
            lines = [json.loads(line) for line in f if line.strip().endswith("}")]
        if not lines or lines[0].get("settings") != self.settings:
            theirs = lines[0].get("settings", {}) if lines else {}
            diff = next((k for k in self.settings if theirs.get(k) != self.settings[k]), "settings")
            raise ValueError(f"--resume: {self.path} was written with {diff} = {theirs.get(diff)!r}, "
                             f"this run has {self.settings.get(diff)!r}; rerun without --resume to start over")
        for line in lines[1:]:
            self.done[tuple(line["job"])] = line["run"]
            spans[line["invocation"]] = max(spans.get(line["invocation"], 0.0), line["elapsed"])
        self.earlier_seconds = [spans[i] for i in sorted(spans)]

    def add(self, job, run: dict) -> None:
        line = {"job": list(job), "invocation": len(self.earlier_seconds),
                "elapsed": round(time.perf_counter() - self.t0, 2), "run": run}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        os.remove(self.path)


def run_grid(maps, args, device, dtype, log=print, journal: Journal | None = None) -> list[dict]:
    """Train every (layer map, kv, lr), one by one or in `--parallel` workers; one result per
    (layer map, kv), in the same order either way. Jobs in `journal` are not run again and every
    finished job is added to it. Raises JobFailed naming a job that raised."""
    jobs = _jobs(maps, args)
    n_graphs = len(maps) * len(_kv_keys(args))
    labels = {m: label for label, m in maps}
    n_seeds = len(_seeds(args))
    size = len(args.lrs) * n_seeds  # one (layer map, kv) group: its lrs x seeds are consecutive jobs
    runs: list[dict | None] = [None] * len(jobs)
    results: dict[int, dict] = {}

    def done(i: int, run: dict) -> None:
        runs[i] = run
        g = i // size
        group = runs[g * size:(g + 1) * size]
        if any(r is None for r in group):
            return
        kv_key, layer_map, _, _ = jobs[g * size]
        by_lr = [group[j:j + n_seeds] for j in range(0, size, n_seeds)]
        mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        # The best lr has the best mean accuracy over seeds (and, trained on the mix, over kv
        # counts; fewer steps breaks a tie, as one seed's early stop does): a lucky seed of
        # another lr does not pick it.
        best = max(by_lr, key=lambda rs: (mean(rs, "accuracy"), -mean(rs, "steps")))
        rows = []
        for kv in (args.kv_pairs if kv_key == "mix" else [kv_key]):
            accs = [r["accuracy_by_kv"][str(kv)] for r in best]
            acc = sum(accs) / len(accs)
            std = (sum((a - acc) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
            rows.append({
                "label": labels[layer_map], "layer_map": layer_map, "kv_pairs": kv, "accuracy": acc,
                "best_lr": best[0]["lr"], "steps": round(mean(best, "steps")),
                "accuracy_per_seed": accs, "accuracy_min": min(accs), "accuracy_max": max(accs),
                "accuracy_std": std,
                "per_lr_final_accuracy": {f"{rs[0]['lr']:g}": sum(r["final_accuracy_by_kv"][str(kv)] for r in rs)
                                          / len(rs) for rs in by_lr},
                "runs": group,
            })
            spread = f" [{min(accs):.4f}-{max(accs):.4f} over {len(accs)} seeds]" if len(accs) > 1 else ""
            log(f"{layer_map} kv {kv}: accuracy {acc:.4f}{spread} at lr {best[0]['lr']:g} "
                f"({round(mean(best, 'steps'))} steps; {sum(r['seconds'] for r in group):.1f} s for {len(group)} runs"
                f"{', trained on the mix' if kv_key == 'mix' else ''})")
        results[g] = rows

    def finished(i: int, run: dict) -> None:
        if journal is not None:
            journal.add(jobs[i], run)
        done(i, run)

    earlier = journal.done if journal is not None else {}
    todo = []
    for i, job in enumerate(jobs):
        if tuple(job) in earlier:
            done(i, earlier[tuple(job)])
        else:
            todo.append(i)
    if earlier:
        log(f"resumed: {len(jobs) - len(todo)} of {len(jobs)} jobs were in {journal.path}")
    if getattr(args, "parallel", 1) > 1 and todo:
        _run_parallel([jobs[i] for i in todo], args, device, dtype, n_graphs,
                      lambda k, run: finished(todo[k], run))
    elif todo:
        runner = _Runner(args, device, dtype, n_graphs)
        for i in todo:
            job = jobs[i]
            try:
                run = runner(job)
            except Exception as e:  # noqa: BLE001 - reported as one line naming the job
                raise JobFailed(_failure(job, e)) from e
            finished(i, run)
    rows = [row for g in sorted(results) for row in results[g]]
    # One order whatever the data of a run: kv count, then layer map.
    order = {m: i for i, (_, m) in enumerate(maps)}
    return sorted(rows, key=lambda r: (args.kv_pairs.index(r["kv_pairs"]), order[r["layer_map"]]))


def plot(results: list[dict], path: str, title: str) -> None:
    """Accuracy against kv pairs, one line per layer map."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["label"] for r in results):
        rows = sorted((r["kv_pairs"], r["accuracy"], r["accuracy_min"], r["accuracy_max"])
                      for r in results if r["label"] == label)
        kv, acc = [r[0] for r in rows], [r[1] for r in rows]
        # Error bars: the range over seeds (none with one seed).
        err = [[a - lo for _, a, lo, _ in rows], [hi - a for _, a, _, hi in rows]]
        ax.errorbar(kv, acc, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("test accuracy (best lr; mean and range over seeds)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)


def run(argv: list[str]) -> int:
    """Parse, check, train the grid, write the JSON (and PNG). Raises ValueError on bad input."""
    args = _parser().parse_args(argv)
    maps, device, dtype = check_args(args)
    import torch

    t0 = time.perf_counter()
    journal = Journal(args.out, args, args.resume)
    try:
        results = run_grid(maps, args, device, dtype, log=lambda s: print(s, file=sys.stderr, flush=True),
                           journal=journal)
    except JobFailed as e:
        print(f"{PROG}: error: {e} (finished jobs are in {journal.path}: --resume continues)", file=sys.stderr)
        return 1
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    settings.update(device=device.type, dtype=dtype, layer_maps=[m for _, m in maps],
                    labels=[label for label, _ in maps], weight_decay=0.1, schedule="cosine to 0, no warmup")
    write_json(args.out, {
        "tool": "mqar", "settings": settings, "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        # A resumed grid: each earlier invocation's time up to its last finished job.
        "earlier_invocations_seconds": journal.earlier_seconds, "resumed_jobs": len(journal.done),
        "results": results,
    })
    journal.close()
    if args.plot:
        plot(results, args.plot, f"MQAR, T = {args.seq_len}, V = {args.vocab}, {args.n_layers} layers, d = {args.dim}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
