"""Export a trained model to a Hugging Face folder: `python -m titan_linear.export.hf`.

    python -m titan_linear.export.hf --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint/step-100 --out exports/debug_model \\
        [--dtype fp32|bf16] [-- TorchTitan overrides, e.g. --model.n_layers 4]

The model is built from the TOML as training builds it and filled from the DCP checkpoint
(titan_linear.cli.load_model). The folder gets (docs/hf.md):

- model.safetensors: HF Llama names; wq/wk rows permuted to HF's RoPE layout (the llama3
  state-dict adapter's permutation, in every layer); the linear layers' options under self_attn;
- config.json: Llama's fields (RoPE as `rope_parameters` of type llama3, since TorchTitan always
  applies llama3 scaling), plus for a hybrid the layer list, the options and `auto_map`; in every
  case a `titan_linear` record (layer map, model, flavor, the OELM freeze map where present);
- generation_config.json, the tokenizer files of `model.hf_assets_path`;
- for a hybrid: configuration_titan_linear.py, modeling_titan_linear.py and the op's files, so
  `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads it. A model with no
  linear layer is written as a plain Llama (`model_type` "llama") that `LlamaForCausalLM` loads.

Refused (one line, exit 2, nothing written): an --out that exists and is not empty, a model other
than llama3_mixed / llama3_oelm / llama3, an attention other than causal SDPA, a missing
transformers or safetensors.
"""

import os
import shutil
import sys

from titan_linear.cli import load_model, model_parser, run_main, split_overrides

PROG = "titan_linear.export.hf"
MODELS = ("llama3_mixed", "llama3_oelm", "llama3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")
HERE = os.path.dirname(os.path.abspath(__file__))
# Written beside the weights of a hybrid: (source file, name in the folder).
CODE_FILES = (
    (os.path.join(HERE, "configuration_titan_linear.py"), "configuration_titan_linear.py"),
    (os.path.join(HERE, "modeling_titan_linear.py"), "modeling_titan_linear.py"),
    (os.path.join(HERE, "..", "ops", "efficient_attn", "chunk.py"), "chunk.py"),
    (os.path.join(HERE, "..", "ops", "efficient_attn", "naive.py"), "naive.py"),
    (os.path.join(HERE, "..", "models", "hybrid", "linear_options.py"), "linear_options.py"),
)
HF_PROJ = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj"}


def _parser():
    p = model_parser("python -m titan_linear.export.hf", __doc__)
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    return p


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out = {out!r} is not allowed: it exists and is not an empty folder")


def _check_model(job_config, model_args) -> None:
    name = job_config.model.name
    if name not in MODELS:
        raise ValueError(f"--config model.name = {name!r} is not allowed: one of {', '.join(MODELS)}")
    attn = getattr(model_args, "attn_type", "sdpa")
    mask = getattr(model_args, "attn_mask_type", "causal")
    if attn != "sdpa" or mask != "causal":
        raise ValueError(f"--config model.flavor = {job_config.model.flavor!r} is not allowed: its attention is "
                         f"{attn!r} with a {mask!r} mask; only causal SDPA exports faithfully to a Llama")


def record(loaded) -> dict:
    """The `titan_linear` entry of config.json: what the export was made from."""
    args, job = loaded.model_args, loaded.job_config
    out = {
        "model": job.model.name, "flavor": job.model.flavor, "layer_map": loaded.layer_map,
        "linear_layers": list(getattr(args, "linear_layers", [])), "training_seq_len": job.training.seq_len,
        "weights": loaded.source,
    }
    if hasattr(args, "oelm_freeze"):
        out["oelm"] = {
            "freeze": args.oelm_freeze, "freeze_ratio": args.freeze_ratio, "freeze_map": args.freeze_map,
            "frozen_layers": list(args.frozen_layers),
            "frozen_projections": [HF_PROJ[p] for p in args.frozen_projections],
            "note": "frozen in training; the exported weights are ordinary parameters",
        }
    return out


def hf_config(loaded, intermediate_size: int):
    """The config object of the export: LlamaConfig without linear layers, else TitanLinearConfig."""
    from transformers import LlamaConfig

    from titan_linear.export.configuration_titan_linear import TitanLinearConfig
    from titan_linear.models.hybrid.args import LINEAR_OPTION_DEFAULTS
    from titan_linear.models.hybrid.state_dict_adapter import rope_parameters

    args, tok = loaded.model_args, loaded.tokenizer
    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=intermediate_size,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads, head_dim=args.dim // args.n_heads,
        hidden_act="silu", max_position_embeddings=loaded.job_config.training.seq_len,
        rms_norm_eps=args.norm_eps, rope_parameters=rope_parameters(args), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=getattr(tok, "bos_id", None),
        eos_token_id=getattr(tok, "eos_id", None), dtype=str(loaded.dtype).removeprefix("torch."),
    )
    linear = list(getattr(args, "linear_layers", []))
    if not linear:
        cfg = LlamaConfig(**common)
        cfg.architectures = ["LlamaForCausalLM"]
    else:
        options = {k: getattr(args, k) for k in LINEAR_OPTION_DEFAULTS}
        cfg = TitanLinearConfig(**common, linear_layers=linear, **options)
        cfg.architectures = ["TitanLinearForCausalLM"]
        cfg.auto_map = {"AutoConfig": "configuration_titan_linear.TitanLinearConfig",
                        "AutoModelForCausalLM": "modeling_titan_linear.TitanLinearForCausalLM"}
    cfg.titan_linear = record(loaded)
    return cfg


def hf_state_dict(model, model_args, dtype) -> dict:
    """The model's tensors under HF names (HybridStateDictAdapter), contiguous, in `dtype`."""
    from titan_linear.models.hybrid.state_dict_adapter import HybridStateDictAdapter

    adapter = HybridStateDictAdapter(model_args, None)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter.to_hf(model.state_dict()).items()}


def write_export(loaded, out: str) -> dict:
    """Write the HF folder of `loaded` (a cli.Loaded) to `out`, whole or not at all; return its config."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from titan_linear.data.tokenizer import resolve_hf_assets_path

    model, args = loaded.model, loaded.model_args
    tensors = hf_state_dict(model, args, loaded.dtype)
    cfg = hf_config(loaded, tensors["model.layers.0.mlp.gate_proj.weight"].shape[0])
    tok_dir = resolve_hf_assets_path(loaded.job_config.model.hf_assets_path)
    tmp = f"{out.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        hybrid = bool(cfg.titan_linear["linear_layers"])
        GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                         use_cache=not hybrid).save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copyfile(os.path.join(tok_dir, name), os.path.join(tmp, name))
        if hybrid:
            for src, name in CODE_FILES:
                shutil.copyfile(src, os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked before)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def run(argv: list[str]) -> int:
    """Parse, build, export. Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        from titan_linear.export import HF_INSTALL
        raise ValueError(f"the export needs {e.name}, which is not installed: {HF_INSTALL}") from None
    _check_out(args.out)
    args.device = args.device or "cpu"
    loaded = load_model(args, overrides)
    _check_model(loaded.job_config, loaded.model_args)
    cfg = write_export(loaded, args.out)
    kind = "titan_linear_llama (trust_remote_code or `import titan_linear.export`)" if cfg.titan_linear[
        "linear_layers"] else "llama (LlamaForCausalLM)"
    print(f"exported {loaded.source} ({loaded.job_config.model.name}, layer map {loaded.layer_map}, "
          f"{loaded.dtype_name}) to {args.out}: {kind}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
