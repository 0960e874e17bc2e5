"""Perplexity of a model at several context lengths, overall and by position: `python -m titan_linear.eval.perplexity`.

    python -m titan_linear.eval.perplexity --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint --dataset tinyshakespeare_val \\
        --seq-lens 256 1024 4096 [--dataset-path P] [--batch-size 1] \\
        [--max-tokens N | --max-batches N] [--buckets 8 | --bucket-size N] \\
        --out results/ppl.json [--plot results/ppl.png] [-- TorchTitan overrides]

For each length L the dataset is cut into windows exactly as the validation dataloader cuts
it (`titan_linear.data.build_dataset` with seq_len = L: L input tokens, the next L tokens as
labels). Each batch runs through the model's forward under `torch.no_grad()`, the softmax
layers' RoPE table extended to the longest L (linear layers have no positions).
Cross-entropy is in fp32 and token-averaged, as TorchTitan's `cross_entropy_loss` and its
validator compute it. Position p (0-based) is the p-th input token: its loss is that of
predicting token p + 1 from p + 1 tokens of context. Positions are grouped into `--buckets K`
contiguous buckets of equal size (sizes differ by at most one when K does not divide L), or
into buckets of `--bucket-size N` positions (the last one shorter). A bucket's loss is the
mean over its tokens, so the token-weighted mean of the buckets is the overall loss.
Tokens/s count every evaluated token over the forward and loss time (after one
untimed warm-up batch); peak memory is CUDA's max_memory_allocated per length, null on CPU,
where the process's peak RSS is given instead.
"""

import math
import sys
import time

import torch

from titan_linear.cli import check_at_least, load_model, model_parser, run_main, split_overrides, write_json
from titan_linear.eval.report import peak_memory, pyplot, reset_peak_memory, save_figure

PROG = "titan_linear.eval.perplexity"
IGNORE_INDEX = -100  # torchtitan.components.loss.IGNORE_INDEX
LOSS_CHUNK = 4096  # positions per fp32 cross-entropy slice: bounds the fp32 copy of the logits


def _parser():
    p = model_parser("python -m titan_linear.eval.perplexity", __doc__)
    p.add_argument("--dataset", required=True, help="a dataset name of the project (tinyshakespeare_val, text, jsonl, tokens, hub names)")
    p.add_argument("--dataset-path", default=None, help="the file / folder / hub id the dataset reads")
    p.add_argument("--seq-lens", type=int, nargs="+", required=True, help="context lengths to evaluate")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--max-tokens", type=int, default=None,
                      help="per length: the first ceil(N / L) windows (default: the whole dataset)")
    stop.add_argument("--max-batches", type=int, default=None, help="per length: the first N batches")
    buckets = p.add_mutually_exclusive_group()
    buckets.add_argument("--buckets", type=int, default=None, help="K equal position buckets (default 8)")
    buckets.add_argument("--bucket-size", type=int, default=None, help="position buckets of N positions")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--plot", default=None, help="a PNG of loss by position, one line per length (needs matplotlib)")
    return p


def check_args(args) -> None:
    """Raise ValueError naming the flag for every bad value that needs no model or data."""
    from titan_linear.data import dataset_names

    if args.dataset.lower() not in dataset_names():
        raise ValueError(f"--dataset = {args.dataset!r} is not allowed: unknown dataset; allowed: {', '.join(dataset_names())}")
    for L in args.seq_lens:
        if L < 2:
            raise ValueError(f"--seq-lens = {L} is not allowed: an integer >= 2")
    if len(set(args.seq_lens)) != len(args.seq_lens):
        raise ValueError(f"--seq-lens = {' '.join(map(str, args.seq_lens))} is not allowed: a length is repeated")
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens),
                        ("--max-batches", args.max_batches), ("--buckets", args.buckets),
                        ("--bucket-size", args.bucket_size)):
        check_at_least(flag, value)
    if args.buckets is not None and args.buckets > min(args.seq_lens):
        raise ValueError(f"--buckets = {args.buckets} is not allowed: at most the shortest --seq-lens ({min(args.seq_lens)})")
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise ValueError(f"--plot = {args.plot!r} is not allowed: a .png file")
        pyplot("--plot")


def bucket_edges(seq_len: int, buckets: int | None = None, bucket_size: int | None = None) -> list[int]:
    """Bucket boundaries [0, ..., seq_len]: `buckets` equal ones, or ones of `bucket_size` positions."""
    if bucket_size is not None:
        return list(range(0, seq_len, bucket_size)) + [seq_len]
    k = 8 if buckets is None else buckets
    return [round(i * seq_len / k) for i in range(k + 1)]


def windows(dataset: str, dataset_path: str | None, tokenizer, seq_len: int, batch_size: int,
            max_windows: int | None = None, max_batches: int | None = None):
    """Batches (inputs, labels), each (batch_size, seq_len) (the last one may hold fewer windows),
    cut as the validation dataloader cuts `dataset` at `seq_len`."""
    from titan_linear.data import build_dataset
    from titan_linear.data.sources import DataConfigError

    def renamed(e):
        flag = "--" + e.key.replace("_", "-")
        return DataConfigError(flag, e.value, e.reason)

    try:
        data = build_dataset("validation", dataset, dataset_path, tokenizer, seq_len=seq_len)
        xs, ys, n, batches = [], [], 0, 0
        for x, y in data:
            if max_windows is not None and n >= max_windows:
                break
            xs.append(x["input"])
            ys.append(y)
            n += 1
            if len(xs) == batch_size:
                yield torch.stack(xs), torch.stack(ys)
                xs, ys, batches = [], [], batches + 1
                if max_batches is not None and batches >= max_batches:
                    return
        if xs:
            yield torch.stack(xs), torch.stack(ys)
    except DataConfigError as e:  # the loaders name [validation] keys: name our flags instead
        raise renamed(e) from e


@torch.no_grad()
def token_losses(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token fp32 cross-entropy (batch, seq_len) of the model's forward; 0 where labels are ignored."""
    logits = model(inputs)
    out = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    for s in range(0, labels.shape[1], LOSS_CHUNK):
        chunk = logits[:, s:s + LOSS_CHUNK].float()
        out[:, s:s + LOSS_CHUNK] = torch.nn.functional.cross_entropy(
            chunk.flatten(0, 1), labels[:, s:s + LOSS_CHUNK].flatten(), reduction="none", ignore_index=IGNORE_INDEX,
        ).view(chunk.shape[:2])
    return out


def evaluate_length(loaded, batches, seq_len: int, edges: list[int]) -> dict:
    """Loss overall and by bucket over `batches` at one length, with speed and memory."""
    model, device = loaded.model, loaded.device
    loss_sum = torch.zeros(seq_len, dtype=torch.float64)
    count = torch.zeros(seq_len, dtype=torch.float64)
    n_windows, seconds, warm = 0, 0.0, False
    reset_peak_memory(device)
    for inputs, labels in batches:
        inputs, labels = inputs.to(device), labels.to(device)
        if not warm:  # first calls pay for lazy set-up, kernel selection and allocation
            token_losses(model, inputs, labels)
            warm = True
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses = token_losses(model, inputs, labels)
        valid = (labels != IGNORE_INDEX)
        loss_sum += losses.double().sum(0).cpu()
        count += valid.double().sum(0).cpu()
        seconds += time.perf_counter() - t0  # .cpu() above waits for the device
        n_windows += inputs.shape[0]
    n_tokens = int(count.sum().item())
    if n_tokens == 0:
        raise ValueError(f"--seq-lens = {seq_len} is not allowed: the dataset holds no window of {seq_len} + 1 tokens")
    loss = loss_sum.sum().item() / n_tokens
    buckets = []
    for start, end in zip(edges[:-1], edges[1:]):
        n = int(count[start:end].sum().item())
        b_loss = loss_sum[start:end].sum().item() / n if n else None
        buckets.append({"start": start, "end": end, "n_tokens": n, "loss": b_loss,
                        "perplexity": math.exp(b_loss) if b_loss is not None else None})
    return {
        "seq_len": seq_len,
        "beyond_training_length": seq_len > loaded.job_config.training.seq_len,
        "n_windows": n_windows, "n_tokens": n_tokens,
        "loss": loss, "perplexity": math.exp(loss),
        "buckets": buckets,
        "seconds": seconds, "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
        **peak_memory(device),
    }


def plot(results: list[dict], path: str, title: str) -> None:
    plt = pyplot("--plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        mids = [(b["start"] + b["end"] - 1) / 2 for b in r["buckets"] if b["loss"] is not None]
        losses = [b["loss"] for b in r["buckets"] if b["loss"] is not None]
        ax.plot(mids, losses, marker="o", label=f"L = {r['seq_len']} (mean {r['loss']:.3f})")
    ax.set_xscale("symlog", linthresh=max(1, min(r["seq_len"] for r in results) // 8))
    ax.set_xlabel("position in the window (bucket centre)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)


def run(argv: list[str]) -> int:
    """Parse, load, evaluate each length, write the JSON (then the PNG). Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    check_args(args)
    from titan_linear.inference import ensure_rope_length

    loaded = load_model(args, overrides, max_len=max(args.seq_lens))
    ensure_rope_length(loaded.model, max(args.seq_lens))
    results = []
    for L in args.seq_lens:
        max_windows = None if args.max_tokens is None else math.ceil(args.max_tokens / L)
        batches = windows(args.dataset, args.dataset_path, loaded.tokenizer, L, args.batch_size,
                          max_windows=max_windows, max_batches=args.max_batches)
        edges = bucket_edges(L, args.buckets, args.bucket_size)
        r = evaluate_length(loaded, batches, L, edges)
        results.append(r)
        print(f"L = {L}: loss {r['loss']:.4f}, ppl {r['perplexity']:.2f} over {r['n_tokens']} tokens, "
              f"{r['tokens_per_s'] or float('nan'):.0f} tokens/s", file=sys.stderr, flush=True)
    about = loaded.describe()
    result = {
        "tool": PROG,
        "model": about,
        "dataset": {"name": args.dataset, "path": args.dataset_path},
        "settings": {
            "seq_lens": args.seq_lens, "batch_size": args.batch_size,
            "max_tokens": args.max_tokens, "max_batches": args.max_batches,
            "buckets": ({"kind": "fixed", "size": args.bucket_size} if args.bucket_size is not None
                        else {"kind": "equal", "count": 8 if args.buckets is None else args.buckets}),
            "seed": args.seed, "overrides": overrides,
            "loss": "token-mean fp32 cross-entropy in nats; position p predicts token p + 1",
            "windowing": "titan_linear.data.build_dataset(seq_len = L), as the validation dataloader",
        },
        "results": results,
    }
    write_json(args.out, result)
    if args.plot is not None:
        plot(results, args.plot, f"{about['model']} {about['flavor']} {about['layer_map']} on {args.dataset}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
