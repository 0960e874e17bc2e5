"""Attention maps of every layer and head on a given text: `python -m titan_linear.eval.attention_maps`.

    python -m titan_linear.eval.attention_maps --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint --text "ROMEO: But soft, what light" \\
        [--text-file F] [--max-tokens 128] [--layers 0 1] --out maps.json \\
        [--plot maps.png] [--save-maps maps.pt] [--device cpu|cuda] [--dtype bf16|fp32]

The text is encoded with the config's tokenizer (BOS first, as in training) and cut to
--max-tokens tokens. One forward pass records the q, k, v every layer attends with (softmax
layers: after RoPE) and the attention output before `wo`; from them, per layer and head,
the T x T map A[t, s] (row t: how query t spreads over keys s <= t):

- softmax layer:  A[t] = softmax_s(q_t . k_s / sqrt(d)), s <= t; query head h reads kv head
  h // (n_heads / n_kv_heads), as SDPA's enable_gqa does;
- linear layer (causal efficient attention, docs/attention.md):
  A[t, s] = sum_d softmax(q_t)[d] * exp(k_s[d] - z_t[d]),  z_t = logcumsumexp_{s <= t} k_s,
  every exponent <= 0 (z_t >= k_s for s <= t), so no shift by a global maximum is needed.

Both rows sum to 1 and A @ V is the layer's attention output; the JSON records, per layer,
the largest |A @ V - output| as a check. Statistics per layer and head, averaged over the
query rows t = 1 .. T-1 (row 0 sees only itself): `entropy` (nats; uniform attention over
the t+1 visible keys would give `uniform_entropy`), `mean_distance` sum_s A[t,s] (t - s),
`first_token_mass` A[t, 0] (the attention sink), `diagonal_mass` A[t, t].

--plot draws a layer x head grid of the maps (rows labelled with the layer kind, softmax
and linear layers on the same colour scale); --save-maps writes the maps with torch.save.
Bad input stops with one line naming the flag and the value, exit status 2, and nothing written.
"""

import math
import os
import sys

from titan_linear.cli import load_model, model_parser, run_main, split_overrides, write_json

PROG = "titan_linear.eval.attention_maps"

# The largest (query rows x keys x features) block of a linear map materialised at once.
_LINEAR_BLOCK = 1 << 23


def _parser():
    p = model_parser(f"python -m {PROG}", __doc__)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to attend over")
    text.add_argument("--text-file", help="a UTF-8 file holding the text")
    p.add_argument("--max-tokens", type=int, default=128, help="keep the first T tokens (BOS included); default 128")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices; default all")
    p.add_argument("--out", required=True, help="the JSON of statistics")
    p.add_argument("--plot", default=None, help="a PNG with the layer x head grid of maps (needs matplotlib)")
    p.add_argument("--save-maps", default=None, help="a .pt file with the maps, {layer: (heads, T, T)}")
    return p


def softmax_map(q, k):
    """Causal softmax attention maps with the SDPA scale 1/sqrt(d).

    Args:
        q: (bs, n_heads, T, d), RoPE applied.
        k: (bs, n_kv_heads, T, d), RoPE applied.

    Returns:
        (bs, n_heads, T, T) float32 (float64 for float64 inputs); zero above the diagonal.
    """
    import torch

    from titan_linear.ops.efficient_attn.naive import check_qkv, compute_dtype

    group = check_qkv(q, k, k)
    dtype = compute_dtype(q.dtype)
    q, k = q.to(dtype), k.to(dtype).repeat_interleave(group, dim=1)
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def linear_map(q, k):
    """Causal efficient-attention maps, A[t, s] = sum_d softmax(q_t)[d] exp(k_s[d] - z_t[d]).

    Materialises (rows x T x d) blocks of the weights exp(k_s - z_t), masked before the exp,
    so every exponent is <= 0 and no row is rescaled by a global maximum.

    Args:
        q: (bs, n_heads, T, d).
        k: (bs, n_kv_heads, T, d).

    Returns:
        (bs, n_heads, T, T) float32 (float64 for float64 inputs); zero above the diagonal.
    """
    import torch

    from titan_linear.ops.efficient_attn.naive import check_qkv, compute_dtype

    group = check_qkv(q, k, k)
    bs, n_heads, T, d = q.shape
    n_kv_heads = k.shape[1]
    dtype = compute_dtype(q.dtype)
    p = torch.softmax(q.to(dtype), dim=-1).reshape(bs, n_kv_heads, group, T, d)
    k = k.to(dtype)
    z = torch.logcumsumexp(k, dim=2)  # (bs, n_kv_heads, T, d)
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # [t, s]: s <= t
    out = torch.empty(bs, n_kv_heads, group, T, T, dtype=dtype, device=q.device)
    rows = max(1, _LINEAR_BLOCK // (bs * n_kv_heads * T * d))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        exponent = k[:, :, None, :, :] - z[:, :, t0:t1, None, :]  # (bs, kv, rows, s, d)
        weights = torch.exp(exponent.masked_fill(~visible[t0:t1, :, None], float("-inf")))
        out[:, :, :, t0:t1] = torch.einsum("bhgtd,bhtsd->bhgts", p[:, :, :, t0:t1], weights)
    return out.reshape(bs, n_heads, T, T)


def map_statistics(A) -> dict:
    """Per-head statistics of maps A (heads, T, T), averaged over query rows 1 .. T-1.

    Returns:
        {"entropy", "mean_distance", "first_token_mass", "diagonal_mass"}: lists, one value per head.
    """
    import torch

    T = A.shape[-1]
    A = A.double()
    rows = slice(1, T) if T > 1 else slice(0, T)
    entropy = -torch.where(A > 0, A * torch.log(A), torch.zeros_like(A)).sum(-1)  # (heads, T)
    pos = torch.arange(T, dtype=A.dtype, device=A.device)
    distance = (A * (pos[:, None] - pos[None, :]).clamp(min=0)).sum(-1)
    stats = {
        "entropy": entropy[:, rows],
        "mean_distance": distance[:, rows],
        "first_token_mass": A[:, rows, 0],
        "diagonal_mass": torch.diagonal(A, dim1=-2, dim2=-1)[:, rows],
    }
    return {name: [round(float(x), 6) for x in value.mean(-1)] for name, value in stats.items()}


def capture_attention(model, tokens, layers: list[int]) -> dict[int, dict]:
    """Run `tokens` (1, T) through the model and record, for each layer in `layers`, the q, k, v
    its attention op receives and the op's output (before `wo`).

    Walks the blocks through `titan_linear.inference.prefill` (the model's own forward, SDPA
    for softmax layers, the chunked op for linear ones), with a forward hook on each block's
    `attention.inner_attention`, the module prefill's own hooks use.

    Returns:
        {layer: {"kind": "softmax" | "linear", "q", "k", "v", "out"}}, tensors (1, heads, T, d).
    """
    from titan_linear.inference import is_linear, prefill

    captured: dict[int, dict] = {}

    def hook_for(i: int, kind: str):
        def hook(module, args, output):
            q, k, v = args[:3]
            captured[i] = {"kind": kind, "q": q.detach(), "k": k.detach(), "v": v.detach(), "out": output.detach()}

        return hook

    blocks = list(model.layers.values())
    handles = [
        blocks[i].attention.inner_attention.register_forward_hook(
            hook_for(i, "linear" if is_linear(blocks[i]) else "softmax"))
        for i in layers
    ]
    try:
        prefill(model, tokens, max_len=tokens.shape[1])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def layer_maps(record: dict):
    """The maps (heads, T, T) of one captured layer and max |A @ V - output|."""
    import torch

    maps = (linear_map if record["kind"] == "linear" else softmax_map)(record["q"], record["k"])
    group = record["q"].shape[1] // record["v"].shape[1]
    v = record["v"].to(maps.dtype).repeat_interleave(group, dim=1)
    err = (maps @ v - record["out"].to(maps.dtype)).abs().max()
    return maps[0], float(err) if torch.isfinite(err) else float("inf")


def _check_args(args) -> None:
    """Flag checks that need no model; raise ValueError naming the flag."""
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens = {args.max_tokens} is not allowed: an integer >= 2")
    if args.text_file is not None and not os.path.isfile(args.text_file):
        raise ValueError(f"--text-file = {args.text_file!r} is not allowed: no such file")
    outs = [("--out", args.out), ("--plot", args.plot), ("--save-maps", args.save_maps)]
    for flag, path in outs:
        if path is not None and os.path.isdir(path):
            raise ValueError(f"{flag} = {path!r} is not allowed: it is a directory")
    paths = [os.path.abspath(p) for _, p in outs if p is not None]
    if len(set(paths)) != len(paths):
        raise ValueError(f"--out / --plot / --save-maps = {[p for _, p in outs if p]} are not allowed: one file each")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(f"--plot = {args.plot!r} needs matplotlib: pip install matplotlib") from None


def _encode(args, loaded) -> list[int]:
    if args.text is not None:
        flag, text = "--text", args.text
    else:
        flag = "--text-file"
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    ids = loaded.tokenizer.encode(text, add_bos=True, add_eos=False)[: args.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{flag} = {text[:40]!r} is not allowed: it encodes to fewer than 2 tokens")
    if max(ids) >= loaded.model_args.vocab_size:
        raise ValueError(f"{flag}: token id {max(ids)} is outside the model's vocab ({loaded.model_args.vocab_size}); "
                         "check model.hf_assets_path / model.vocab_size")
    return ids


def plot_maps(maps: dict[int, "object"], kinds: dict[int, str], path: str, title: str) -> None:
    """A layer x head grid of maps (rows: layers, labelled with their kind), written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    layers = sorted(maps)
    n_heads = max(m.shape[0] for m in maps.values())
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(1.2 * n_heads + 1, 1.2 * len(layers) + 0.8),
                             squeeze=False, layout="constrained")
    # One colour scale for every panel (sqrt, so that spread-out rows stay visible).
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    image = None
    for r, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[r][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < maps[layer].shape[0]:
                image = ax.imshow(maps[layer][h].float().cpu().numpy(), cmap="viridis", norm=norm,
                                  interpolation="nearest")
            if r == 0:
                ax.set_title(f"head {h}", fontsize=7)
        axes[r][0].set_ylabel(f"layer {layer}\n{kinds[layer]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def run(argv: list[str]) -> int:
    """Parse, build, capture, compute maps and statistics, write. Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    _check_args(args)
    import torch

    loaded = load_model(args, overrides)
    model = loaded.model
    n_layers = len(model.layers)
    layers = sorted(set(args.layers)) if args.layers is not None else list(range(n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"--layers = {bad} is not allowed: layer indices 0 .. {n_layers - 1}")
    ids = _encode(args, loaded)
    T = len(ids)
    from titan_linear.inference import ensure_rope_length

    ensure_rope_length(model, T)
    tokens = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    with torch.no_grad():
        captured = capture_attention(model, tokens, layers)

    keep = args.plot is not None or args.save_maps is not None
    maps, kinds, results = {}, {}, []
    for i in layers:
        record = captured.pop(i)
        A, err = layer_maps(record)
        stats = map_statistics(A)
        heads = [{"head": h, **{name: values[h] for name, values in stats.items()}} for h in range(A.shape[0])]
        mean = {name: round(sum(values) / len(values), 6) for name, values in stats.items()}
        results.append({"layer": i, "kind": record["kind"], "mean": mean, "heads": heads,
                        "output_max_abs_error": err})
        kinds[i] = record["kind"]
        if keep:
            maps[i] = A.float().cpu()

    uniform = sum(math.log(t + 1) for t in range(1, T)) / (T - 1)
    pieces = [loaded.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    result = {
        "tool": PROG, "model": loaded.describe(), "tokens": T, "token_strings": pieces,
        "statistics_rows": "query rows 1 .. T-1", "uniform_entropy": round(uniform, 6),
        "layers": results,
    }
    if args.plot is not None:
        about = loaded.describe()
        plot_maps(maps, kinds, args.plot,
                  f"{about['model']} {about['flavor']}, layer map {about['layer_map']}, {T} tokens, {about['weights']}")
    if args.save_maps is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_maps)), exist_ok=True)
        tmp = f"{args.save_maps}.tmp{os.getpid()}"
        torch.save({"maps": maps, "kinds": kinds, "tokens": ids}, tmp)
        os.replace(tmp, args.save_maps)
    write_json(args.out, result)
    print(f"{PROG}: {len(layers)} layers x {results[0]['heads'][-1]['head'] + 1} heads over {T} tokens -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
