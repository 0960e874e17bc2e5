"""The reader's evaluation columns: attention maps per layer, passkey also per length (mean over
depths), and the report's evaluation table ordered by id as a number (titan_linear/analysis)."""

from titan_linear.analysis.report import _by_id
from titan_linear.analysis.runs import flatten_eval


def test_attention_maps_give_per_layer_means_and_no_metadata():
    doc = {"tool": "attention_maps", "model": {"dim": 384, "n_layers": 2}, "tokens": 128, "uniform_entropy": 3.9,
           "layers": [{"layer": 0, "kind": "softmax", "mean": {"entropy": 3.5, "first_token_mass": 0.1},
                       "heads": [{"entropy": 3.0}, {"entropy": 4.0}], "output_max_abs_error": 1e-3},
                      {"layer": 1, "kind": "linear", "mean": {"entropy": 3.8, "first_token_mass": 0.2}}]}
    out = flatten_eval(doc, "attention_maps")
    assert out == {"eval.attention_maps.entropy@0": 3.5, "eval.attention_maps.first_token_mass@0": 0.1,
                   "eval.attention_maps.entropy@1": 3.8, "eval.attention_maps.first_token_mass@1": 0.2}


def test_passkey_gives_each_cell_and_the_mean_over_depths_per_length():
    recs = [{"length": L, "depth": d, "trials": 4, "exact_match": em, "key_logprob_per_digit": lp}
            for L, d, em, lp in [(512, 0.0, 1.0, -1.0), (512, 1.0, 0.5, -3.0), (1024, 0.0, 0.0, -5.0)]]
    out = flatten_eval({"tool": "passkey", "results": recs}, "passkey")
    assert out["eval.passkey.exact_match@512,0"] == 1.0 and out["eval.passkey.exact_match@512,1"] == 0.5
    assert out["eval.passkey.exact_match@512"] == 0.75 and out["eval.passkey.key_logprob_per_digit@512"] == -2.0
    assert out["eval.passkey.exact_match@1024"] == 0.0


def test_report_orders_ids_as_numbers():
    keys = ["eval.p.loss@8192", "eval.p.loss@512", "eval.p.loss@2048", "eval.h.acc", "eval.p.loss@x"]
    assert sorted(keys, key=_by_id) == ["eval.h.acc", "eval.p.loss@512", "eval.p.loss@2048", "eval.p.loss@8192",
                                        "eval.p.loss@x"]
