"""scripts/build_corpus.py on small fake package files (no network): what each cleaning rule keeps
and drops, deduplication, the hashed train/validation split, and token files that the `tokens`
dataset reads and that hold exactly what the text datasets' encoding gives."""

import importlib.util
import io
import json
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest

from tests.integration.harness import REPO

spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)

REPEATED = ("This paragraph appears in two manuals of the fake project, and the corpus keeps it "
            "only where it first appears.")
INTRO = f"""Introduction
============

Call :func:`fake.run` with ``verbose`` set, as the `user guide <https://example.org/guide>`_ explains
to every new **reader** of this manual::

    fake.run(verbose=True)
    print("code is dropped")

.. note:: a directive is markup, not prose.

>>> fake.run()

- the first item of a list of things worth saying
- the second item of that list, also worth saying

{REPEATED}
"""
MODULE = '''"""The fake module explains itself in its docstring, in plain words for the reader.

>>> import fake
"""


def f():
    """Return nothing at all, which is what this small function is meant to do."""
'''
BOOK = """Some preface that Project Gutenberg adds before the book begins here.
*** START OF THE PROJECT GUTENBERG EBOOK FAKE ***

THE FAKE PLAY

Enter the first player, who speaks in verse
across two lines of the same speech.

Exit the first player, and the second one follows.

*** END OF THE PROJECT GUTENBERG EBOOK FAKE ***
License text that must not be kept in the corpus at all.
"""


def sdist(path, files: dict):
    with tarfile.open(path, "w:gz") as t:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    dl = root / "downloads"
    for folder in ("fakedocs-1.0", "fakebook-1.0", "fakedict-1.0", "fakeverses-1.0"):
        (dl / folder).mkdir(parents=True)
    sdist(dl / "fakedocs-1.0" / "fakedocs-1.0.tar.gz", {
        "fakedocs-1.0/docs/intro.rst": INTRO,
        "fakedocs-1.0/docs/other.md": f"# Other\n\n```python\nx = 1\n```\n\n{REPEATED}\n\n"
                                      "A [linked page](https://example.org) that says something useful to readers, in a sentence "
                                      "long enough to keep its document.\n",
        "fakedocs-1.0/fake/mod.py": MODULE,
        "fakedocs-1.0/tests/test_fake.py": '"""Tests are no documentation, however long their docstring is."""\n',
        "fakedocs-1.0/README.md": "The readme is outside docs/ and is therefore not part of the corpus.\n",
    })
    sdist(dl / "fakebook-1.0" / "fakebook-1.0.tar.gz", {"fakebook-1.0/texts/play.txt": BOOK,
                                                        "fakebook-1.0/texts/play_gut_f.txt": BOOK.replace("FAKE", "FOLIO")})
    words = {"abacus": {"entry": "abacus", "pos": [{"part_of_speech": "n.", "definitions": [
        {"text": "A frame with beads for counting; a counting board used in arithmetic. Shak.1913 Webster]",
         "examples": ["He reckoned on the abacus."]}]}]}}
    with zipfile.ZipFile(dl / "fakedict-1.0" / "fakedict-1.0-py3-none-any.whl", "w") as z:
        z.writestr("dictionary/data/en/words_A.json", json.dumps(words))
    verses = [{"book": "Genesis", "chapter": c, "verse": v, "text": f"Verse {v} of chapter {c}, said plainly and at length."}
              for c in (1, 2, 3) for v in (1, 2, 3)]
    sdist(dl / "fakeverses-1.0" / "fakeverses-1.0.tar.gz",
          {"fakeverses-1.0/data/v.jsonl": "\n".join(json.dumps(v) for v in verses) + "\n"})
    sources = [
        bc.Source("fakedocs", "1.0", "docs", None),
        bc.Source("fakebook", "1.0", "literature", None, include=("texts/*.txt",), exclude=("*_gut_f.txt",)),
        bc.Source("fakedict", "1.0", "gcide", None, sdist=False, include=("dictionary/data/en/words_*.json",)),
        bc.Source("fakeverses", "1.0", "verses", None, include=("data/*.jsonl",)),
    ]
    real_run = subprocess.run

    def no_network(cmd, *a, **k):  # every package file is already there: pip must not run
        raise AssertionError(f"network access attempted: {cmd}")

    subprocess.run = no_network
    try:
        manifests = [bc.build(sources, str(dl), str(root / f"out{i}"), val_fraction=0.3) for i in (1, 2)]
    finally:
        subprocess.run = real_run
    docs = {}
    for part in ("train", "validation"):
        docs[part] = [json.loads(ln) for ln in (root / "out1" / f"{part}.jsonl").read_text().splitlines()]
    return root, sources, manifests, docs


def all_text(docs):
    return "\n\n".join(d["text"] for part in docs.values() for d in part)


def test_manuals_keep_prose_and_drop_markup(built):
    _, _, _, docs = built
    text = all_text(docs)
    assert ("Call fake.run with verbose set, as the user guide explains to every new reader of this manual:"
            in text)
    assert "- the first item of a list of things worth saying\n- the second item" in text
    assert "The fake module explains itself in its docstring, in plain words for the reader." in text
    assert "Return nothing at all" in text
    assert "A linked page that says something useful to readers, in a sentence long enough" in text
    for gone in ("print(", "directive", ">>>", "====", "Introduction", "x = 1", "Tests are no documentation",
                 "readme", "https://"):
        assert gone not in text, gone
    assert text.count(REPEATED) == 1  # deduplicated across files


def test_literature_dictionary_and_verses(built):
    _, _, _, docs = built
    text = all_text(docs)
    assert "Enter the first player, who speaks in verse\nacross two lines of the same speech." in text
    assert "preface" not in text and "License" not in text and "FOLIO" not in text
    assert "abacus (n.): A frame with beads for counting; a counting board used in arithmetic. Shak. " \
           "Example: He reckoned on the abacus." in text
    assert "Webster" not in text
    chapters = sorted(d["id"].split("#")[1] for part in docs.values() for d in part if d["source"] == "fakeverses")
    assert chapters == ["Genesis 1", "Genesis 2", "Genesis 3"]


def test_split_is_by_hashed_document_id_and_reproducible(built):
    root, _, manifests, docs = built
    train, val = docs["train"], docs["validation"]
    limit = int(0.3 * 2 ** 64)
    assert val and train
    assert all(bc.split_key(d["source"], d["id"]) < limit for d in val)
    assert all(bc.split_key(d["source"], d["id"]) >= limit for d in train)
    keys = [bc.split_key(d["source"], d["id"]) for d in train]
    assert keys == sorted(keys)  # written in hash order
    assert manifests[0]["files"] == manifests[1]["files"]  # two builds: byte-identical outputs


def test_token_files_hold_the_text_datasets_encoding(built):
    from titan_linear.data import BUILTIN_TOKENIZER_DIR, TokenFileDataset, open_token_file
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    root, _, manifests, docs = built
    tok = HuggingFaceTokenizer(BUILTIN_TOKENIZER_DIR)
    for part in ("train", "validation"):
        expected = [i for d in docs[part] for i in tok.encode(d["text"], add_bos=True, add_eos=True)]
        ids = open_token_file(str(root / "out1" / f"{part}.bin"), tok.get_vocab_size())
        assert ids.dtype == np.uint16 and ids.tolist() == expected
        assert manifests[0]["totals"][part]["tokens"] == len(expected)
        per_source = sum(p["split"][part]["tokens"] for p in manifests[0]["packages"])
        assert per_source == len(expected)
    windows = TokenFileDataset(str(root / "out1" / "train.bin"), tok.get_vocab_size(), seq_len=16)
    x, y = next(iter(windows))
    assert x["input"][1:].tolist() == y[:-1].tolist()


def test_a_changed_package_file_stops_the_build(built, tmp_path):
    root, sources, _, _ = built
    wrong = bc.Source("fakedocs", "1.0", "docs", "0" * 64)
    with pytest.raises(SystemExit, match="sha256"):
        bc.build([wrong], str(root / "downloads"), str(tmp_path / "out"), 0.3)
    assert not (tmp_path / "out").exists()
