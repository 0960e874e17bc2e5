"""titan_linear.analysis.runs: the numbers read from TensorBoard events written with TorchTitan's
tags, the configuration from run.json, evaluation results, the table and the CLI's one-line errors.

Real runs are read in tests/integration: test_bench_e2e_cpu.py (every train loss against the
console log) and test_compare_oelm_cpu.py (every validation loss against the console log)."""

import csv
import json
import os

import pytest

from titan_linear.analysis import runs
from tests.analysis.fake_runs import make_run, sweep_run, write_events
from tests.helpers import debug_args

approx = lambda x: pytest.approx(x, rel=1e-6)  # noqa: E731 (event values are float32)

PPL = {"tool": "titan_linear.eval.perplexity", "results": [
    {"seq_len": 256, "loss": 2.5, "perplexity": 12.18, "seconds": 1.0, "buckets": [{"loss": 1.0}]},
    {"seq_len": 2048, "loss": 3.25, "perplexity": 25.79, "seconds": 9.0, "buckets": []}]}
PASSKEY = {"tool": "titan_linear.eval.passkey", "results": [
    {"length": 1024, "depth": 0.5, "exact_match": 0.4, "key_logprob_per_digit": -1.5, "trials": 5, "samples": []}]}
LM_EVAL = {"results": {"hellaswag": {"acc,none": 0.31, "acc_stderr,none": 0.01, "alias": "hellaswag"}}}


def test_read_run_numbers_from_events(tmp_path):
    train = {s: 5.0 - 0.1 * s for s in range(1, 21)}
    val = {5: 4.8, 10: 4.2, 15: 4.2, 20: 4.5}  # best 4.2, first reached at step 10
    tps = {s: (50.0 if s <= 10 else 1000.0 + s) for s in train}  # the first 10 steps are warm-up
    memory = {s: 1.0 + 0.01 * s for s in train}
    make_run(tmp_path / "run_a", train, val, tps=tps, memory=memory, tokens_per_step=4 * 64,
             checkpoints=(10, 20), cut_checkpoints=(25,),
             evals={"perplexity": PPL, "passkey": PASSKEY, "harness": LM_EVAL})
    r = runs.read_run(tmp_path / "run_a")
    assert (r["name"], r["group"], r["seed"], r["n_params"], r["family"]) == ("run_a", "run_a", None, None, None)
    assert r["best_val_loss"] == approx(4.2) and r["best_val_step"] == 10
    assert r["final_val_loss"] == approx(4.5) and r["final_train_loss"] == approx(3.0)
    assert (r["loss"], r["loss_source"]) == (approx(4.2), "best validation")
    assert r["tps_warmup_steps"] == 10  # min(10, 20 // 2)
    assert r["tokens_per_s"] == approx(sum(1000.0 + s for s in range(11, 21)) / 10)
    assert r["mfu"] == approx(sum(1000.0 + s for s in range(11, 21)) / 1000)
    assert r["peak_memory_gib"] == approx(1.2)
    assert (r["steps"], r["tokens_per_step"], r["tokens"]) == (20, 256, 20 * 256)
    assert r["last_checkpoint"].endswith(os.path.join("checkpoint", "step-20"))  # step-25 has no .metadata
    assert r["curves"]["train"][0] == [1, approx(4.9)] and [s for s, _ in r["curves"]["val"]] == [5, 10, 15, 20]
    assert r["eval"] == {
        "eval.perplexity.loss@256": 2.5, "eval.perplexity.perplexity@256": 12.18,
        "eval.perplexity.loss@2048": 3.25, "eval.perplexity.perplexity@2048": 25.79,
        "eval.passkey.exact_match@1024,0.5": 0.4, "eval.passkey.key_logprob_per_digit@1024,0.5": -1.5,
        # and per length, the mean over its depths (one depth here)
        "eval.passkey.exact_match@1024": 0.4, "eval.passkey.key_logprob_per_digit@1024": -1.5,
        "eval.harness.hellaswag.acc": 0.31, "eval.harness.hellaswag.acc_stderr": 0.01,
    }
    # an explicit warm-up, and a run without validation: the loss is the final train loss
    make_run(tmp_path / "run_b", train, None, tps=tps)
    b = runs.read_run(tmp_path / "run_b", warmup=15)
    assert b["tps_warmup_steps"] == 15 and b["tokens_per_s"] == approx(sum(1000.0 + s for s in range(16, 21)) / 5)
    assert (b["loss"], b["loss_source"], b["best_val_step"]) == (approx(3.0), "final train", None)


def test_resumed_run_replaces_steps_from_its_first_step(tmp_path):
    tb = tmp_path / "run" / "tb"
    write_events(tb / "20260101-0000", {s: 10.0 + s for s in range(1, 11)}, {10: 9.0})
    write_events(tb / "20260101-0100", {s: 1.0 + s for s in range(6, 13)}, {12: 0.5})  # resumed from step 5
    r = runs.read_run(tmp_path / "run")
    assert r["curves"]["train"] == [[s, approx(10.0 + s if s < 6 else 1.0 + s)] for s in range(1, 13)]
    assert r["curves"]["val"] == [[12, approx(0.5)]]  # step 10's validation was of the abandoned steps


def test_save_for_all_ranks_reads_rank_0(tmp_path):
    tb = tmp_path / "run" / "tb" / "20260101-0000"
    write_events(tb / "rank_1", {1: 7.0, 2: 6.0})
    write_events(tb / "rank_0", {1: 5.0, 2: 4.0})
    assert runs.read_run(tmp_path / "run")["final_train_loss"] == approx(4.0)


def test_config_from_run_json(tmp_path):
    import torch
    from titan_linear.models.hybrid import HybridTransformer

    folder = sweep_run(tmp_path, ratio=0.5, seed=3, best=4.0)
    r = runs.read_run(folder)
    args = debug_args(linear_attn_ratio=0.5, max_seq_len=256)
    with torch.device("meta"):
        model = HybridTransformer(args)
    expected = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    assert (r["name"], r["group"], r["seed"]) == ("r0.5_uniform_s3", "r0.5_uniform", 3)
    assert r["n_params"] == expected and r["n_params_total"] == sum(p.numel() for p in model.parameters())
    assert r["layer_map"] == "SLSLSL" and r["family"] == "llama3_mixed ratio=0.5 uniform"
    assert r["flops_per_token"] == args.get_nparams_and_flops(model, 256)[1]
    assert r["flops"] == r["tokens"] * r["flops_per_token"] and r["tokens"] == 20 * 512
    assert r["config"]["model.linear_attn_ratio"] == 0.5 and r["config"]["debug.seed"] == 3
    assert (r["seq_len"], r["steps_planned"]) == (256, 100)


def test_cli_table_csv_and_json(tmp_path):
    sweep_run(tmp_path / "sweep", ratio=0.0, seed=1, best=4.0)
    make_run(tmp_path / "sweep" / "deeper" / "plain", {1: 5.0, 2: 4.0}, evals={"perplexity": PPL})
    assert runs.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "t.csv")]) == 0
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0])
    assert cols[:len(runs.FIXED_COLUMNS)] == list(runs.FIXED_COLUMNS)
    assert cols[len(runs.FIXED_COLUMNS):] == sorted(cols[len(runs.FIXED_COLUMNS):])
    assert {"n_params", "tokens", "loss", "flops", "family", "model.linear_attn_ratio",
            "eval.perplexity.loss@2048"} <= set(cols)
    assert [r["name"] for r in rows] == ["plain", "r0_uniform_s1"]  # found below the parent, sorted
    assert rows[1]["family"] == "llama3_mixed ratio=0" and rows[0]["n_params"] == ""
    assert runs.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "t.json")]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert [len(t["curves"]["train"]) for t in table] == [2, 20]


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/missing", "--out", "{tmp}/t.csv"], "RUN_DIR = '{tmp}/missing' is not allowed: no such directory"),
    (["{tmp}/empty", "--out", "{tmp}/t.csv"], "RUN_DIR = '{tmp}/empty' is not allowed: no run folder in it"),
    (["{tmp}/run", "--out", "{tmp}/t.txt"], "--out = '{tmp}/t.txt' is not allowed: a .json or .csv file"),
    (["{tmp}/run", "--out", "{tmp}/t.csv", "--warmup", "-1"], "--warmup = -1 is not allowed: an integer >= 0"),
    (["{tmp}/run", "--out", "{tmp}/t.csv", "--config", "{tmp}/no.toml"], "--config = '{tmp}/no.toml' is not allowed"),
    (["{tmp}/run", "--out", "{tmp}/t.csv", "--", "--training.steps", "3"], "overrides need --config"),
], ids=["missing", "no-runs", "out", "warmup", "config", "overrides"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "run", {1: 5.0})
    assert runs.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{runs.PROG}: error: ") and message.format(tmp=tmp_path) in err[0]
    assert not any(p.name.startswith("t.") for p in tmp_path.iterdir())
