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

import sys

from titan_linear.cli import load_model, model_parser, run_main, split_overrides

PROG = "titan_linear.generate"


def _parser():
    p = model_parser("python -m titan_linear.generate", __doc__)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (default) keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 (default) keeps all tokens")
    p.add_argument("--eager-decode", action="store_true",
                   help="decode eagerly on cuda too (default there: replay one captured CUDA graph per step)")
    p.add_argument("--no-compile", action="store_true",
                   help="capture the eager step's kernels in the CUDA graph, not the torch.compile'd step "
                        "(no compile time; slower steps)")
    return p


def run(argv: list[str]) -> int:
    """Parse, build, generate, print. Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens = {args.max_new_tokens} is not allowed: an integer >= 1")
    from titan_linear.inference import ensure_rope_length, generate, SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p).check()
    loaded = load_model(args, overrides)
    job_config, model_args, tokenizer = loaded.job_config, loaded.model_args, loaded.tokenizer
    prompt = tokenizer.encode(args.prompt, add_bos=True, add_eos=False)
    if not prompt:
        raise ValueError(f"--prompt = {args.prompt!r} is not allowed: it encodes to no token")
    if max(prompt) >= model_args.vocab_size:
        raise ValueError(
            f"--prompt = {args.prompt!r}: token id {max(prompt)} is outside the model's vocab "
            f"({model_args.vocab_size}); check model.hf_assets_path / model.vocab_size"
        )
    model = loaded.model
    total = len(prompt) + args.max_new_tokens
    if total > job_config.training.seq_len:
        print(f"note: {total} positions exceed training.seq_len = {job_config.training.seq_len}; "
              "softmax layers see RoPE positions they were not trained on", file=sys.stderr)
    ensure_rope_length(model, total)

    # Untimed warm-up over the same prompt (prefill, one decode step): first calls pay for
    # lazy set-up and per-shape kernel plans, and the CUDA-graph path compiles its step here.
    graph = False if args.eager_decode else None
    generate(model, prompt, 2, sampling, seed=args.seed, cuda_graph=graph, compile=not args.no_compile)
    result = generate(model, prompt, args.max_new_tokens, sampling, seed=args.seed, eos_id=tokenizer.eos_id,
                      cuda_graph=graph, compile=not args.no_compile)
    about = loaded.describe()
    print(f"model: {about['model']} {about['flavor']}, layer map {about['layer_map']}, "
          f"weights: {about['weights']}, {about['device']} {about['dtype']}", flush=True)
    print(tokenizer.decode(prompt + result.tokens, skip_special_tokens=True))
    print(f"prefill: {result.prefill_ms:.2f} ms for {len(prompt)} prompt tokens")
    end = "stopped at EOS" if result.stopped_on_eos else "max_new_tokens reached"
    print(f"decode: {result.decode_ms_per_token:.2f} ms/token over {len(result.decode_ms)} steps, "
          f"{result.tokens_per_s:.1f} tokens/s; {len(result.tokens)} new tokens ({end})"
          + (f"; CUDA graphs captured in {result.capture_ms:.0f} ms" if result.capture_ms else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
