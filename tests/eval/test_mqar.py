"""MQAR: the data follow the recipe, a tiny softmax model learns it, the CLI writes its result
and refuses bad flags with one line (titan_linear/eval/mqar.py, mqar_data.py)."""

import json

import pytest
import torch

from titan_linear.eval import mqar
from titan_linear.eval.mqar_data import IGNORE, make_mqar, MQARSpec


@pytest.mark.parametrize("random_filler", [True, False], ids=["random-filler", "zero-filler"])
@pytest.mark.parametrize("T,N,V", [(32, 4, 64), (64, 16, 40), (256, 64, 8192)], ids=lambda v: str(v))
def test_make_mqar_follows_the_recipe(T, N, V, random_filler):
    spec = MQARSpec(T, N, V, random_filler=random_filler)
    x, y = make_mqar(spec, 300, seed=0)
    assert x.shape == y.shape == (300, T)
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    assert (keys.sort(dim=1).values.diff(dim=1) > 0).all(), "keys repeat within an example"
    assert (values.sort(dim=1).values.diff(dim=1) > 0).all(), "values repeat within an example"
    labelled = y != IGNORE
    assert (labelled.sum(dim=1) == N).all() and not labelled[:, :2 * N].any()
    for row in range(0, 300, 7):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        pos = labelled[row].nonzero().flatten().tolist()
        # every key is queried once, and its label is its own pair's value
        assert sorted(x[row, pos].tolist()) == sorted(pairs)
        assert all(y[row, p].item() == pairs[x[row, p].item()] for p in pos)
    if not random_filler:
        rest = torch.ones_like(labelled)
        rest[:, :2 * N] = False
        assert (x[rest & ~labelled] == 0).all()


def test_make_mqar_is_deterministic_and_splits_differ():
    spec = MQARSpec(64, 8, 256)
    a, b = make_mqar(spec, 50, seed=3), make_mqar(spec, 50, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], make_mqar(spec, 50, seed=4)[0])
    test = make_mqar(spec, 50, seed=3, split="test")
    assert not torch.equal(a[0], test[0])
    assert not (a[0][:, None, :] == test[0][None, :, :]).all(-1).any(), "a test example is a train example"


def test_make_mqar_refuses_pairs_that_do_not_fit():
    with pytest.raises(ValueError, match="kv_pairs = 9 .*seq_len 32"):
        make_mqar(MQARSpec(32, 9, 64), 1, 0)
    with pytest.raises(ValueError, match="kv_pairs = 40 .*vocab 64"):
        make_mqar(MQARSpec(256, 40, 64), 1, 0)


@pytest.fixture
def one_thread():
    # Two intra-op threads on a shared 2-core machine spin against other processes: 5 s
    # becomes minutes. One thread keeps the test fast wherever it runs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mqar_softmax_model_learns_tiny_recall(one_thread):
    """The benchmark can be learned: 2 softmax layers, T 32, 4 pairs, vocab 64 (chance 1/32;
    pointing at a value of the context without binding it to its key gives about 1/4)."""
    args = mqar._parser().parse_args(
        "--out unused.json --ratios 0 --kv-pairs 4 --seq-len 32 --vocab 64 --n-layers 2 --dim 64 "
        "--heads 2 --lrs 3e-3 --train-examples 8000 --test-examples 256 --batch-size 64 --epochs 6 "
        "--device cpu --seed 0".split()
    )
    maps, device, dtype = mqar.check_args(args)
    (result,) = mqar.run_grid(maps, args, device, dtype, log=lambda s: None)
    curve = result["runs"][0]["curve"]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    assert result["accuracy"] >= 0.6, curve


TINY = ("--kv-pairs 2 4 --seq-len 16 --vocab 32 --n-layers 2 --dim 32 --heads 2 --lrs 1e-3 3e-3 "
        "--train-examples 64 --test-examples 32 --epochs 2 --batch-size 32 --device cpu").split()


def test_mqar_cli_writes_the_grid(tmp_path, capsys):
    out = tmp_path / "r" / "mqar.json"
    assert mqar.main(["--out", str(out), "--ratios", "0", "1", "--layer-maps", "SL", "SS", *TINY]) == 0
    result = json.loads(out.read_text())
    s = result["settings"]
    assert s["layer_maps"] == ["SS", "LL", "SL"]  # "SS" given twice (ratio 0 and explicit): once
    assert s["kv_pairs"] == [2, 4] and s["lrs"] == [1e-3, 3e-3] and s["seq_len"] == 16
    rows = result["results"]
    assert sorted((r["layer_map"], r["kv_pairs"]) for r in rows) == sorted(
        (m, kv) for m in ("SS", "LL", "SL") for kv in (2, 4))
    for r in rows:
        assert set(r) >= {"label", "layer_map", "kv_pairs", "accuracy", "best_lr", "steps",
                          "per_lr_final_accuracy", "runs"}
        assert set(r["per_lr_final_accuracy"]) == {"0.001", "0.003"}
        # Trained on the mix (the default): the lr with the best mean over kv counts, each count's
        # accuracy at that run's best epoch.
        best = max(r["runs"], key=lambda run: run["accuracy"])
        assert r["accuracy"] == best["accuracy_by_kv"][str(r["kv_pairs"])] and 0 <= r["accuracy"] <= 1
        assert len(r["runs"]) == 2 and all(set(run["accuracy_by_kv"]) == {"2", "4"} for run in r["runs"])
        assert r["best_lr"] in (1e-3, 3e-3) and r["steps"] == 4  # 2 epochs of 64 / 32, no early stop
        assert [c["epoch"] for c in r["runs"][0]["curve"]] == [1, 2]
    assert len(capsys.readouterr().err.strip().splitlines()) == len(rows)  # one progress line each


def test_mqar_plot_needs_matplotlib_or_writes_png(tmp_path, capsys):
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["--out", str(out), "--plot", str(png), "--ratios", "0", *TINY[:2], *TINY[3:]]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert mqar.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--plot" in err[0] and "matplotlib" in err[0]
        assert not out.exists() and not png.exists()
    else:
        assert mqar.main(argv) == 0
        assert out.exists() and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flags,named", [
    (["--ratios", "1.5"], "--ratios = 1.5"),
    (["--layer-maps", "SX"], "--layer-maps = 'SX'"),
    (["--layer-maps", "SLS"], "--layer-maps = 'SLS'"),
    (["--kv-pairs", "5"], "--kv-pairs = 5"),  # 4 * 5 > --seq-len 16
    (["--kv-pairs", "4", "--seq-len", "64", "--vocab", "8"], "--kv-pairs = 4"),  # keys from [1, 4)
    (["--heads", "3"], "--heads = 3"),
    (["--lrs", "0"], "--lrs = 0.0"),
    (["--early-stop", "1.5"], "--early-stop = 1.5"),
    (["--epochs", "0"], "--epochs = 0"),
    (["--dtype", "bf16"], "--dtype = 'bf16'"),
    (["--device", "tpu"], "--device = 'tpu'"),
    (["--kv-pairs", "two"], "--kv-pairs"),
    (["--linear-options", "conv=4"], "--linear-options = 'conv=4'"),
    (["--linear-options", "short_conv=1"], "--linear-options = 'short_conv=1'"),
    (["--linear-options", "output_gate=yes"], "--linear-options = 'output_gate=yes'"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_mqar_bad_flag_is_one_line_exit_2(tmp_path, capsys, flags, named):
    out = tmp_path / "bad.json"
    assert mqar.main(["--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mqar_linear_options_reach_the_linear_layers(tmp_path):
    """`--linear-options` builds every linear layer with them (and only the linear layers), and
    the options name the plot's lines and the settings."""
    from types import SimpleNamespace

    args = SimpleNamespace(dim=32, n_layers=2, heads=2, vocab=32, seq_len=16, ffn_hidden=0, seed=0,
                           linear_option_values=mqar.linear_options(["short_conv=4", "output_gate=true"]))
    model, _ = mqar.build_model("SL", args, "cpu")
    assert model.layers["1"].attention.short_conv.kernel == 4 and model.layers["1"].attention.wg is not None
    assert not hasattr(model.layers["0"].attention, "short_conv")
    out = tmp_path / "m.json"
    argv = ["--out", str(out), "--layer-maps", "LL", *TINY, "--lrs", "3e-3"]
    assert mqar.main([*argv, "--linear-options", "short_conv=4", "output_gate=true"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["linear_option_values"] == {"linear_attn_short_conv": 4, "linear_attn_output_gate": True}
    assert result["results"][0]["label"] == "LL + short_conv=4 output_gate=true"
    plain = tmp_path / "p.json"
    assert mqar.main(["--out", str(plain), *argv[2:]]) == 0
    runs = [json.loads(f.read_text())["results"][0]["runs"][0]["curve"] for f in (out, plain)]
    assert runs[0] != runs[1]  # another model, another training curve


def test_mqar_parallel_workers_give_the_serial_results(tmp_path, capsys, one_thread):
    """--parallel 2 (two spawned workers, one thread each) writes the accuracies of --parallel 1."""
    argv = ["--ratios", "0", "1", "--kv-pairs", "2", "--seq-len", "16", "--vocab", "32", "--n-layers", "2",
            "--dim", "16", "--heads", "2", "--lrs", "1e-3", "3e-3", "--train-examples", "32",
            "--test-examples", "16", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    got = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}.json"
        assert mqar.main(["--out", str(out), "--parallel", str(n), *argv]) == 0
        result = json.loads(out.read_text())
        assert result["settings"]["parallel"] == n
        got[n] = [(r["layer_map"], r["kv_pairs"], r["accuracy"], r["best_lr"], r["per_lr_final_accuracy"],
                   [[c["train_loss"] for c in run["curve"]] for run in r["runs"]]) for r in result["results"]]
        assert len(capsys.readouterr().err.strip().splitlines()) == 2  # one progress line per (map, kv)
    assert [g[:2] for g in got[1]] == [("SS", 2), ("LL", 2)]
    assert got[2] == got[1]

    out = tmp_path / "p0.json"
    assert mqar.main(["--out", str(out), "--parallel", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parallel = 0" in err[0], err
    assert not out.exists()


def test_mqar_cut_grid_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch, one_thread):
    """A grid cut by a failing job keeps its finished jobs in <out>.jobs.jsonl; --resume runs only
    the rest and writes what an uninterrupted run writes. Other settings refuse the journal."""
    def summary(path):
        return [(r["layer_map"], r["kv_pairs"], r["accuracy"], r["best_lr"],
                 [[c["train_loss"] for c in run["curve"]] for run in r["runs"]])
                for r in json.loads(path.read_text())["results"]]

    argv = ["--ratios", "0", "1", "--train-on", "each", *TINY]
    clean = tmp_path / "clean.json"
    assert mqar.main(["--out", str(clean), *argv]) == 0
    assert not (tmp_path / "clean.json.jobs.jsonl").exists()  # removed once the JSON is written

    out = tmp_path / "cut.json"
    real, calls = mqar.train_one, []

    def dies_on_the_fourth(*a, **k):
        calls.append(a[:2])
        if len(calls) == 4:
            raise RuntimeError("machine lost")
        return real(*a, **k)

    monkeypatch.setattr(mqar, "train_one", dies_on_the_fourth)
    assert mqar.main(["--out", str(out), *argv]) == 1
    assert not out.exists()
    assert len((tmp_path / "cut.json.jobs.jsonl").read_text().splitlines()) == 1 + 3  # settings + 3 jobs

    capsys.readouterr()
    bad = ["--out", str(out), "--resume", *argv, "--epochs", "3"]
    assert mqar.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epochs" in err[0] and "--resume" in err[0], err

    monkeypatch.setattr(mqar, "train_one", dies_on_the_fourth)  # counts the calls; the 4th is new now
    calls.clear()
    calls.extend([None] * 10)  # never raise again
    assert mqar.main(["--out", str(out), "--resume", *argv]) == 0
    assert len(calls) == 10 + len(json.loads(clean.read_text())["results"]) * 2 - 3  # only the rest ran
    result = json.loads(out.read_text())
    assert result["resumed_jobs"] == 3 and len(result["earlier_invocations_seconds"]) == 1
    assert summary(out) == summary(clean)
    assert not (tmp_path / "cut.json.jobs.jsonl").exists()


def test_mqar_seeds_give_the_mean_and_range_and_pick_the_lr_by_mean(tmp_path, capsys, one_thread):
    """--seeds trains each (map, kv, lr) once per seed; the result is the mean over seeds at the lr
    with the best mean, with each seed's accuracy; one seed alone reproduces the plain run."""
    argv = ["--ratios", "0", *TINY]
    single = tmp_path / "one.json"
    assert mqar.main(["--out", str(single), "--seed", "5", "--seeds", "5", *argv]) == 0
    plain = tmp_path / "plain.json"
    assert mqar.main(["--out", str(plain), "--seed", "5", *argv]) == 0
    acc = lambda p: [(r["accuracy"], r["best_lr"]) for r in json.loads(p.read_text())["results"]]  # noqa: E731
    assert acc(single) == acc(plain)

    out = tmp_path / "three.json"
    assert mqar.main(["--out", str(out), "--seeds", "0", "1", "2", *argv]) == 0
    for r in json.loads(out.read_text())["results"]:
        assert [run["seed"] for run in r["runs"]] == [0, 1, 2, 0, 1, 2]  # lr 1e-3 x seeds, then lr 3e-3
        score = {lr: sum(run["accuracy"] for run in r["runs"] if run["lr"] == lr) / 3 for lr in (1e-3, 3e-3)}
        assert r["best_lr"] == max(score, key=lambda lr: (score[lr], lr == 1e-3))  # ties: equal steps here
        by_lr = {lr: [run["accuracy_by_kv"][str(r["kv_pairs"])] for run in r["runs"] if run["lr"] == lr]
                 for lr in (1e-3, 3e-3)}
        means = {lr: sum(a) / 3 for lr, a in by_lr.items()}
        assert r["accuracy_per_seed"] == by_lr[r["best_lr"]]
        assert r["accuracy"] == pytest.approx(means[r["best_lr"]])
        assert r["accuracy_min"] == min(by_lr[r["best_lr"]]) and r["accuracy_max"] == max(by_lr[r["best_lr"]])
    capsys.readouterr()
    assert mqar.main(["--out", str(tmp_path / "dup.json"), "--seeds", "1", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds = [1, 1]" in err[0], err


def test_mqar_each_trains_one_model_per_kv_count(tmp_path):
    """--train-on each: a model per (map, kv, lr), scored on its own kv count only."""
    out = tmp_path / "each.json"
    assert mqar.main(["--out", str(out), "--ratios", "0", "--train-on", "each", *TINY]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["kv_pairs"] for r in rows] == [2, 4]
    for r in rows:
        assert r["accuracy"] == max(run["accuracy"] for run in r["runs"])
        assert all(set(run["accuracy_by_kv"]) == {str(r["kv_pairs"])} for run in r["runs"])


def test_mqar_mix_pads_queries_without_changing_loss_or_hits(one_thread):
    """The mixture pads each row's queries to the widest kv count (position 0, target IGNORE):
    a model's loss and correct answers on the padded rows equal those on the unpadded ones, and
    the training set holds every count equally."""
    import torch

    args = mqar._parser().parse_args(["--out", "x.json", "--ratios", "0", *TINY])
    maps, device, _ = mqar.check_args(args)
    (x, q, y), tests = mqar.load_data("mix", args, device)
    assert x.shape[0] == args.train_examples and q.shape[1] == 4 and set(tests) == {2, 4}
    labelled = (y != -100).sum(1)
    assert (labelled == 2).sum() == (labelled == 4).sum() == args.train_examples // 2
    args.train_on = "each"
    _, own = mqar.load_data(2, args, device)
    model, head = mqar.build_model(maps[0][1], args, device)
    with torch.no_grad():
        padded = mqar._loss_and_hits(model, head, *tests[2])
        plain = mqar._loss_and_hits(model, head, *own[2])
    assert tests[2][2].shape[1] == 4 and own[2][2].shape[1] == 2
    torch.testing.assert_close(padded[0], plain[0])
    assert padded[1].item() == plain[1].item()


def test_mqar_mix_needs_an_example_per_kv_count(tmp_path, capsys):
    assert mqar.main(["--out", str(tmp_path / "m.json"), *TINY, "--train-examples", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-examples = 1" in err[0], err
