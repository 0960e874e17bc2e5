"""Rebuild the packaged tokenizer (titan_linear/assets/tokenizer/).

A byte-level BPE (GPT-2 style pre-tokenizer, no normalizer) with exactly 2048
ids: 256 byte symbols, `<|begin_of_text|>` (id 0) and `<|end_of_text|>`
(id 1), and 1790 merges learnt from the tinyshakespeare training split (the
same split that dataset `tinyshakespeare` reads), so the validation text stays
unseen. The `tokenizers` trainer is deterministic for a given input, so running
this again rewrites identical files:

    python -m titan_linear.tools.make_debug_tokenizer            # write the assets
    python -m titan_linear.tools.make_debug_tokenizer --check    # exit 1 if they differ
"""

import argparse
import json
import os
import sys
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from titan_linear.data.sources import TINYSHAKESPEARE_PATH, split_tinyshakespeare
from titan_linear.data.tokenizer import BOS_TOKEN, BUILTIN_TOKENIZER_DIR, EOS_TOKEN

VOCAB_SIZE = 2048

TOKENIZER_CONFIG = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    # The datasets ask for BOS/EOS explicitly; a bare encode() adds nothing.
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 131072,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE with `vocab_size` ids, BOS and EOS included.

    Args:
        text: the training text.
        vocab_size: ids in all. Default: 2048.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def write_assets(out_dir: str) -> None:
    """Train on the tinyshakespeare training split; write tokenizer(_config).json to out_dir."""
    with open(TINYSHAKESPEARE_PATH, encoding="utf-8") as f:
        train_text, _ = split_tinyshakespeare(f.read())
    os.makedirs(out_dir, exist_ok=True)
    train_tokenizer(train_text).save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=BUILTIN_TOKENIZER_DIR, help="directory to write")
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild in a temporary directory and compare with --out",
    )
    args = parser.parse_args(argv)
    if not args.check:
        write_assets(args.out)
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_assets(tmp)
        stale = []
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(tmp, name), "rb") as new:
                fresh = new.read()
            with open(os.path.join(args.out, name), "rb") as old:
                if old.read() != fresh:
                    stale.append(name)
    if stale:
        print(f"{args.out}: {stale} differ from a fresh build", file=sys.stderr)
        return 1
    print(f"{args.out} matches a fresh build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
