"""Passkey retrieval at several lengths and depths: `python -m titan_linear.eval.passkey`.

    python -m titan_linear.eval.passkey --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint --lengths 1024 2048 4096 \\
        --depths 0 0.25 0.5 0.75 1 [--trials 5] [--digits 5] \\
        --out results/passkey.json [--plot results/passkey.png] [-- TorchTitan overrides]

The test of Mohtashami & Jaggi (2023, arXiv 2305.16300), generated, no dataset: an
instruction, filler sentences repeated, one line stating a random key of `--digits` digits
at relative depth d (0: right after the instruction, 1: right before the question), then
"What is the pass key? The pass key is". A length is the prompt's token count in the
model's tokenizer, BOS included: the largest number of filler sentences whose prompt fits
in it, so a prompt is at most one filler sentence (a few tokens) shorter than asked; the
result records each prompt's exact count and the key's token position.

Two scores per prompt, averaged over `--trials` keys per (length, depth):
- exact match: greedy decoding (titan_linear.inference.generate, temperature 0, eager decode)
  of len(key tokens) + 2 tokens; it matches when the first run of digits it writes is the key;
- teacher-forced log-probability of the key: the answer " <key>" encoded after the prompt,
  the sum of log p(token | prompt, earlier key tokens) over its tokens (one forward), also
  per digit (the sum / --digits) and per token.
"""

import random
import re
import sys

import torch

from titan_linear.cli import load_model, model_parser, run_main, split_overrides, write_json
from titan_linear.eval.report import pyplot, save_figure

PROG = "titan_linear.eval.passkey"
INSTRUCTION = "Find the pass key in this text."
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"
MAX_DIGITS = 20


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _parser():
    p = model_parser("python -m titan_linear.eval.passkey", __doc__)
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="relative depths of the key in [0, 1] (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--trials", type=int, default=5, help="keys per (length, depth) (default 5)")
    p.add_argument("--digits", type=int, default=5, help="digits of the key (default 5)")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--plot", default=None, help="a PNG heatmap length x depth (needs matplotlib)")
    return p


def check_args(args) -> None:
    """Raise ValueError naming the flag for every bad value that needs no model."""
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths = {d} is not allowed: a number in [0, 1]")
    if args.trials < 1:
        raise ValueError(f"--trials = {args.trials} is not allowed: an integer >= 1")
    if not 1 <= args.digits <= MAX_DIGITS:
        raise ValueError(f"--digits = {args.digits} is not allowed: an integer in [1, {MAX_DIGITS}]")
    for n in args.lengths:
        if n < 1:
            raise ValueError(f"--lengths = {n} is not allowed: a positive number of tokens")
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise ValueError(f"--plot = {args.plot!r} is not allowed: a .png file")
        pyplot("--plot")


def _encode(tokenizer, text: str, bos: bool) -> list[int]:
    return tokenizer.encode(text, add_bos=bos, add_eos=False)


def _text(n_filler: int, depth: float, key: str) -> tuple[str, str]:
    """(the text before the key line, the whole prompt) with n_filler sentences around the key."""
    before = round(depth * n_filler)
    filler = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    head = " ".join([INSTRUCTION] + filler[:before])
    return head, " ".join([head, key_line(key)] + filler[before:] + [QUESTION])


def build_prompt(tokenizer, length: int, depth: float, key: str) -> dict:
    """The prompt of at most `length` tokens (BOS included) with the most filler that fits.

    Returns {"ids", "key_position" (index of the key line's first token), "n_filler",
    "depth_actual" (the filler tokens before the key line / all filler tokens)}.
    Raises ValueError naming --lengths when even no filler does not fit.
    """
    def size(n):
        return len(_encode(tokenizer, _text(n, depth, key)[1], bos=True))

    if size(0) > length:
        raise ValueError(f"--lengths = {length} is not allowed: the prompt without filler takes {size(0)} tokens")
    lo, hi = 0, 1
    while size(hi) <= length:  # grow, then bisect: the largest n with size(n) <= length
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= length else (lo, mid)
    head, text = _text(lo, depth, key)
    # The key line starts right after the head (its first token carries the space); depth_actual places it
    # between its first possible position (after the instruction) and its last (after all filler).
    position = len(_encode(tokenizer, head, bos=True))
    first = len(_encode(tokenizer, _text(lo, 0.0, key)[0], bos=True))
    last = len(_encode(tokenizer, _text(lo, 1.0, key)[0], bos=True))
    return {"ids": _encode(tokenizer, text, bos=True), "key_position": position, "n_filler": lo,
            "depth_actual": (position - first) / (last - first) if last > first else depth}


def answer_ids(tokenizer, key: str) -> list[int]:
    """The key's tokens as they follow the prompt: " <key>"."""
    return _encode(tokenizer, " " + key, bos=False)


@torch.no_grad()
def key_logprob(model, prompt: list[int], answer: list[int]) -> list[float]:
    """log p(answer[i] | prompt + answer[:i]) for each answer token, from one teacher-forced forward."""
    device = model.tok_embeddings.weight.device
    tokens = torch.tensor([prompt + answer[:-1]], dtype=torch.long, device=device)
    logits = model(tokens)[0, len(prompt) - 1:].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(answer, dtype=torch.long, device=device)
    return logp.gather(1, target[:, None])[:, 0].tolist()


def greedy_answer(model, tokenizer, prompt: list[int], n_tokens: int) -> str:
    from titan_linear.inference import generate, SamplingConfig

    result = generate(model, prompt, n_tokens, SamplingConfig(), eos_id=tokenizer.eos_id, cuda_graph=False)
    return tokenizer.decode(result.tokens)


def _key(seed: int, length: int, d: int, trial: int, digits: int) -> str:
    rng = random.Random(f"{seed}-{length}-{d}-{trial}")
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))


def evaluate(loaded, lengths, depths, trials: int, digits: int, seed: int = 0) -> list[dict]:
    """One record per (length, depth): means over trials, and every trial."""
    records = []
    for length in lengths:
        for d, depth in enumerate(depths):
            samples = []
            for t in range(trials):
                key = _key(seed, length, d, t, digits)
                prompt = build_prompt(loaded.tokenizer, length, depth, key)
                answer = answer_ids(loaded.tokenizer, key)
                logps = key_logprob(loaded.model, prompt["ids"], answer)
                said = greedy_answer(loaded.model, loaded.tokenizer, prompt["ids"], len(answer) + 2)
                found = re.search(r"\d+", said)
                samples.append({
                    "key": key, "prompt_tokens": len(prompt["ids"]), "key_position": prompt["key_position"],
                    "n_filler": prompt["n_filler"], "depth_actual": prompt["depth_actual"], "generated": said,
                    "match": bool(found and found.group() == key),
                    "n_key_tokens": len(answer), "logprob_sum": sum(logps),
                })
            mean = lambda k: sum(s[k] for s in samples) / trials  # noqa: E731
            records.append({
                "length": length, "depth": depth, "trials": trials,
                "prompt_tokens_mean": mean("prompt_tokens"),
                "depth_actual_mean": mean("depth_actual"),
                "exact_match": mean("match"),
                "key_logprob_sum": mean("logprob_sum"),
                "key_logprob_per_digit": mean("logprob_sum") / digits,
                "key_logprob_per_token": sum(s["logprob_sum"] / s["n_key_tokens"] for s in samples) / trials,
                "samples": samples,
            })
    return records


def plot(records: list[dict], lengths, depths, path: str, title: str) -> None:
    plt = pyplot("--plot")
    at = {(r["length"], r["depth"]): r for r in records}
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(lengths), 0.6 * len(depths) + 2.5))
    panels = [("exact_match", "greedy exact match", "RdYlGn", 0.0, 1.0),
              ("key_logprob_per_digit", "log p(key) per digit", "viridis", None, 0.0)]
    for ax, (field, name, cmap, vmin, vmax) in zip(axes, panels):
        grid = [[at[(n, d)][field] for n in lengths] for d in depths]
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("depth")
        ax.set_title(name, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax)
    save_figure(plt, fig, path, title)


def run(argv: list[str]) -> int:
    """Parse, load, score every (length, depth), write the JSON (then the PNG). Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    check_args(args)
    margin = 2 * MAX_DIGITS + 8  # room for the key's tokens after the longest prompt
    loaded = load_model(args, overrides, max_len=max(args.lengths) + margin)
    for length in args.lengths:  # a length too short for the prompt fails before any scoring
        build_prompt(loaded.tokenizer, length, 0.0, "9" * args.digits)
    records = evaluate(loaded, args.lengths, args.depths, args.trials, args.digits, args.seed)
    about = loaded.describe()
    result = {
        "tool": PROG,
        "model": about,
        "settings": {
            "lengths": args.lengths, "depths": args.depths, "trials": args.trials, "digits": args.digits,
            "seed": args.seed, "overrides": overrides,
            "prompt": {"instruction": INSTRUCTION, "filler": list(FILLER), "key_line": key_line("<key>"),
                       "question": QUESTION, "length": "tokens incl. BOS, at most one filler sentence short"},
            "exact_match": "greedy decode, first run of digits equals the key",
            "logprob": "teacher-forced, natural log, over the tokens of ' <key>' after the prompt",
        },
        "results": records,
    }
    write_json(args.out, result)
    for r in records:
        print(f"length {r['length']} depth {r['depth']:g}: exact match {r['exact_match']:.2f}, "
              f"log p per digit {r['key_logprob_per_digit']:.3f}", file=sys.stderr)
    if args.plot is not None:
        plot(records, args.lengths, args.depths, args.plot,
             f"passkey: {about['model']} {about['flavor']} {about['layer_map']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
