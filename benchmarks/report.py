"""Summarise the benchmark results: SUMMARY.md and PNG plots beside the JSON files.

    python benchmarks/report.py --results benchmarks/results

Reads whichever of these the folder holds (any suffix, e.g. attention_h100.json):
- attention_*.json (benchmarks/attention.py): ms and peak GiB of fwd+bwd by T for each impl
  and head dim, and each impl's speed-up over sdpa (sdpa ms / impl ms: above 1 is faster);
- e2e_*.json (benchmarks/e2e_train.py): tokens/s, MFU and peak memory per config and seq_len,
  and each config's tokens/s relative to its baseline at the same seq_len: the config of the
  same name without its `_linear_...` part (llama3_3b_linear_0.50 against llama3_3b), or one
  config for all with --baseline;
- scaling_*.json (benchmarks/e2e_train.py --ngpu N): tokens/s per GPU of each config on N GPUs
  against 1 GPU at the same seq_len and local batch (weak-scaling efficiency), FSDP by default,
  other layouts (tensor parallel) named by their overrides;
- inference_*.json (benchmarks/inference.py): prefill ms, decode ms per step, tokens/s, cache
  and peak GiB by context, batch and compile setting for each linear-attention ratio; plots of
  batch-1 decode by context and, where a file has several batches, tokens/s by batch.
A measurement present twice in one file (e2e_train.py appends to its file) counts once: the
last row wins. Plots are log-log and need matplotlib (pip install -e '.[bench]'); without it
SUMMARY.md is still written and one line says the plots were skipped.
"""

import argparse
import json
import math
import sys
from pathlib import Path

KINDS = ("attention", "e2e", "scaling", "inference")


def fmt(v, digits: int = 3) -> str:
    """`v` to about `digits` significant digits, thousands separated, never in e-notation."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:,.{decimals}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def latest(rows: list[dict], *keys: str) -> dict[tuple, dict]:
    """{(row[k] for k in keys): row}, the last row winning, in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        out[tuple(r.get(k) for k in keys)] = r
    return out


def devices(rows: list[dict]) -> str:
    names = sorted({r["device"] for r in rows if r.get("device")})
    return ", ".join(names) or "device not recorded"


def error_lines(errors: list[str]) -> list[str]:
    return ["", "Failed:", *[f"- {e}" for e in errors]] if errors else []


def attention_section(name: str, rows: list[dict]) -> tuple[list[str], list[dict]]:
    cells = latest(rows, "impl", "head_dim", "T")
    impls = list(dict.fromkeys(r["impl"] for r in cells.values()))
    others = [i for i in impls if i != "sdpa"]
    out = [f"## Attention fwd+bwd ({name}.json)", "", f"Device: {devices(rows)}. Speed-up: sdpa ms / impl ms."]
    time_lines, mem_lines, errors = [], [], []
    for d in sorted({r["head_dim"] for r in cells.values()}):
        ts = sorted({r["T"] for r in cells.values() if r["head_dim"] == d})
        body = []
        for t in ts:
            at = {i: cells.get((i, d, t)) for i in impls}
            batch = next(r for r in at.values() if r)["batch"]
            ms = {i: (r or {}).get("ms") for i, r in at.items()}
            row = [str(t), str(batch)]
            row += [fmt(ms[i]) if ms[i] is not None else ("error" if at[i] else "—") for i in impls]
            row += [f"{ms['sdpa'] / ms[i]:.2f}×" if ms.get("sdpa") and ms[i] else "—" for i in others]
            row += [fmt((at[i] or {}).get("peak_gib")) if at[i] and "ms" in at[i] else "—" for i in impls]
            body.append(row)
            errors += [f"{i} T={t} head_dim={d}: {r['error']}" for i, r in at.items() if r and "error" in r]
        heads = next(r["heads"] for r in cells.values() if r["head_dim"] == d)
        header = ["T", "batch", *[f"{i} ms" for i in impls], *[f"{i} vs sdpa" for i in others],
                  *[f"{i} GiB" for i in impls]]
        out += ["", f"head_dim {d}, {heads} heads:", "", *table(header, body)]
        label = (lambda i: f"{i} D={d}") if len({r["head_dim"] for r in cells.values()}) > 1 else (lambda i: i)
        for i in impls:
            ok = [cells[(i, d, t)] for t in ts if "ms" in cells.get((i, d, t), {})]
            time_lines.append((label(i), [r["T"] for r in ok], [r["ms"] for r in ok], "-", label(i)))
            mem_lines.append((label(i), [r["T"] for r in ok], [r["peak_gib"] for r in ok], "-", label(i)))
    xlabel = "T (tokens per sequence)"
    plots = [
        dict(file=f"{name}_time.png", title=f"attention fwd+bwd time, {devices(rows)}", xlabel=xlabel,
             ylabel="ms per call", lines=time_lines),
        dict(file=f"{name}_memory.png", title=f"attention fwd+bwd peak memory, {devices(rows)}", xlabel=xlabel,
             ylabel="peak GiB", lines=mem_lines),
    ]
    return out + error_lines(errors), plots


def run_error(r: dict, what: str) -> list[str]:
    if "error" not in r and r.get("returncode", 0) == 0:
        return []
    err = r.get("error", "")
    return [f"{what}: {err[-1] if isinstance(err, list) and err else err}"]


def baseline_of(config: str, baseline: str | None) -> str:
    """The config a row's tokens/s is compared with: `baseline` if given, else the config's name
    cut before "_linear_" (a shipped hybrid against the softmax config of its shape)."""
    return baseline or config.split("_linear_")[0]


def e2e_section(name: str, rows: list[dict], baseline: str | None = None) -> tuple[list[str], list[dict]]:
    # Rows of the torch and the Triton path of linear layers are kept apart; each is compared
    # with the baseline measured in the same campaign (same impl label).
    # Runs with overrides (no activation checkpointing, ...) or another batch are their own
    # rows, compared with the baseline run the same way.
    cells = latest(rows, "config", "seq_len", "local_batch_size", "extra_args", "linear_attn_impl")
    base = {(c, s, b, x, i): r.get("tokens_per_s") for (c, s, b, x, i), r in cells.items()}
    overrides = any(x for _, _, _, x, _ in cells)
    body, errors = [], []
    for (config, seq, batch, extra, impl), r in sorted(
            cells.items(), key=lambda kv: (str(kv[0][4]), str(kv[0][3]), kv[0][1], str(kv[0][2]),
                                           baseline_of(kv[0][0], baseline), kv[0][0] != baseline_of(kv[0][0], baseline),
                                           kv[0][0])):
        tps = r.get("tokens_per_s")
        ref = base.get((baseline_of(config, baseline), seq, batch, extra, impl))
        ratio = f"{tps / ref:.2f}" if tps and ref else "—"
        errors += run_error(r, f"{config} seq_len {seq} {extra or ''}".strip())
        mfu = r.get("mfu")
        body.append([config, str(seq), str(batch if batch is not None else ""), impl or "—"]
                    + ([extra or "—"] if overrides else [])
                    + [f"{tps:,.0f}" if tps else "failed", f"{mfu:.1f}%" if mfu is not None else "—",
                       fmt(r.get("peak_gib")), ratio, fmt(r.get("final_loss"), 4)])
    header = (["config", "seq_len", "batch", "linear layers"] + (["overrides"] if overrides else [])
              + ["tokens/s", "MFU", "peak GiB", f"tokens/s vs {baseline or 'baseline'}", "final loss"])
    out = [f"## End-to-end training ({name}.json)", "", f"Device: {devices(rows)}.", "", *table(header, body)]
    return out + error_lines(errors), []


def scaling_section(name: str, rows: list[dict]) -> tuple[list[str], list[dict]]:
    # Rows of one campaign (one host, one code version) compare only with its own one-GPU row.
    cells = latest(rows, "campaign", "config", "seq_len", "local_batch_size", "ngpu", "extra_args")
    one = {(k, c, s, b): r.get("tokens_per_s") for (k, c, s, b, n, x), r in cells.items() if n == 1 and not x}
    body, errors = [], []
    campaigns = any(k for k, *_ in cells)
    for (campaign, config, seq, batch, ngpu, extra), r in cells.items():
        tps = r.get("tokens_per_s")
        ref = one.get((campaign, config, seq, batch))
        errors += run_error(r, f"{config} seq_len {seq} on {ngpu} GPUs {extra}".strip())
        tp = tensor_parallel_degree(extra)
        if not (tps and ref):
            versus = "—"
        elif tp > 1:
            # The GPUs of a tensor-parallel group work on one batch together: what compares with
            # one GPU is the group's tokens/s, not each member's.
            versus = f"{tps * tp / ref:.1%} per TP group of {tp}"
        else:
            versus = f"{tps / ref:.1%}"
        body.append([config, str(seq), str(batch), str(ngpu), extra or ("FSDP" if ngpu > 1 else "—"),
                     f"{tps:,.0f}" if tps else "failed", versus,
                     fmt(r.get("peak_gib")), fmt(r.get("final_loss"), 4)] + ([campaign or "—"] if campaigns else []))
    header = ["config", "seq_len", "batch per GPU", "GPUs", "parallelism", "tokens/s per GPU",
              "vs 1 GPU", "peak GiB", "final loss"] + (["campaign"] if campaigns else [])
    out = [f"## Scaling ({name}.json)", "", f"Device: {devices(rows)}.", "", *table(header, body)]
    return out + error_lines(errors), []


def tensor_parallel_degree(extra: str) -> int:
    """The tensor-parallel degree a row's overrides set (1 if none): `--parallelism.tensor_parallel_degree N`
    or `--parallelism.tensor_parallel_degree=N`."""
    words = (extra or "").replace("=", " ").split()
    for key, value in zip(words, words[1:]):
        if key == "--parallelism.tensor_parallel_degree" and value.isdigit():
            return int(value)
    return 1


def inference_section(name: str, rows: list[dict]) -> tuple[list[str], list[dict]]:
    # Rows written before batches, compile settings and KV splits existed are batch 1, uncompiled
    # and unsplit. A setting is what the step ran: eager, or the graph's compile setting and splits.
    # Rows before the decode attention kernel ran the products (their kv_splits: blocks of the
    # product with V); rows before the GEMV kernel ran cuBLAS.
    cells = latest(rows, "config", "ratio", "context", "batch", "compile", "decode", "kv_splits", "fused_projections",
                   "gemv", "softmax_attention")

    def setting(comp, dec, k, fused, gemv, attn) -> str:
        extra = (", fused projections" if fused else "") + (", GEMV kernel" if gemv else "")
        if dec == "eager":
            return "eager" + extra
        if attn == "kernel":
            extra = ", attention kernel" + (f" ({k} splits)" if k else "") + extra
        elif (k or 1) > 1:
            extra = f", {k} kv splits" + extra
        return (comp or "off") + extra

    cells = {(c, r, ctx, b or 1, setting(comp, dec, k, f, g, at)): row
             for (c, r, ctx, b, comp, dec, k, f, g, at), row in cells.items()}
    configs = list(dict.fromkeys(k[0] for k in cells))
    settings = list(dict.fromkeys(k[4] for k in cells))
    out = [f"## Inference ({name}.json)", "", f"Device: {devices(rows)}. Compile: what the decode step's "
           "CUDA graph replays (off: the eager step's kernels; on: the torch.compile'd step; "
           "eager: no graph; N kv splits: the softmax layers' product with V in N blocks of positions; "
           "attention kernel: the softmax layers' decode attention kernel (N splits: its blocks of positions, "
           "else automatic); GEMV kernel: the Triton matrix-vector kernel; "
           "fused projections: q, k, v and w1, w3 each one product)."]
    decode, memory, batched, errors = [], [], [], []
    for config in configs:
        body = []
        for (c, ratio, ctx, batch, setting), row in sorted(cells.items(), key=lambda kv: kv[0][1:4]):
            if c != config:
                continue
            if "error" in row:
                errors.append(f"{config} ratio {ratio} context {ctx} batch {batch} compile {setting}: {row['error']}")
            body.append([str(ratio), str(ctx), str(batch), setting, fmt(row.get("prefill_ms")),
                         fmt(row.get("decode_ms_per_token")), fmt(row.get("tokens_per_s")),
                         fmt(row.get("cache_gib")), fmt(row.get("peak_gib"))])
        for ratio in sorted({k[1] for k in cells if k[0] == config}):
            prefix = f"ratio {ratio}" if len(configs) == 1 else f"{config} ratio {ratio}"
            for setting in settings:
                label = prefix if len(settings) == 1 else f"{prefix} compile {setting}"
                ok = sorted((k[2], row) for k, row in cells.items() if k[0] == config and k[1] == ratio
                            and k[3] == 1 and k[4] == setting and row.get("decode_ms_per_token") is not None)
                if not ok:
                    continue
                xs = [x for x, _ in ok]
                decode.append((label, xs, [r["decode_ms_per_token"] for _, r in ok], "-", label))
                if setting == settings[0]:
                    memory.append((f"{prefix} cache", xs, [r.get("cache_gib") for _, r in ok], "-", prefix))
                    memory.append((f"{prefix} peak", xs, [r.get("peak_gib") for _, r in ok], "--", prefix))
                for ctx in sorted({k[2] for k in cells if k[0] == config and k[1] == ratio and k[4] == setting}):
                    pts = sorted((k[3], row) for k, row in cells.items() if k[:3] == (config, ratio, ctx)
                                 and k[4] == setting and row.get("tokens_per_s") is not None)
                    if len(pts) > 1:
                        batched.append((f"{label} context {ctx}", [b for b, _ in pts],
                                        [r["tokens_per_s"] for _, r in pts], "-", label))
        header = ["ratio", "context", "batch", "compile", "prefill ms", "decode ms/step", "tokens/s",
                  "cache GiB", "peak GiB"]
        out += ["", f"{config}:", "", *table(header, body)]
    plots = [
        dict(file=f"{name}_decode.png", title=f"decode latency at batch 1, {devices(rows)}",
             xlabel="context (tokens)", ylabel="ms per token", lines=decode),
        dict(file=f"{name}_memory.png", title=f"inference memory (solid: cache, dashed: peak), {devices(rows)}",
             xlabel="context (tokens)", ylabel="GiB", lines=memory),
    ]
    if batched:
        plots.append(dict(file=f"{name}_batch.png", title=f"batched decode, {devices(rows)}",
                          xlabel="batch (sequences)", ylabel="tokens per second", lines=batched))
    return out + error_lines(errors), plots


def draw(plots: list[dict], folder: Path) -> list[str]:
    """Write each plot; returns the files written. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for p in plots:
        # each line: (label, xs, ys, line style, colour group)
        lines = [line for line in p["lines"] if line[1] and None not in line[2]]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        colors: dict[str, str] = {}
        for label, xs, ys, style, group in lines:
            color = colors.setdefault(group, f"C{len(colors) % 10}")
            ax.plot(xs, ys, style, marker="o", color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = sorted({x for line in lines for x in line[1]})
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / p["file"], dpi=120)
        plt.close(fig)
        written.append(p["file"])
    return written


def render(folder: Path, baseline: str | None = None) -> tuple[Path, str | None]:
    """Write folder/SUMMARY.md (and the plots when matplotlib is present).

    Returns the summary's path and, when plots were skipped, why."""
    sections, plots = [], []
    for kind in KINDS:
        for path in sorted(folder.glob(f"{kind}_*.json")):
            rows = json.loads(path.read_text())
            if kind == "attention":
                lines, p = attention_section(path.stem, rows)
            elif kind == "e2e":
                lines, p = e2e_section(path.stem, rows, baseline)
            elif kind == "scaling":
                lines, p = scaling_section(path.stem, rows)
            else:
                lines, p = inference_section(path.stem, rows)
            sections.append((lines, p))
            plots += p
    skipped = None
    written: list[str] = []
    try:
        written = draw(plots, folder)
    except ImportError:
        skipped = "matplotlib is not installed (pip install -e '.[bench]')"
    md = ["# Benchmark summary", "", "Generated by `python benchmarks/report.py` from the JSON files in this folder."]
    if not sections:
        md += ["", "No attention_*.json, e2e_*.json, scaling_*.json or inference_*.json here yet."]
    for lines, p in sections:
        md += ["", *lines]
        md += [f"\n![{f}]({f})" for f in (q["file"] for q in p) if f in written]
    out = folder / "SUMMARY.md"
    out.write_text("\n".join(md) + "\n")
    return out, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                    help="folder with the JSON files; SUMMARY.md and the plots are written there")
    ap.add_argument("--baseline", default=None,
                    help="e2e config every other is compared with (default: each config's own, its name "
                         "without the _linear_... part)")
    a = ap.parse_args()
    folder = Path(a.results)
    if not folder.is_dir():
        ap.error(f"--results {a.results}: not a directory")
    out, skipped = render(folder, a.baseline)
    print(f"wrote {out}")
    if skipped:
        print(f"report.py: plots skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
