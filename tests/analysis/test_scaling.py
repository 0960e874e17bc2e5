"""Scaling-law fits (titan_linear.analysis.scaling, scaling_fit, isoflop, flops).

Synthetic runs follow Epoch AI's refit of Chinchilla (Besiroglu et al. 2024: E 1.82, A 482,
B 2085, alpha 0.348, beta 0.366) on a 5 x 5 grid of N in [1e7, 1e9] and D in [3e8, 3e10],
with log-normal noise of 0.5 % (seeded). Stated tolerances on those 25 runs: alpha and beta
within 0.03 of the truth, E within 2 %; without noise, every parameter within 0.1 %.
"""

import csv
import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from titan_linear.analysis import flops, isoflop, scaling, scaling_fit
from titan_linear.analysis.scaling_fit import Law

from tests.helpers import DEBUG_TOML

TRUE = Law(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)


def grid_runs(law=TRUE, noise=0.005, seed=0):
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(3e8, 3e10, 5)))
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.size))
    return n, d, loss


@pytest.fixture(scope="module")
def noisy():
    n, d, loss = grid_runs()
    return n, d, loss, scaling_fit.fit_law(n, d, loss)


def test_objective_gradient_matches_finite_differences():
    n, d, loss = grid_runs()
    data = scaling_fit._Data(n, d, loss)
    # A point in the Huber's linear branch for some runs and quadratic for others.
    t = data.centre(TRUE.theta) + np.array([0.01, -0.02, 0.003, 0.002, -0.001])
    f, g = data.objective(t, grad=True)
    h = 1e-7
    numeric = [(data.objective(t + h * e)[0] - data.objective(t - h * e)[0]) / (2 * h) for e in np.eye(5)]
    np.testing.assert_allclose(g[0], numeric, rtol=1e-4, atol=1e-6)


def test_fit_law_recovers_exact_law():
    n, d, loss = grid_runs(noise=0.0)
    law = scaling_fit.fit_law(n, d, loss).law
    for name in scaling_fit.PARAM_NAMES:
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=1e-3), name


def test_fit_law_recovers_noisy_law_within_tolerance(noisy):
    *_, fit = noisy
    assert abs(fit.law.alpha - TRUE.alpha) < 0.03
    assert abs(fit.law.beta - TRUE.beta) < 0.03
    assert fit.law.E == pytest.approx(TRUE.E, rel=0.02)
    assert fit.converged
    # The fitted law explains the runs to about the noise level.
    assert np.sqrt(np.mean(fit.residuals ** 2)) < 0.006


def test_screened_starts_reach_the_best_optimum_of_the_grid(noisy):
    """No start among 40 random grid points finds a lower objective than the screened fit."""
    n, d, loss, fit = noisy
    data = scaling_fit._Data(n, d, loss)
    grid = scaling_fit.start_grid()
    pick = np.random.default_rng(1).choice(len(grid), 40, replace=False)
    with scaling_fit.one_blas_thread():
        others = [scaling_fit._lbfgs(data, data.centre(grid[i]))[1] * scaling_fit.DELTA for i in pick]
    assert min(others) >= fit.objective * (1 - 1e-6)


def test_bootstrap_intervals_cover_the_truth(noisy):
    n, d, loss, fit = noisy
    laws = scaling_fit.bootstrap(n, d, loss, 40, seed=0, start=fit.law)
    assert len(laws) == 40
    iv = scaling_fit.parameter_intervals(laws, 0.95)
    for name in ("E", "alpha", "beta"):
        lo, hi = iv[name]["interval"]
        assert lo <= getattr(TRUE, name) <= hi, (name, lo, hi)
    again = scaling_fit.bootstrap(n, d, loss, 3, seed=0, start=fit.law)
    assert [lw.alpha for lw in again] == [lw.alpha for lw in laws[:3]]  # seeded
    p = scaling_fit.prediction(fit, laws, 1e9, 2e10, 0.95)
    assert p["pi"][0] <= p["ci"][0] <= p["loss"] <= p["ci"][1] <= p["pi"][1]
    assert p["pi"][0] <= TRUE.loss(1e9, 2e10) <= p["pi"][1]


@pytest.mark.parametrize("k", [6.0, 6.7])
def test_optimum_closed_form_matches_numeric_minimum(k):
    for c in (1e18, 1e21, 1e24):
        n_opt, d_opt = TRUE.optimum(c, k)
        res = minimize_scalar(lambda x: TRUE.loss(np.exp(x), c / (k * np.exp(x))), bounds=(5, 40),
                              method="bounded", options={"xatol": 1e-10})
        assert n_opt == pytest.approx(np.exp(res.x), rel=1e-4)
        assert d_opt == pytest.approx(c / (k * n_opt), rel=1e-12)


def test_isoflop_finds_known_parabola_minima():
    """Loss = L*(C) + 0.05 (ln N - ln N*(C))^2 with N*(C) = 0.1 C^0.5; runs jittered in C by 3 %."""
    rng = np.random.default_rng(0)
    n, flops_, loss, truth = [], [], [], {}
    for c in (1e17, 1e18, 1e19, 1e20):
        star = 0.1 * c ** 0.5
        truth[c] = star
        for f in np.geomspace(0.2, 5.0, 6):
            n.append(star * f)
            flops_.append(c * (1 + 0.03 * rng.uniform(-1, 1)))
            loss.append(4.0 - 0.2 * np.log10(c) + 0.05 * np.log(f) ** 2)
    n, flops_, loss = map(np.array, (n, flops_, loss))
    res = isoflop.isoflop(n, flops_ / (6 * n), loss, flops_, k=6.0, tol=0.1)
    assert len(res["groups"]) == 4 and res["n_groups_used"] == 4
    for g, (c, star) in zip(res["groups"], truth.items()):
        assert g["n_star"] == pytest.approx(star, rel=0.05)
        assert g["loss_star"] == pytest.approx(4.0 - 0.2 * np.log10(c), abs=1e-3)
        assert g["inside"]
    assert res["n_star_law"]["exponent"] == pytest.approx(0.5, abs=0.01)
    assert res["d_star_law"]["exponent"] == pytest.approx(0.5, abs=0.01)


def test_isoflop_minimum_outside_range_is_flagged():
    m = isoflop.parabola_minimum([1e7, 2e7, 4e7], [3.0, 2.9, 2.85])
    assert m["n_star"] > 4e7 and not m["inside"]
    assert isoflop.parabola_minimum([1e7, 2e7, 4e7], [3.0, 3.1, 3.0])["n_star"] is None  # concave


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def two_families(tmp_path, families=("ratio 0", "ratio 0.5")):
    """Two IsoFLOP ladders (3 budgets x 4 sizes) from laws differing in A, with 0.3 % noise."""
    rng = np.random.default_rng(2)
    rows = []
    for fam, law in zip(families, (TRUE, Law(1.85, 560.0, 2085.0, 0.348, 0.366))):
        for c in (1e17, 1e18, 1e19):
            for n in np.geomspace(c ** 0.5 / 40, c ** 0.5 / 3, 4):
                d = c / (6.3 * n)
                rows.append({"family": fam, "n_params": n, "tokens": d, "flops": c,
                             "loss": law.loss(n, d) * np.exp(rng.normal(0, 0.003))})
    return rows


def test_cli_writes_json_and_pngs(tmp_path, capsys):
    runs = _write_csv(tmp_path / "runs.csv", two_families(tmp_path))
    out = tmp_path / "fit.json"
    rc = scaling.main(["--runs", runs, "--out", str(out), "--plot-dir", str(tmp_path / "png"),
                       "--predict", "1e9", "2e10", "--bootstrap", "8", "--refine", "8", "--holdout-largest", "2"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["families"]) == ["ratio 0", "ratio 0.5"]
    fam = res["families"]["ratio 0"]
    assert fam["compute"]["model"] == "flops" and fam["compute"]["k"] == pytest.approx(6.3)
    assert fam["n_runs"] == 12 and len(fam["runs"]) == 12
    lo, hi = fam["intervals"]["alpha"]["interval"]
    assert lo < hi and fam["intervals"]["alpha"]["std"] > 0
    assert len(fam["isoflop"]["groups"]) == 3
    p = fam["predictions"][0]
    assert p["n_params"] == 1e9 and p["flops"] == pytest.approx(6.3 * 1e9 * 2e10)
    opt = fam["compute_optimal"]["budgets"][0]
    assert opt["n_opt"] * opt["d_opt"] * 6.3 == pytest.approx(opt["flops"])
    assert fam["holdout"]["n_held_out"] == 2 and all(r["flops"] == 1e19 for r in fam["holdout"]["runs"])
    cmp = res["comparison"][0]
    assert cmp["families"] == ["ratio 0", "ratio 0.5"] and isinstance(cmp["alpha"]["overlap"], bool)
    for name in ("loss_vs_tokens", "isoflop", "compute_optimal"):
        assert (tmp_path / "png" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ratio 0.5" in printed and "alpha" in printed


def test_read_runs_json_forms_and_compute_columns(tmp_path):
    rows = [{"n_params": 1e7 * (i + 1), "tokens": 1e9, "loss": 3.0, "flops": None, "flops_per_token": 7e7,
             "ratio": 0.5} for i in range(5)]  # a null is an absent value
    for data in (rows, {"runs": rows}):
        path = tmp_path / "runs.json"
        path.write_text(json.dumps(data))
        runs = scaling.read_runs(str(path), "ratio")
        assert [r["family"] for r in runs] == ["0.5"] * 5
        assert runs[0]["flops"] == pytest.approx(7e16)
    cm = scaling.compute_model(runs, "auto", "0.5")
    assert cm["model"] == "flops" and cm["k_range"] == [pytest.approx(1.4), pytest.approx(7.0)]
    assert scaling.compute_model(runs, "6nd", "0.5")["k"] == 6.0
    assert scaling.read_runs(_write_csv(tmp_path / "r.csv", [{"n_params": 1, "tokens": 2, "loss": 3}]))[0]["family"] == "all"


def test_model_flops_agree_with_the_model_and_feed_the_table(tmp_path):
    import torch

    from titan_linear.inference.build import parse_job_config, train_spec

    info = flops.model_flops(DEBUG_TOML, ["--training.seq_len", "64"])
    job, args = parse_job_config(DEBUG_TOML, ["--training.seq_len", "64"])
    with torch.device("meta"):
        model = train_spec(job).model_cls(args)
    assert (info["nparams"], info["flops_per_token"]) == args.get_nparams_and_flops(model, 64)
    assert info["non_embedding"] == info["nparams"] - model.tok_embeddings.weight.numel()
    assert info["layer_map"] == "SLSLSL" and info["seq_len"] == 64
    # Linear layers replace the softmax layers' T-proportional attention term.
    soft = flops.model_flops(DEBUG_TOML, ["--training.seq_len", "64", "--model.linear_attn_ratio", "0"])
    assert soft["non_embedding"] == info["non_embedding"] and soft["flops_per_token"] > info["flops_per_token"]
    path = _write_csv(tmp_path / "r.csv", [{"n_params": 5e6, "tokens": 1e8, "loss": 4.0, "config": DEBUG_TOML,
                                             "overrides": "--training.seq_len 64"}])
    assert scaling.read_runs(path)[0]["flops"] == pytest.approx(info["flops_per_token"] * 1e8)


BAD_INPUT = {
    "missing column": ([{"n_params": 1e7, "tokens": 1e9}], [], "row 1 has no 'loss'"),
    "empty cell, named run": ([{"name": "r1", "n_params": 1e7, "tokens": 1e9, "loss": ""}], [],
                              "row 1 (name 'r1') has no 'loss'"),
    "non-positive": ([{"n_params": 1e7, "tokens": -1e9, "loss": 3}], [], "row 1 has tokens = "),
    "not a number": ([{"n_params": "big", "tokens": 1e9, "loss": 3}], [], "row 1 has n_params = 'big'"),
    "too few runs": ([{"n_params": 1e7 * (i + 1), "tokens": 1e9 * (i % 2 + 1), "loss": 3} for i in range(4)], [],
                     "has 4 runs; the law has 5 parameters"),
    "one size": ([{"n_params": 1e7, "tokens": 1e9 * (i + 1), "loss": 3} for i in range(6)], [],
                 "1 distinct n_params"),
    "odd --predict": ([{"n_params": 1, "tokens": 1, "loss": 1}], ["--predict", "1e9"], "--predict = [1000000000.0]"),
    "--compute": ([{"n_params": 1, "tokens": 1, "loss": 1}], ["--compute", "chinchilla"], "--compute = 'chinchilla'"),
    "--family-key": ([{"n_params": 1, "tokens": 1, "loss": 1}], ["--family-key", "ratio"], "--family-key = 'ratio'"),
    "--bootstrap": ([{"n_params": 1, "tokens": 1, "loss": 1}], ["--bootstrap", "-3"], "--bootstrap = -3"),
    "--holdout-largest": (None, ["--holdout-largest", "10"], "left by --holdout-largest 10"),
    "flops without flops": (None, ["--compute", "flops"], "--compute = 'flops' is not allowed: family"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys, case):
    rows, flags, expected = BAD_INPUT[case]
    if rows is None:
        rows = [{k: v for k, v in r.items() if k != "flops"} for r in two_families(tmp_path)]
    out = tmp_path / "fit.json"
    rc = scaling.main(["--runs", _write_csv(tmp_path / "runs.csv", rows), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert err.startswith("titan_linear.analysis.scaling: error: ")
    assert not out.exists()


def test_cli_refuses_missing_file_and_bad_config(tmp_path, capsys):
    assert scaling.main(["--runs", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o.json")]) == 2
    assert "--runs = " in capsys.readouterr().err and not (tmp_path / "o.json").exists()
    assert flops.main(["--config", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config = " in err


@pytest.mark.parametrize("e, flagged", [(1e-20, True), (0.0, True), (1.82, False)])
def test_notes_flag_an_irreducible_loss_at_its_bound(e, flagged):
    res = {"fit": {"converged": True, "alpha": 0.3, "beta": 0.3, "E": e}, "isoflop": {"groups": []}}
    said = [n for n in scaling.notes(res, lowest_loss=3.7) if n.startswith("E fell to its lower bound")]
    assert bool(said) == flagged
