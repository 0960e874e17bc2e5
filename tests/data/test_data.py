"""titan_linear.data: the packaged tokenizer, every local dataset, resumption, errors."""

import itertools
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from torchtitan.config import ConfigManager
from torchtitan.hf_datasets.text_datasets import build_text_validation_dataloader

from titan_linear.data import (
    BUILTIN_TOKENIZER_DIR,
    TokenFileDataset,
    Validator,
    build_dataloader,
    build_tokenizer,
    build_validation_dataloader,
    token_dtype,
)
from titan_linear.data import sources
from titan_linear.tools import make_debug_tokenizer

SEQ_LEN = 32
BATCH = 4
TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, {i} times.\nSecond line {i}."
    for i in range(200)
)


def job_config(*args: str):
    return ConfigManager().parse_args(
        [
            "--model.hf_assets_path", "builtin",
            "--training.seq_len", str(SEQ_LEN),
            "--training.local_batch_size", str(BATCH),
            "--validation.seq_len", str(SEQ_LEN),
            "--validation.local_batch_size", str(BATCH),
            *args,
        ]
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(job_config())


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x["input"], y) for x, y in itertools.islice(iter(loader), n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture
def data_files(tmp_path, tokenizer):
    """A .txt file, a directory of .txt files, a .jsonl file and token files."""
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    paragraphs = TEXT.split("\n\n")
    (tmp_path / "dir" / "1.txt").write_text("\n\n".join(paragraphs[:100]))
    (tmp_path / "dir" / "sub" / "2.txt").write_text("\n\n".join(paragraphs[100:]))
    with open(tmp_path / "a.jsonl", "w") as f:
        for p in TEXT.split("\n\n"):
            f.write(json.dumps({"text": p, "id": 0}) + "\n")
    ids = np.arange(2040)  # ids equal positions, all below the vocab size
    ids.astype(np.uint16).tofile(tmp_path / "a.bin")
    np.save(tmp_path / "a.npy", ids.astype(np.int32))
    return tmp_path


def test_build_tokenizer_builtin(tokenizer):
    assert tokenizer.tokenizer_path == BUILTIN_TOKENIZER_DIR
    assert tokenizer.get_vocab_size() == 2048
    assert tokenizer.id_to_token(tokenizer.bos_id) == "<|begin_of_text|>"
    assert tokenizer.id_to_token(tokenizer.eos_id) == "<|end_of_text|>"
    text = "First Citizen:\nBefore we proceed any further, hear me speak.  Ünïcödé ✓\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) // 2  # merges learnt, not bytes
    with_bos_eos = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert with_bos_eos == [tokenizer.bos_id, *ids, tokenizer.eos_id]
    assert build_tokenizer(job_config("--model.hf_assets_path", "")).get_vocab_size() == 2048


def test_build_tokenizer_local_dir(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUILTIN_TOKENIZER_DIR, name), tmp_path)
    tok = build_tokenizer(job_config("--model.hf_assets_path", str(tmp_path)))
    assert tok.tokenizer_path == str(tmp_path) and tok.bos_id == 0


def test_build_tokenizer_hub_id_from_cache_when_unreachable(tmp_path, monkeypatch):
    """An `org/name` whose tokenizer is in the hub cache loads with no network."""
    from huggingface_hub import constants

    from titan_linear.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "hub_reachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tok"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUILTIN_TOKENIZER_DIR, name), snapshot)
    tok = build_tokenizer(job_config("--model.hf_assets_path", "acme/tok"))
    assert tok.tokenizer_path == str(snapshot) and tok.get_vocab_size() == 2048


@pytest.mark.parametrize(
    "value, problem",
    [
        ("./no/such/dir", "no such local directory"),
        ("no-such-org-3f9a/no-such-tokenizer", "no such local directory, and "),
        (BUILTIN_TOKENIZER_DIR + "/tokenizer.json", "is a file"),
        ("EMPTY", "holds no tokenizer file"),
    ],
    ids=["missing", "hub", "file", "empty-dir"],
)
def test_build_tokenizer_errors(tmp_path, value, problem):
    value = str(tmp_path) if value == "EMPTY" else value
    with pytest.raises(ValueError) as e:
        build_tokenizer(job_config("--model.hf_assets_path", value))
    message = str(e.value)
    assert f"model.hf_assets_path = {value!r}" in message and problem in message
    assert "'builtin'" in message and "\n" not in message


def test_make_debug_tokenizer_reproduces_assets():
    assert make_debug_tokenizer.main(["--check"]) == 0


def test_build_dataloader_tinyshakespeare(tokenizer):
    cfg = job_config("--training.dataset", "tinyshakespeare")
    batches = take(build_dataloader(1, 0, tokenizer, cfg), 3)
    for x, y in batches:
        assert x.shape == y.shape == (BATCH, SEQ_LEN) and x.dtype == y.dtype == torch.long
        # labels are the inputs shifted by one token
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert 0 <= int(x.min()) and int(x.max()) < 2048
    first = tokenizer.decode(batches[0][0][0].tolist())
    assert first.startswith("First Citizen:\nBefore we proceed any further")
    assert int(batches[0][0][0, 0]) == tokenizer.bos_id


def test_tinyshakespeare_split_is_90_10():
    with open(sources.TINYSHAKESPEARE_PATH) as f:
        text = f.read()
    train, val = sources.split_tinyshakespeare(text)
    assert train + val == text and 0.9 <= len(train) / len(text) < 0.901
    assert val.startswith("\n\n")


def test_build_dataloader_dp_ranks_differ(tokenizer):
    cfg = job_config("--training.dataset", "tinyshakespeare")
    rank0, rank1 = (take(build_dataloader(2, r, tokenizer, cfg), 2) for r in (0, 1))
    for (x0, _), (x1, _) in zip(rank0, rank1):
        assert not torch.equal(x0, x1)


@pytest.mark.parametrize("dataset", ["tinyshakespeare", "text", "jsonl", "tokens"])
@pytest.mark.parametrize("dp_rank", [0, 1], ids=["rank0", "rank1"])
def test_build_dataloader_resumes_exactly(tokenizer, data_files, dataset, dp_rank):
    path = {"text": "a.txt", "jsonl": "a.jsonl", "tokens": "a.bin"}.get(dataset)
    args = ["--training.dataset", dataset]
    if path:
        args += ["--training.dataset_path", str(data_files / path)]
    cfg = job_config(*args)
    # 25 + 10 batches run past the end of the small files, so the loop restarts too
    n, m = (25, 10) if path else (5, 5)

    loader = build_dataloader(2, dp_rank, tokenizer, cfg)
    it = iter(loader)
    take_n = [next(it) for _ in range(n)]
    state = loader.state_dict()
    uninterrupted = [(x["input"], y) for x, y in (next(it) for _ in range(m))]

    resumed = build_dataloader(2, dp_rank, tokenizer, cfg)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, m), uninterrupted)
    assert len(take_n) == n


def tokens_config(dataset: str, path, section: str = "training", *args: str):
    return job_config(f"--{section}.dataset", dataset, f"--{section}.dataset_path", str(path), *args)


@pytest.mark.parametrize("dataset, path", [("text", "a.txt"), ("text", "dir"), ("jsonl", "a.jsonl")])
def test_text_and_jsonl_read_every_paragraph(tokenizer, data_files, dataset, path):
    paragraphs = [tokenizer.encode(p, add_bos=True, add_eos=True) for p in TEXT.split("\n\n")]
    loader = build_dataloader(1, 0, tokenizer, tokens_config(dataset, data_files / path), infinite=False)
    windows = [torch.cat([x[:, :1], y], dim=1) for x, y in take(loader, 1000)]
    tokens = torch.cat(windows).flatten().tolist()
    stream = [t for p in paragraphs for t in p]
    # all full windows of the paragraph stream, in file order (a partial last batch included)
    assert tokens == stream[: len(stream) // (SEQ_LEN + 1) * (SEQ_LEN + 1)]


@pytest.mark.parametrize("path", ["a.bin", "a.npy"])
def test_tokens_windows_split_across_ranks(tokenizer, data_files, path):
    ids = np.arange(2040)
    cfg = tokens_config("tokens", data_files / path)
    seen = []
    for rank in (0, 1):
        loader = build_dataloader(2, rank, tokenizer, cfg, infinite=False)
        for x, y in take(loader, 1000):
            for xi, yi in zip(x, y):
                start = int(xi[0])
                assert xi.tolist() == ids[start : start + SEQ_LEN].tolist()
                assert yi.tolist() == ids[start + 1 : start + SEQ_LEN + 1].tolist()
                seen.append(start)
    # windows start every SEQ_LEN tokens, and no two ranks share one
    n_windows = (len(ids) - 1) // SEQ_LEN
    assert len(seen) == len(set(seen)) == n_windows // 2 * 2
    assert all(s % SEQ_LEN == 0 for s in seen)


def test_tokens_dtype_follows_vocab(tmp_path):
    assert token_dtype(2048) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    ids = np.arange(1000, dtype=np.uint32) + 70000
    ids.tofile(tmp_path / "big.bin")
    ds = TokenFileDataset(str(tmp_path / "big.bin"), vocab_size=100_000, seq_len=8)
    x, y = next(iter(ds))
    assert x["input"].tolist() == list(range(70000, 70008)) and int(y[-1]) == 70008
    with pytest.raises(ValueError, match="ids outside"):
        TokenFileDataset(str(tmp_path / "big.bin"), vocab_size=2048, seq_len=8)


def test_tokens_workers_share_no_window(tokenizer, data_files):
    cfg = tokens_config("tokens", data_files / "a.bin", "training", "--training.dataloader.num_workers", "2")
    loader = build_dataloader(1, 0, tokenizer, cfg, infinite=False)
    starts = [int(s) for x, _ in take(loader, 1000) for s in x[:, 0]]
    assert len(starts) == len(set(starts)) == (2040 - 1) // SEQ_LEN


def test_hf_local_copy_streams_resumes_and_validates(tokenizer, tmp_path):
    """`hf` / `hf_val` on a local copy: streamed offline, resumed exactly, validated from the start."""
    for split in ("train", "validation"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(300):
                f.write(json.dumps({"text": f"{split} record {i}: the quick brown fox."}) + "\n")
    cfg = job_config(
        "--training.dataset", "hf", "--training.dataset_path", str(tmp_path),
        "--validation.dataset", "hf_val", "--validation.dataset_path", str(tmp_path),
    )
    # This rank's 150 records fill ~17 batches: resume in the second pass, again
    # in the third, and compare with a run that never stopped.
    uninterrupted = take(build_dataloader(2, 1, tokenizer, cfg), 30 + 10 + 15)
    loader = build_dataloader(2, 1, tokenizer, cfg)
    it = iter(loader)
    for _ in range(30):
        next(it)
    state = loader.state_dict()
    resumed = build_dataloader(2, 1, tokenizer, cfg)
    resumed.load_state_dict(state)
    it = iter(resumed)
    first_resume = [(x["input"], y) for x, y in (next(it) for _ in range(10))]
    state = resumed.state_dict()
    resumed_again = build_dataloader(2, 1, tokenizer, cfg)
    resumed_again.load_state_dict(state)
    assert_same_batches(first_resume + take(resumed_again, 15), uninterrupted[30:])

    validation = build_validation_dataloader(2, 0, tokenizer, cfg, infinite=True)
    first = take(validation, 3)
    assert tokenizer.decode(first[0][0][0].tolist()).startswith("validation record 0:")
    assert_same_batches(take(validation, 3), first)


def test_build_validation_dataloader_same_batches_each_pass(tokenizer, data_files):
    shakespeare = job_config("--validation.dataset", "tinyshakespeare_val")
    for cfg in [shakespeare, tokens_config("tokens", data_files / "a.npy", "validation")]:
        loader = build_validation_dataloader(1, 0, tokenizer, cfg, infinite=True)
        first = take(loader, 3)
        assert_same_batches(take(loader, 3), first)
    # A finite validation set reads the same batches at each pass, not nothing the second time
    loader = build_validation_dataloader(1, 0, tokenizer, shakespeare)
    first = take(loader, 10_000)
    assert len(first) > 50
    assert_same_batches(take(loader, 10_000), first)
    x, _ = first[0]
    text = tokenizer.decode(x[0].tolist())
    with open(sources.TINYSHAKESPEARE_PATH) as f:
        assert text[:40] in sources.split_tinyshakespeare(f.read())[1]


def test_validator_reads_tokens(tokenizer, data_files):
    cfg = tokens_config("tokens", data_files / "a.bin", "validation", "--validation.steps", "2")
    validator = Validator(cfg, 1, 0, tokenizer, None, None, None, None, metrics_processor=object())
    x, y = next(iter(validator.validation_dataloader))
    assert x["input"].shape == (BATCH, SEQ_LEN) and validator.should_validate(1)


def test_torchtitan_text_loader_reads_registered_datasets(tokenizer):
    cfg = job_config("--validation.dataset", "tinyshakespeare_val")
    loader = build_text_validation_dataloader(1, 0, tokenizer, cfg)
    x, y = next(iter(loader))
    assert x["input"].shape == (BATCH, SEQ_LEN)


@pytest.mark.parametrize(
    "dataset, path, message",
    [
        pytest.param("shakespeare", None, "training.dataset = 'shakespeare' is not allowed: unknown dataset; allowed: ", id="unknown"),
        pytest.param("text", None, "training.dataset_path is not set: dataset 'text' reads a .txt", id="unset"),
        pytest.param("text", "/no/such.txt", "training.dataset_path = '/no/such.txt' is not allowed: no such file", id="missing"),
        pytest.param("text", "DATA/empty", "directory has no such files", id="empty-dir"),
        pytest.param("jsonl", "DATA/a.txt", "wrong file extension", id="jsonl-ext"),
        pytest.param("tokens", "DATA/a.txt", "wrong file extension", id="tokens-ext"),
        pytest.param("tokens", "/no/a.bin", "training.dataset_path = '/no/a.bin' is not allowed: no such file", id="tokens-missing"),
        pytest.param("tokens", "DATA/odd.bin", "not a multiple of 2 B", id="tokens-odd-size"),
        pytest.param("tokens", "DATA/short.npy", "fewer than one window", id="tokens-short"),
        pytest.param("hf", "no/such/path", "no such local path, nor a hub id", id="not-a-hub-id"),
        pytest.param("c4_test", None, "training.dataset = 'c4_test' is not allowed: reads tests/assets/c4_test", id="c4_test"),
    ],
)
def test_build_dataloader_errors(tokenizer, data_files, dataset, path, message):
    (data_files / "empty").mkdir()
    (data_files / "odd.bin").write_bytes(b"abc")
    np.save(data_files / "short.npy", np.arange(SEQ_LEN, dtype=np.int64))
    args = ["--training.dataset", dataset]
    if path:
        args += ["--training.dataset_path", path.replace("DATA", str(data_files))]
    with pytest.raises(ValueError) as e:
        build_dataloader(1, 0, tokenizer, job_config(*args))
    assert message.replace("DATA", str(data_files)) in str(e.value)
    assert "\n" not in str(e.value)


def test_build_validation_dataloader_error_names_validation_key(tokenizer):
    cfg = job_config("--validation.dataset", "jsonl", "--validation.dataset_path", "/no/v.jsonl")
    with pytest.raises(ValueError, match=r"^validation.dataset_path = '/no/v.jsonl' is not allowed: no such file"):
        build_validation_dataloader(1, 0, tokenizer, cfg)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--training.dataset", "c4"], "training.dataset = 'c4' is not allowed: dataset 'c4' streams", id="c4"),
        pytest.param(["--training.dataset", "tinystories"], "training.dataset = 'tinystories'", id="tinystories"),
        pytest.param(
            ["--training.dataset", "hf", "--training.dataset_path", "org/corpus"],
            "training.dataset_path = 'org/corpus'",
            id="hf",
        ),
    ],
)
def test_unreachable_hub_fails_fast_with_offline_choices(tokenizer, monkeypatch, args, message):
    # Whatever this machine's network, act as if the hub did not answer.
    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(sources, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        build_dataloader(1, 0, tokenizer, job_config(*args))
    assert time.monotonic() - start < 5
    assert message in str(e.value) and "unreachable" in str(e.value)
    assert "'tinyshakespeare'" in str(e.value) and "\n" not in str(e.value)
