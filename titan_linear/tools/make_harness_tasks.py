"""Rebuild the data of the packaged lm-eval tasks (titan_linear/assets/eval/tasks/*.jsonl).

Every document comes from the validation split of the packaged tinyshakespeare text (its
last 10 %, the text that dataset `tinyshakespeare_val` reads and that neither training nor
the packaged tokenizer saw). A paragraph is one speech: the speaker's name and a colon on
the first line, then the lines of verse or prose. Choices are drawn with a fixed seed, so
running this again rewrites identical files:

    python -m titan_linear.tools.make_harness_tasks            # write the JSONL files
    python -m titan_linear.tools.make_harness_tasks --check    # exit 1 if they differ

- shakespeare_ppl.jsonl: {"text"}: every validation paragraph, one document each (the unit
  the model was trained on: training data is [BOS] paragraph [EOS], one after another).
- shakespeare_next_line.jsonl: {"context", "choices", "label"}: the speaker and the first k
  lines of a speech of at least 3 lines, the true line k + 1 among 4 choices; the 3 others are
  lines of other validation speeches, of similar length.
- shakespeare_recall.jsonl: {"context", "answer"}: a speech of at least 4 lines, then, on a
  new line, the first words of one of its lines; the answer is the rest of that line, to be
  copied from the context (in-context recall).
"""

import argparse
import json
import os
import random
import sys

from titan_linear.data.sources import ASSETS_DIR, TINYSHAKESPEARE_PATH, paragraphs, split_tinyshakespeare

TASKS_DIR = os.path.join(ASSETS_DIR, "eval", "tasks")
SEED = 1234
MAX_DOCS = 200  # per multiple-choice / recall task
N_CHOICES = 4
CUE_WORDS = 3  # words of the recalled line given as its cue


def validation_paragraphs() -> list[str]:
    with open(TINYSHAKESPEARE_PATH, encoding="utf-8") as f:
        return paragraphs(split_tinyshakespeare(f.read())[1])


def speeches(texts: list[str]) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every paragraph that opens with a speaker's name."""
    out = []
    for p in texts:
        head, *lines = p.split("\n")
        if head.endswith(":") and lines:
            out.append((head[:-1], lines))
    return out


def next_line_docs(all_speeches, rng: random.Random) -> list[dict]:
    pool = [(i, line) for i, (_, lines) in enumerate(all_speeches) for line in lines]
    docs = []
    for i, (speaker, lines) in enumerate(all_speeches):
        if len(lines) < 3:
            continue
        k = rng.randrange(1, len(lines))
        answer = lines[k]
        # Lines of other speeches, of similar length, so that length alone does not tell.
        near = [line for j, line in pool if j != i and line != answer and abs(len(line) - len(answer)) <= 10]
        if len(near) < N_CHOICES - 1:
            continue
        choices = rng.sample(near, N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, answer)
        docs.append({"context": "\n".join([f"{speaker}:"] + lines[:k]), "choices": choices, "label": label})
    return rng.sample(docs, MAX_DOCS) if len(docs) > MAX_DOCS else docs


def recall_docs(all_speeches, rng: random.Random) -> list[dict]:
    docs = []
    for speaker, lines in all_speeches:
        if len(lines) < 4:
            continue
        cues = [" ".join(line.split()[:CUE_WORDS]) for line in lines]
        # The cue must name one line only, and leave at least two words to recall.
        usable = [n for n, line in enumerate(lines)
                  if cues.count(cues[n]) == 1 and len(line.split()) >= CUE_WORDS + 2]
        if not usable:
            continue
        n = rng.choice(usable)
        words = lines[n].split()
        docs.append({"context": "\n".join([f"{speaker}:"] + lines + [cues[n]]),
                     "answer": " ".join(words[CUE_WORDS:])})
    return rng.sample(docs, MAX_DOCS) if len(docs) > MAX_DOCS else docs


def build() -> dict[str, str]:
    """File name -> JSONL content."""
    texts = validation_paragraphs()
    all_speeches = speeches(texts)
    rng = random.Random(SEED)
    tables = {
        "shakespeare_ppl.jsonl": [{"text": t} for t in texts],
        "shakespeare_next_line.jsonl": next_line_docs(all_speeches, rng),
        "shakespeare_recall.jsonl": recall_docs(all_speeches, rng),
    }
    return {name: "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs) for name, docs in tables.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_linear.tools.make_harness_tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=TASKS_DIR, help="where to write (default: the packaged task folder)")
    p.add_argument("--check", action="store_true", help="compare with the files in --out-dir instead of writing")
    args = p.parse_args(argv)
    files = build()
    if args.check:
        stale = []
        for name, content in files.items():
            path = os.path.join(args.out_dir, name)
            if not os.path.isfile(path) or open(path, encoding="utf-8").read() != content:
                stale.append(name)
        if stale:
            print(f"differ from a fresh build: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
            f.write(content)
        print(f"{name}: {content.count(chr(10))} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
