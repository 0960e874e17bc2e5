"""titan_linear.analysis.report: seeds grouped by configuration, mean and spread as numpy computes
them, the difference to the ratio-0 reference and the beyond-the-seed-spread rule, Welch's test as
scipy computes it, the placement comparison, and the files written (with and without matplotlib)."""

import json

import numpy as np
import pytest

from titan_linear.analysis import report, runs
from titan_linear.analysis.report_figures import mean_curve, ratio_series
from tests.analysis.fake_runs import sweep_run

# group -> best validation loss per seed: ratio 0.5 uniform is 0.2 nats worse, far beyond the
# seeds' ranges (0.02, 0.03); front is 0.01 better, within them; ratio 1 has one seed.
BEST = {
    (0.0, "uniform"): {1: 4.00, 2: 4.01, 3: 4.02},
    (0.5, "uniform"): {1: 4.20, 2: 4.21, 3: 4.23},
    (0.5, "front"): {1: 3.99, 2: 4.00, 3: 4.01},
    (1.0, "uniform"): {1: 4.50},
}
TPS = {0.0: 1000.0, 0.5: 1500.0, 1.0: 2000.0}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    parent = tmp_path_factory.mktemp("sweep")
    for (ratio, placement), seeds in BEST.items():
        for seed, best in seeds.items():
            folder = sweep_run(parent, ratio, seed, best, placement=placement, tps=TPS[ratio] + seed,
                               memory=2.0 - ratio)
            if ratio == 0:  # evaluation results for one group
                (folder / "eval").mkdir()
                (folder / "eval" / "perplexity.json").write_text(json.dumps(
                    {"tool": "titan_linear.eval.perplexity", "results": [{"seq_len": 256, "loss": 2 + seed / 100}]}))
    return parent, runs.read_runs([str(parent)])


def test_groups_seeds_and_spread_equal_numpy(sweep):
    _, table = sweep
    groups = report.group_runs(table)
    assert [g["name"] for g in groups] == ["r0_uniform", "r0.5_front", "r0.5_uniform", "r1_uniform"]
    for g in groups:
        key = (g["config"]["model.linear_attn_ratio"], g["config"]["model.linear_attn_placement"])
        assert sorted(g["seeds"]) == sorted(BEST[key])
        assert "debug.seed" not in g["config"]  # seeds are what a group varies over
        losses = np.array([BEST[key][s] for s in g["seeds"]])
        s = g["stats"]["best_val_loss"]
        assert s["n"] == len(losses) and s["mean"] == pytest.approx(losses.mean(), abs=1e-6)
        assert (s["min"], s["max"]) == (pytest.approx(losses.min(), abs=1e-6), pytest.approx(losses.max(), abs=1e-6))
        if len(losses) > 1:
            assert s["std"] == pytest.approx(losses.std(ddof=1), abs=1e-6)
        else:
            assert s["std"] is None
        tps = np.array([TPS[key[0]] + seed for seed in g["seeds"]])
        assert g["stats"]["tokens_per_s"]["mean"] == pytest.approx(tps.mean())
        assert g["stats"]["best_val_step"]["mean"] == 10  # the sweep's losses are lowest at step 20 // 2
    ppl = groups[0]["eval"]["eval.perplexity.loss@256"]
    assert (ppl["n"], ppl["mean"], ppl["std"]) == (3, pytest.approx(2.02), pytest.approx(np.std([2.01, 2.02, 2.03], ddof=1)))
    assert all(not g["eval"] for g in groups[1:])


def test_difference_to_reference_and_seed_spread(sweep):
    from scipy import stats

    _, table = sweep
    rep = report.build_report(table)
    by = {c["group"]: c for c in rep["comparisons"]}
    assert set(by) == {"r0.5_front", "r0.5_uniform", "r1_uniform"}
    assert all(c["reference"] == "r0_uniform" for c in by.values())
    ref = np.array(list(BEST[(0.0, "uniform")].values()))
    uni = np.array(list(BEST[(0.5, "uniform")].values()))
    c = by["r0.5_uniform"]
    assert c["diff"] == pytest.approx(uni.mean() - ref.mean(), abs=1e-6)
    assert c["se"] == pytest.approx(np.sqrt(uni.var(ddof=1) / 3 + ref.var(ddof=1) / 3), rel=1e-4)
    assert c["range"] == pytest.approx(0.03, abs=1e-6) and c["beyond_spread"] is True
    assert c["welch_p"] == pytest.approx(stats.ttest_ind(uni, ref, equal_var=False).pvalue, rel=1e-3)
    assert by["r0.5_front"]["beyond_spread"] is False and abs(by["r0.5_front"]["diff"]) < 0.02
    assert by["r1_uniform"]["beyond_spread"] is None and by["r1_uniform"]["se"] is None  # one seed
    (p,) = rep["placements"]
    assert p["ratio"] == 0.5 and sorted(g["name"] for g in p["groups"]) == ["r0.5_front", "r0.5_uniform"]
    (front,) = p["vs_uniform"]
    assert (front["group"], front["reference"], front["beyond_spread"]) == ("r0.5_front", "r0.5_uniform", True)
    assert front["diff"] == pytest.approx(4.0 - uni.mean(), abs=1e-6)
    # ratio 0 and 1 (placement means nothing there) join both placements' series
    series = ratio_series(rep["groups"])
    assert {k: [g["name"] for g in v] for k, v in series.items()} == {
        "uniform": ["r0_uniform", "r0.5_uniform", "r1_uniform"], "front": ["r0_uniform", "r0.5_front", "r1_uniform"]}
    # an explicit reference is every group's
    explicit = report.build_report(table, reference="r1_uniform")["comparisons"]
    assert {c["reference"] for c in explicit} == {"r1_uniform"} and len(explicit) == 3


def test_mean_curve_over_common_steps():
    steps, mean, lo, hi = mean_curve([[[1, 2.0], [2, 4.0], [3, 1.0]], [[2, 6.0], [3, 3.0]]])
    assert (steps, mean, lo, hi) == ([2, 3], [5.0, 2.0], [4.0, 1.0], [6.0, 3.0])


def test_cli_writes_report_and_figures(sweep, tmp_path):
    parent, _ = sweep
    out = tmp_path / "rep"
    assert report.main([str(parent), "--out-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "ratio.png", "placement.png",
                                               "loss_curves.png"}
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| r0.5_uniform | r0_uniform |"))
    assert "**yes**" in row and "+0.2033" in row
    assert "| no |" in next(line for line in md.splitlines() if line.startswith("| r0.5_front | r0_uniform |"))
    assert "| n/a |" in next(line for line in md.splitlines() if line.startswith("| r1_uniform | r0_uniform |"))
    assert "![placement at equal ratio](placement.png)" in md and report.BEYOND_RULE in md
    # The evaluation table: one row per result, one column per group.
    head = next(line for line in md.splitlines() if line.startswith("| result |")).split(" | ")
    row = next(line for line in md.splitlines() if line.startswith("| eval.perplexity.loss@256 |")).split(" | ")
    assert row[head.index("r0_uniform")] == "2.02 ± 0.01 [2.01–2.03] (3)"
    data = json.loads((out / "report.json").read_text())
    assert len(data["runs"]) == 10 and {g["name"] for g in data["groups"]} == {
        "r0_uniform", "r0.5_front", "r0.5_uniform", "r1_uniform"}


def test_cli_without_matplotlib_writes_markdown_only(sweep, tmp_path, monkeypatch):
    import titan_linear.eval.report as eval_report

    def missing(flag="--plot"):
        raise ValueError(f"{flag} is not allowed: matplotlib is not installed (pip install matplotlib)")

    monkeypatch.setattr(eval_report, "pyplot", missing)
    parent, _ = sweep
    assert report.main([str(parent), "--out-dir", str(tmp_path / "rep")]) == 0
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.md", "report.json"}
    assert "matplotlib is not installed: no figures" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_bad_reference_is_one_line(sweep, tmp_path, capsys):
    parent, _ = sweep
    assert report.main([str(parent), "--out-dir", str(tmp_path / "rep"), "--reference-group", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{report.PROG}: error: --reference-group = 'nope' is not allowed: one of "
                   "r0_uniform, r0.5_front, r0.5_uniform, r1_uniform"]
    assert not (tmp_path / "rep").exists() and not list(tmp_path.glob("rep.tmp*"))


def test_at_step_compares_the_validation_loss_at_that_step(sweep, tmp_path):
    parent, _ = sweep
    out = tmp_path / "rep"
    assert report.main([str(parent), "--out-dir", str(out), "--at-step", "4"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for g in rep["groups"]:
        key = (g["config"]["model.linear_attn_ratio"], g["config"]["model.linear_attn_placement"])
        # the fake runs validate at every even step, best + 0.01 per step away from step 10
        want = np.mean([BEST[key][s] + 0.06 for s in g["seeds"]])
        assert g["stats"]["loss"]["mean"] == pytest.approx(want, abs=1e-6)
        assert g["loss_source"] == ["validation at step 4"]
    assert "Compared at step 4" in (out / "report.md").read_text()


def test_at_step_without_validation_there_is_one_line(sweep, tmp_path, capsys):
    parent, _ = sweep
    assert report.main([str(parent), "--out-dir", str(tmp_path / "rep"), "--at-step", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--at-step = 3" in err and "2, 4, 6" in err
    assert not (tmp_path / "rep").exists()
