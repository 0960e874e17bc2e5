"""Generations of several checkpoints side by side: `python -m titan_linear.eval.samples`.

    python -m titan_linear.eval.samples --prompts titan_linear/assets/eval/prompts.txt \\
        --run softmax=train_configs/debug_model.toml:outputs/softmax/checkpoint \\
        --run hybrid=train_configs/debug_model.toml:outputs/debug_model/checkpoint \\
        [--max-new-tokens 64] [--temperature 0.8 --top-k 50 --top-p 0.95] [--seed 0] \\
        --out samples.md [--device cpu|cuda] [--dtype bf16|fp32] [-- TorchTitan overrides for every run]

Each `--run NAME=TOML:CHECKPOINT` names a model: the training TOML and a DCP checkpoint
(`step-N` or the checkpoint folder, as `titan_linear.generate` takes it); CHECKPOINT may be
`random` (random init seeded by --seed) or `random:SEED`. The prompt file holds one prompt per
line (blank lines skipped; the two characters `\\n` stand for a line break, so a prompt can
end with a speaker's name and a new line, as the tinyshakespeare text has them); the file
shipped at titan_linear/assets/eval/prompts.txt holds 15 such prompts. Every run generates from every prompt through
`titan_linear.inference.generate` (greedy by default; with --temperature, sampling seeded by
--seed, the same stream for every run and prompt), one run loaded at a time. The markdown has,
per prompt, one subsection per run: its model, layer map and text (prompt + continuation). It
holds no timings, so equal inputs give the same file. Bad input stops with one line naming
the flag and the value, exit status 2, and nothing written.
"""

import argparse
import gc
import os
import sys
from dataclasses import dataclass

from titan_linear.cli import load_model, Parser, run_main, split_overrides, write_text

PROG = "titan_linear.eval.samples"


@dataclass
class RunSpec:
    """One `--run NAME=TOML:CHECKPOINT`."""

    name: str
    config: str
    checkpoint: str | None  # None: random init
    seed: int


def _parser() -> Parser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    p.add_argument("--run", action="append", required=True, metavar="NAME=TOML:CHECKPOINT",
                   help="a model to sample; CHECKPOINT may be 'random' or 'random:SEED'; repeat for more")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (default) keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 (default) keeps all tokens")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and random init")
    p.add_argument("--device", default=None, help="cpu or cuda; default cuda when there is one")
    p.add_argument("--dtype", default=None, help="bf16 or fp32; default bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", required=True, help="the markdown file")
    return p


def parse_run(spec: str, seed: int) -> RunSpec:
    """`NAME=TOML:CHECKPOINT` -> RunSpec; raises ValueError naming --run and the value."""
    bad = f"--run = {spec!r} is not allowed"
    name, eq, rest = spec.partition("=")
    config, colon, checkpoint = rest.partition(":")
    if not (eq and colon and name.strip() and config and checkpoint):
        raise ValueError(f"{bad}: write NAME=TOML:CHECKPOINT (CHECKPOINT a path, 'random' or 'random:SEED')")
    if name != name.strip() or any(c in name for c in "\n`"):
        raise ValueError(f"{bad}: NAME must not hold surrounding spaces, newlines or backticks")
    if not os.path.isfile(config):
        raise ValueError(f"{bad}: no such config file {config!r}")
    if checkpoint == "random" or checkpoint.startswith("random:"):
        own_seed = checkpoint.partition(":")[2]
        if own_seed and not own_seed.lstrip("-").isdigit():
            raise ValueError(f"{bad}: 'random:SEED' takes an integer seed")
        return RunSpec(name, config, None, int(own_seed) if own_seed else seed)
    if not os.path.exists(checkpoint):
        raise ValueError(f"{bad}: no such checkpoint {checkpoint!r}")
    return RunSpec(name, config, checkpoint, seed)


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of `path`, trailing spaces removed, each `\\n` turned into a line break."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts = {path!r} is not allowed: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip().replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts = {path!r} is not allowed: it holds no prompt")
    return prompts


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks in `text`."""
    longest, run = 0, 0
    for c in text:
        run = run + 1 if c == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def sample_run(spec: RunSpec, prompts: list[str], args, overrides: list[str], sampling) -> dict:
    """Load one run's model and generate from every prompt.

    Returns:
        {"about": Loaded.describe(), "texts": [(text, new_tokens, stopped_on_eos)] per prompt}.
    """
    from titan_linear.inference import ensure_rope_length, generate

    model_args = argparse.Namespace(config=spec.config, checkpoint=spec.checkpoint,
                                    random_init=spec.checkpoint is None, seed=spec.seed,
                                    device=args.device, dtype=args.dtype)
    loaded = load_model(model_args, overrides)
    tokenizer, vocab = loaded.tokenizer, loaded.model_args.vocab_size
    texts = []
    for i, prompt in enumerate(prompts, 1):
        ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
        if not ids or max(ids) >= vocab:
            raise ValueError(f"--prompts: prompt {i} ({prompt[:40]!r}) does not encode to ids below the vocab "
                             f"({vocab}) of run {spec.name!r}")
        ensure_rope_length(loaded.model, len(ids) + args.max_new_tokens)
        result = generate(loaded.model, ids, args.max_new_tokens, sampling, seed=args.seed, eos_id=tokenizer.eos_id)
        text = tokenizer.decode(ids + result.tokens, skip_special_tokens=True)
        texts.append((text, len(result.tokens), result.stopped_on_eos))
    about = loaded.describe()
    del loaded
    gc.collect()
    return {"about": about, "texts": texts}


def to_markdown(prompts: list[str], specs: list[RunSpec], results: list[dict], settings: str) -> str:
    """The samples as markdown: a table of runs, then per prompt one subsection per run."""
    lines = ["# Samples", "", settings, "", "| run | model | layer map | weights | config |", "|---|---|---|---|---|"]
    for spec, res in zip(specs, results):
        a = res["about"]
        weights = a["weights"] if spec.checkpoint is not None else f"random init (seed {spec.seed})"
        lines.append(f"| {spec.name} | {a['model']} {a['flavor']} | {a['layer_map']} | {weights} | {a['config']} |")
    for i, prompt in enumerate(prompts):
        quoted = [f"> {line}".rstrip() for line in prompt.rstrip("\n").split("\n")]
        lines += ["", f"## Prompt {i + 1}", "", "  \n".join(quoted)]
        for spec, res in zip(specs, results):
            a = res["about"]
            text, n_new, eos = res["texts"][i]
            end = ", stopped at EOS" if eos else ""
            fence = _fence(text)
            lines += ["", f"### {spec.name}", "",
                      f"{a['model']} {a['flavor']}, layer map `{a['layer_map']}`; {n_new} new tokens{end}", "",
                      f"{fence}text", text, fence]
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> int:
    """Parse, sample every run, write the markdown. Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens = {args.max_new_tokens} is not allowed: an integer >= 1")
    if os.path.isdir(args.out):
        raise ValueError(f"--out = {args.out!r} is not allowed: it is a directory")
    specs = [parse_run(s, args.seed) for s in args.run]
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--run = {repeated[0]!r} is not allowed: each run needs its own NAME")
    prompts = read_prompts(args.prompts)
    from titan_linear.inference import SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p).check()
    results = [sample_run(spec, prompts, args, overrides, sampling) for spec in specs]

    if args.temperature == 0:
        how = "greedy"
    else:
        how = f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, seed {args.seed}"
    settings = f"{len(prompts)} prompts from `{args.prompts}`, up to {args.max_new_tokens} new tokens, {how}."
    text = to_markdown(prompts, specs, results, settings)
    write_text(args.out, text)
    print(f"{PROG}: {len(specs)} runs x {len(prompts)} prompts -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
