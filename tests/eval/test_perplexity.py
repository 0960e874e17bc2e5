"""`python -m titan_linear.eval.perplexity` on the random-init debug model (CPU, 64-token training length)."""

import contextlib
import json
import math
from types import SimpleNamespace

import pytest

from titan_linear.eval import perplexity

from tests.helpers import DEBUG_TOML

TRAIN_LEN = ["--training.seq_len", "64"]


def _run(tmp_path, *flags, overrides=TRAIN_LEN):
    out = tmp_path / "ppl.json"
    rc = perplexity.main(["--config", DEBUG_TOML, "--random-init", "--device", "cpu", "--dataset", "tinyshakespeare_val",
                          "--out", str(out), *flags, "--", *overrides])
    return rc, out


@pytest.fixture(scope="module")
def lengths_result(tmp_path_factory):
    """One run at the training length and at 4x it."""
    tmp = tmp_path_factory.mktemp("ppl")
    rc, out = _run(tmp, "--seq-lens", "64", "256", "--batch-size", "2", "--max-tokens", "512", "--buckets", "4")
    assert rc == 0
    return json.loads(out.read_text())


def test_agrees_with_torchtitan_validation_loss(tmp_path, monkeypatch):
    """The project's Validator (torchtitan's validate() with its cross_entropy_loss) on the same
    windows and batches scores the same loss."""
    from torchtitan.components import validate
    from torchtitan.components.loss import cross_entropy_loss

    from titan_linear.cli import load_model
    from titan_linear.data import Validator

    overrides = TRAIN_LEN + ["--validation.dataset", "tinyshakespeare_val", "--validation.seq_len", "64",
                             "--validation.local_batch_size", "2", "--validation.steps", "3"]
    rc, out = _run(tmp_path, "--seq-lens", "64", "--batch-size", "2", "--max-batches", "3", overrides=overrides)
    assert rc == 0
    ours = json.loads(out.read_text())["results"][0]
    assert ours["n_tokens"] == 3 * 2 * 64

    args = perplexity._parser().parse_args(["--config", DEBUG_TOML, "--random-init", "--device", "cpu",
                                            "--dataset", "tinyshakespeare_val", "--seq-lens", "64", "--out", "x"])
    loaded = load_model(args, overrides)
    logged = {}
    metrics = SimpleNamespace(ntokens_since_last_log=0, log_validation=lambda loss, step: logged.update(loss=loss))
    dims = SimpleNamespace(dp_enabled=False, cp_enabled=False, pp_enabled=False, dp_cp_enabled=False)
    monkeypatch.setattr(validate.utils, "device_type", "cpu")
    validator = Validator(loaded.job_config, 1, 0, loaded.tokenizer, dims, cross_entropy_loss,
                          contextlib.nullcontext, contextlib.nullcontext(), metrics)
    validator.validate([loaded.model], step=1)
    assert metrics.ntokens_since_last_log == ours["n_tokens"]
    assert ours["loss"] == pytest.approx(logged["loss"], abs=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(logged["loss"]), rel=1e-4)


def test_beyond_training_length_is_finite(lengths_result):
    long = lengths_result["results"][1]
    assert long["seq_len"] == 256 and long["beyond_training_length"] is True
    assert long["n_tokens"] == 2 * 256  # ceil(512 / 256) windows
    assert math.isfinite(long["loss"]) and all(math.isfinite(b["loss"]) for b in long["buckets"])


def test_bucket_token_weighted_mean_is_overall_loss(lengths_result):
    for r in lengths_result["results"]:
        b = r["buckets"]
        assert [x["start"] for x in b] == [i * r["seq_len"] // 4 for i in range(4)] and b[-1]["end"] == r["seq_len"]
        assert sum(x["n_tokens"] for x in b) == r["n_tokens"]
        mean = sum(x["loss"] * x["n_tokens"] for x in b) / r["n_tokens"]
        assert mean == pytest.approx(r["loss"], rel=1e-9)


def test_json_fields(lengths_result):
    r = lengths_result
    assert r["tool"] == "titan_linear.eval.perplexity"
    assert r["model"]["layer_map"] == "SLSLSL" and r["model"]["training_seq_len"] == 64
    assert r["dataset"] == {"name": "tinyshakespeare_val", "path": None}
    s = r["settings"]
    assert s["seq_lens"] == [64, 256] and s["batch_size"] == 2 and s["max_tokens"] == 512
    assert s["buckets"] == {"kind": "equal", "count": 4}
    for x in r["results"]:
        for key in ("seq_len", "n_windows", "n_tokens", "loss", "perplexity", "buckets", "tokens_per_s",
                    "seconds", "peak_memory_bytes", "peak_rss_bytes", "beyond_training_length"):
            assert key in x, key
        assert x["peak_memory_bytes"] is None and x["peak_rss_bytes"] > 0 and x["tokens_per_s"] > 0


def test_fixed_size_buckets():
    assert perplexity.bucket_edges(100, bucket_size=32) == [0, 32, 64, 96, 100]
    assert perplexity.bucket_edges(10, buckets=3) == [0, 3, 7, 10]


@pytest.mark.parametrize("flags, expected", [
    (["--dataset", "shakespear"], "--dataset = 'shakespear' is not allowed: unknown dataset"),
    (["--seq-lens", "1"], "--seq-lens = 1 is not allowed: an integer >= 2"),
    (["--batch-size", "0"], "--batch-size = 0 is not allowed"),
    (["--buckets", "100"], "--buckets = 100 is not allowed: at most the shortest --seq-lens (64)"),
    (["--dataset", "text", "--dataset-path", "/no/such.txt"], "--dataset-path = '/no/such.txt' is not allowed: no such file"),
    (["--dataset", "text"], "--dataset-path is not set"),
    (["--config", "no_such.toml"], "--config = 'no_such.toml' is not allowed: no such file"),
    (["--max-tokens", "10", "--max-batches", "1"], "not allowed with argument"),
], ids=["dataset", "seq_len", "batch", "buckets", "path", "no-path", "config", "both-stops"])
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, capsys, flags, expected):
    out = tmp_path / "ppl.json"
    argv = ["--config", DEBUG_TOML, "--random-init", "--device", "cpu", "--dataset", "tinyshakespeare_val",
            "--seq-lens", "64", "--out", str(out), *flags, "--", *TRAIN_LEN]
    rc = perplexity.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("titan_linear.eval.perplexity: error: ") and expected in err[0], err
    assert list(tmp_path.iterdir()) == []
