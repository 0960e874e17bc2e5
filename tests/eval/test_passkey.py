"""`python -m titan_linear.eval.passkey` on the random-init debug model (CPU, 64-token training length)."""

import json

import pytest
import torch

from titan_linear.eval import passkey

from tests.helpers import DEBUG_TOML

TRAIN_LEN = ["--training.seq_len", "64"]


@pytest.fixture(scope="module")
def loaded():
    from titan_linear.cli import load_model

    args = passkey._parser().parse_args(["--config", DEBUG_TOML, "--random-init", "--device", "cpu",
                                         "--lengths", "64", "--out", "x"])
    return load_model(args, TRAIN_LEN, max_len=256)


def _filler_max_tokens(tokenizer):
    return max(len(tokenizer.encode(" " + s, add_bos=False, add_eos=False)) for s in passkey.FILLER)


@pytest.mark.parametrize("length", [64, 128, 300])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_the_length_and_the_key_at_the_depth(loaded, length, depth):
    tok = loaded.tokenizer
    key = "73915"
    p = passkey.build_prompt(tok, length, depth, key)
    # Tolerance: at most one filler sentence (with its space) short, never longer.
    assert length - _filler_max_tokens(tok) <= len(p["ids"]) <= length
    assert p["ids"][0] == tok.bos_id
    text_after = tok.decode(p["ids"][p["key_position"]:])
    assert text_after.lstrip().startswith(passkey.key_line(key)), text_after[:80]
    assert tok.decode(p["ids"]).endswith(passkey.QUESTION)
    if depth in (0.0, 1.0) or p["n_filler"] == 0:
        assert p["depth_actual"] == depth or p["n_filler"] == 0
    else:
        # Whole sentences only: off by at most one sentence of the filler.
        assert abs(p["depth_actual"] - depth) <= 1.0 / p["n_filler"] + 1e-9
    if length == 300:
        assert p["n_filler"] >= 20


def test_key_logprob_equals_direct_computation(loaded):
    model, tok = loaded.model, loaded.tokenizer
    p = passkey.build_prompt(tok, 64, 0.5, "48213")
    answer = passkey.answer_ids(tok, "48213")
    assert tok.decode(answer).strip() == "48213"
    got = passkey.key_logprob(model, p["ids"], answer)
    direct = []
    with torch.no_grad():
        for i, t in enumerate(answer):  # a separate forward per answer token, last position only
            logits = model(torch.tensor([p["ids"] + answer[:i]]))[0, -1].double()
            direct.append((logits[t] - torch.logsumexp(logits, 0)).item())
    assert got == pytest.approx(direct, abs=1e-4)


def test_command_writes_json(tmp_path):
    out = tmp_path / "pk.json"
    rc = passkey.main(["--config", DEBUG_TOML, "--random-init", "--device", "cpu", "--lengths", "64", "96",
                       "--depths", "0", "1", "--trials", "1", "--digits", "4", "--out", str(out), "--", *TRAIN_LEN])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["tool"] == "titan_linear.eval.passkey" and r["model"]["layer_map"] == "SLSLSL"
    s = r["settings"]
    assert (s["lengths"], s["depths"], s["trials"], s["digits"]) == ([64, 96], [0.0, 1.0], 1, 4)
    assert [(x["length"], x["depth"]) for x in r["results"]] == [(64, 0.0), (64, 1.0), (96, 0.0), (96, 1.0)]
    for x in r["results"]:
        for k in ("exact_match", "key_logprob_sum", "key_logprob_per_digit", "key_logprob_per_token",
                  "prompt_tokens_mean", "depth_actual_mean", "samples"):
            assert k in x, k
        sample = x["samples"][0]
        assert len(sample["key"]) == 4 and sample["prompt_tokens"] <= x["length"]
        assert x["key_logprob_sum"] < 0 and x["key_logprob_per_digit"] == pytest.approx(x["key_logprob_sum"] / 4)
        assert x["exact_match"] in (0.0, 1.0) and isinstance(sample["generated"], str)


@pytest.mark.parametrize("flags, expected", [
    (["--depths", "1.5"], "--depths = 1.5 is not allowed: a number in [0, 1]"),
    (["--trials", "0"], "--trials = 0 is not allowed"),
    (["--digits", "0"], "--digits = 0 is not allowed"),
    (["--lengths", "10"], "--lengths = 10 is not allowed: the prompt without filler takes"),
    (["--plot", "x.jpg"], "--plot = 'x.jpg' is not allowed: a .png file"),
    (["--config", "no_such.toml"], "--config = 'no_such.toml' is not allowed: no such file"),
], ids=["depth", "trials", "digits", "short", "plot", "config"])
def test_bad_flags_one_line_exit_2(tmp_path, capsys, flags, expected):
    out = tmp_path / "pk.json"
    rc = passkey.main(["--config", DEBUG_TOML, "--random-init", "--device", "cpu", "--lengths", "64",
                       "--out", str(out), *flags, "--", *TRAIN_LEN])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("titan_linear.eval.passkey: error: ") and expected in err[0], err
    assert not out.exists()
