"""Generate text from a trained checkpoint: `python -m titan_linear.generate`.

    python -m titan_linear.generate --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint/step-100 --prompt "ROMEO:" \\
        [--max-new-tokens 100] [--temperature 0.8 --top-k 50 --top-p 0.95] [--seed 0] \\
        [--device cpu|cuda] [--dtype bf16|fp32] [-- TorchTitan overrides, e.g. --model.n_layers 4]

The model is built from the TOML as training builds it (model name, flavor, [model] keys,
layer map), weights come from the DCP checkpoint (`--random-init` skips it, for timing), the
prompt is encoded with the config's tokenizer (BOS added, as training data has it). Softmax
layers decode from a KV cache, linear layers from their constant-size recurrent state
(titan_linear/inference/). Prints the text, then the prefill time and the per-token decode
time (after an untimed warm-up pass over the prompt). Bad input stops with one line naming
the flag and the value, exit status 2.
"""

import argparse
import logging
import os
import sys
import warnings

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
DEVICES = ("cpu", "cuda")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every bad input is one line."""

    def error(self, message):
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m titan_linear.generate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training TOML the checkpoint was trained with")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="<dump_folder>/checkpoint/step-N (or the checkpoint folder: newest step)")
    src.add_argument("--random-init", action="store_true", help="random weights, no checkpoint (benchmarks)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (default) keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 (default) keeps all tokens")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and --random-init")
    p.add_argument("--device", default=None, help="cpu or cuda; default cuda when there is one")
    p.add_argument("--dtype", default=None, help="bf16 or fp32; default bf16 on cuda, fp32 on cpu")
    p.add_argument("--eager-decode", action="store_true",
                   help="decode eagerly on cuda too (default there: replay one captured CUDA graph per step)")
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise ValueError(f"--device = {device!r} is not allowed: one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device = 'cuda' is not allowed: no CUDA device is visible here")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype = {dtype!r} is not allowed: one of {', '.join(DTYPES)}")
    return torch.device(device), dtype


def run(argv: list[str]) -> int:
    """Parse, build, generate, print. Raises ValueError on bad input."""
    own, overrides = _split_overrides(argv)
    args = _parser().parse_args(own)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens = {args.max_new_tokens} is not allowed: an integer >= 1")
    import torch

    from titan_linear.inference import generate, prepare_model, SamplingConfig
    from titan_linear.inference.build import (
        build_model, build_tokenizer, find_checkpoint, load_model_weights, parse_job_config,
    )

    if not os.path.isfile(args.config):
        raise ValueError(f"--config = {args.config!r} is not allowed: no such file")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p).check()
    device, dtype = _device_and_dtype(args)
    if args.checkpoint is not None:
        find_checkpoint(args.checkpoint)  # a bad path fails before the model is built
    job_config, model_args = parse_job_config(args.config, overrides)
    tokenizer = build_tokenizer(job_config)
    prompt = tokenizer.encode(args.prompt, add_bos=True, add_eos=False)
    if not prompt:
        raise ValueError(f"--prompt = {args.prompt!r} is not allowed: it encodes to no token")
    if max(prompt) >= model_args.vocab_size:
        raise ValueError(
            f"--prompt = {args.prompt!r}: token id {max(prompt)} is outside the model's vocab "
            f"({model_args.vocab_size}); check model.hf_assets_path / model.vocab_size"
        )

    model = build_model(job_config, model_args, device, seed=args.seed)
    source = "random init" if args.random_init else load_model_weights(model, args.checkpoint)
    total = len(prompt) + args.max_new_tokens
    if total > job_config.training.seq_len:
        print(f"note: {total} positions exceed training.seq_len = {job_config.training.seq_len}; "
              "softmax layers see RoPE positions they were not trained on", file=sys.stderr)
    prepare_model(model, getattr(torch, DTYPES[dtype]), max_len=total)

    # Untimed warm-up over the same prompt (prefill, one decode step): first calls pay for
    # lazy set-up and per-shape kernel plans.
    graph = False if args.eager_decode else None
    generate(model, prompt, 2, sampling, seed=args.seed, cuda_graph=graph)
    result = generate(model, prompt, args.max_new_tokens, sampling, seed=args.seed, eos_id=tokenizer.eos_id,
                      cuda_graph=graph)
    layer_map = getattr(model_args, "layer_map", "S" * model_args.n_layers)
    print(f"model: {job_config.model.name} {job_config.model.flavor}, layer map {layer_map}, "
          f"weights: {source}, {device.type} {dtype}", flush=True)
    print(tokenizer.decode(prompt + result.tokens, skip_special_tokens=True))
    print(f"prefill: {result.prefill_ms:.2f} ms for {len(prompt)} prompt tokens")
    end = "stopped at EOS" if result.stopped_on_eos else "max_new_tokens reached"
    print(f"decode: {result.decode_ms_per_token:.2f} ms/token over {len(result.decode_ms)} steps, "
          f"{result.tokens_per_s:.1f} tokens/s; {len(result.tokens)} new tokens ({end})"
          + (f"; CUDA graph captured in {result.capture_ms:.0f} ms" if result.capture_ms else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # TorchTitan logs on the root logger (e.g. "HF assets path builtin does not exist!", which
    # is about its own default tokenizer path) and DCP warns that it loads in one process:
    # neither concerns generation, whose output is the text and the timings.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return run(argv)
    except ValueError as e:
        lines = str(e).strip().splitlines()
        print(f"titan_linear.generate: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or tyro's own message on a bad TorchTitan override
        return 0 if e.code in (0, None) else 2
    finally:
        root.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
