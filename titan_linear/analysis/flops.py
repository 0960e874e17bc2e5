"""Parameters and training FLOPs of a config's model: `python -m titan_linear.analysis.flops`.

    python -m titan_linear.analysis.flops --config train_configs/llama3_1b_linear_0.50.toml \\
        [--tokens 2e10] [--seq-len 8192] [--out flops.json] [-- TorchTitan overrides]

The model is the one training builds (the TOML parsed and checked as `run_train.sh` does), made
on the meta device, so even an 8B config costs no memory. FLOPs per token come from the model
args' own `get_nparams_and_flops`: 6 per non-embedding parameter (forward + backward), plus the
attention of each layer by its kind (softmax: proportional to the sequence length; linear: to
the head dim; see titan_linear/models/hybrid/args.py). `non_embedding` is every parameter but
the token-embedding table (the output projection multiplies every token, so it counts, as in
the FLOPs); that is the N of the scaling-law fits. With `--tokens D` the training compute
C = flops_per_token x D is given beside the 6 N D approximation.
"""

import os
import sys

from titan_linear.cli import check_at_least, Parser, run_main, split_overrides, write_json

PROG = "titan_linear.analysis.flops"


def count_model(job_config, model_args, seq_len: int | None = None) -> dict:
    """{"layer_map", "seq_len", "nparams", "embedding", "non_embedding", "flops_per_token"} of the
    model of a parsed job config (`titan_linear.inference.build.parse_job_config`), built on the
    meta device, at `seq_len` (default: training.seq_len)."""
    import torch
    from torch import nn

    from titan_linear.inference.build import train_spec

    seq_len = seq_len or job_config.training.seq_len
    with torch.device("meta"):
        model = train_spec(job_config).model_cls(model_args)
    nparams, flops = model_args.get_nparams_and_flops(model, seq_len)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return {
        "layer_map": getattr(model_args, "layer_map", "S" * model_args.n_layers),
        "seq_len": seq_len, "nparams": int(nparams), "embedding": int(embedding),
        "non_embedding": int(nparams - embedding), "flops_per_token": int(flops),
    }


def model_flops(config: str, overrides: list[str] | None = None, seq_len: int | None = None) -> dict:
    """`count_model` of the model `config` (a training TOML, plus TorchTitan overrides), with the
    config, overrides, model name and flavor. Raises ValueError naming the key for a bad config."""
    from titan_linear.inference.build import parse_job_config

    job_config, model_args = parse_job_config(config, overrides)
    return {
        "config": config, "overrides": list(overrides or []), "model": job_config.model.name,
        "flavor": job_config.model.flavor, **count_model(job_config, model_args, seq_len),
    }


def training_compute(info: dict, tokens: float) -> dict:
    """C from the model's FLOPs per token and from 6 N D (N non-embedding), for `tokens` tokens."""
    return {"tokens": tokens, "flops": info["flops_per_token"] * tokens,
            "flops_6nd": 6.0 * info["non_embedding"] * tokens,
            "flops_per_param_token": info["flops_per_token"] / info["non_embedding"]}


def _parser():
    p = Parser(prog="python -m titan_linear.analysis.flops", description=__doc__)
    p.add_argument("--config", required=True, help="a training TOML")
    p.add_argument("--tokens", type=float, default=None, help="training tokens D: also give C")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default training.seq_len)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    return p


def run(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    if args.tokens is not None and not args.tokens > 0:
        raise ValueError(f"--tokens = {args.tokens} is not allowed: a number > 0")
    check_at_least("--seq-len", args.seq_len)
    if not os.path.isfile(args.config):
        raise ValueError(f"--config = {args.config!r} is not allowed: no such file")
    info = model_flops(args.config, overrides, args.seq_len)
    if args.tokens is not None:
        info.update(training_compute(info, args.tokens))
    if args.out:
        write_json(args.out, info)
    print(f"{info['model']} {info['flavor']} {info['layer_map']} at seq_len {info['seq_len']}: "
          f"{info['nparams']:,} parameters ({info['non_embedding']:,} non-embedding), "
          f"{info['flops_per_token']:.4g} training FLOPs per token "
          f"({info['flops_per_token'] / info['non_embedding']:.3f} per non-embedding parameter)")
    if args.tokens is not None:
        print(f"C at {args.tokens:.4g} tokens: {info['flops']:.4g} FLOPs (6ND: {info['flops_6nd']:.4g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
