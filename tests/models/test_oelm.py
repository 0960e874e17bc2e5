"""OELMTransformer: frozen Haar-orthogonal projections, freeze placement, parameter report, config errors."""

import copy
import re

import pytest
import torch

from titan_linear.launch import check
from titan_linear.models.oelm import oelm_args, OELMModelArgs, OELMTransformer, orthogonal_weight, parameter_report
from titan_linear.recipe import build_grouped_optimizers
from tests import helpers


def oelm_debug(**changes) -> OELMModelArgs:
    return helpers.debug_args(oelm_args["debugmodel"], **changes)


def build(args: OELMModelArgs, seed: int = 0) -> OELMTransformer:
    return helpers.build(args, seed=seed, cls=OELMTransformer)


def _weights(model, proj):
    return {i: model.layers[str(i)].attention.get_parameter(f"{proj}.weight") for i in range(model.model_args.n_layers)}


@pytest.mark.parametrize("mode, frozen", [("qk", ("wq", "wk")), ("kv", ("wk", "wv")), ("none", ())])
def test_frozen_projections_are_orthogonal_and_have_no_grad(mode, frozen):
    model = build(oelm_debug(oelm_freeze=mode))
    for proj in ("wq", "wk", "wv", "wo"):
        for i, w in _weights(model, proj).items():
            assert w.requires_grad == (proj not in frozen), (mode, proj, i)
            if proj in frozen:
                eye = torch.eye(w.shape[1])
                torch.testing.assert_close(w.T @ w, eye, atol=1e-5, rtol=0)
    tokens = torch.randint(0, 2048, (2, 33))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), name


def test_grouped_query_shapes_are_semi_orthogonal():
    model = build(oelm_debug(oelm_freeze="kv", n_kv_heads=4))
    w = model.layers["0"].attention.wk.weight
    assert w.shape == (4 * 16, 256)
    torch.testing.assert_close(w @ w.T, torch.eye(64), atol=1e-5, rtol=0)  # orthonormal rows
    q = model.layers["0"].attention.wq.weight
    assert q.requires_grad and not torch.allclose(q @ q.T, torch.eye(256), atol=1e-2)


def test_orthogonal_matrices_reproducible_from_seed_and_independent_of_global_rng():
    a = build(oelm_debug(oelm_seed=7), seed=0)
    b = build(oelm_debug(oelm_seed=7), seed=123)
    c = build(oelm_debug(oelm_seed=8), seed=0)
    wa, wb, wc = (m.layers["2"].attention.wq.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.allclose(wa, wc)
    assert not torch.allclose(a.layers["2"].attention.wq.weight, a.layers["3"].attention.wq.weight)
    assert not torch.allclose(a.layers["2"].attention.wq.weight, a.layers["2"].attention.wk.weight)
    # the trainable weights follow the global seed as in llama3
    assert not torch.equal(a.layers["0"].attention.wv.weight, b.layers["0"].attention.wv.weight)


def test_haar_sign_correction_spreads_diagonal():
    # QR without the sign correction has a positive-biased diagonal of R; Haar matrices have
    # E[diag] = 0. The mean over many 8x8 draws stays near 0.
    diag = torch.stack([orthogonal_weight((8, 8), s).diagonal() for s in range(400)])
    assert diag.mean().abs() < 0.03


@pytest.mark.parametrize("ratio, layers", [(1.0, [0, 1, 2, 3, 4, 5]), (0.5, [1, 3, 5]), (0.25, [1, 4]), (0.0, [])])
def test_freeze_ratio_places_layers_uniformly(ratio, layers):
    args = oelm_debug(freeze_ratio=ratio)
    assert args.frozen_layers == layers
    model = build(args)
    frozen = sorted({int(n.split(".")[1]) for n, p in model.named_parameters() if not p.requires_grad})
    assert frozen == layers
    assert model.oelm_freeze_map[:, :2].sum(1).tolist() == [2 if i in layers else 0 for i in range(6)]


def test_combines_with_linear_attention_layers():
    model = build(oelm_debug(linear_attn_ratio=0.5, freeze_ratio=1.0))
    assert model.linear_layers == [1, 3, 5]
    w = model.layers["1"].attention.wq.weight
    assert not w.requires_grad
    torch.testing.assert_close(w.T @ w, torch.eye(256), atol=1e-5, rtol=0)
    assert torch.isfinite(model(torch.randint(0, 2048, (1, 16)))).all()


def test_parameter_report_matches_analytic_count():
    args = oelm_debug(n_kv_heads=4)
    model = build(args)
    d, L, V, hd, kv = 256, 6, 2048, 16, 4
    h = model.layers["0"].feed_forward.w1.weight.shape[0]
    assert h == 768  # llama3: int(2 * 4d / 3) rounded up to multiple_of 256
    q, k = d * d, d * kv * hd
    expected = {
        "embeddings": V * d, "output": V * d, "attention.wq": L * q, "attention.wk": L * k,
        "attention.wv": L * k, "attention.wo": L * q, "feed_forward": L * 3 * d * h, "norms": (2 * L + 1) * d,
    }
    rep = parameter_report(model)
    assert {c: r["total"] for c, r in rep["components"].items()} == expected
    assert rep["total"] == sum(expected.values()) == sum(p.numel() for p in model.parameters())
    assert rep["frozen"] == L * (q + k)
    assert rep["trainable"] == rep["total"] - L * (q + k)
    assert rep["components"]["attention.wv"]["frozen"] == 0


def test_medium512_shape_and_report():
    args = copy.deepcopy(oelm_args["medium512"])
    with torch.device("meta"):
        model = OELMTransformer(args)
    rep = parameter_report(model)
    d, V, L = 512, 50257, 6
    assert model.layers["0"].feed_forward.w1.weight.shape == (2048, 512)
    assert rep["components"]["embeddings"]["total"] == V * d == 25_731_584  # GPT-2 vocabulary x width 512
    assert rep["frozen"] == L * 2 * d * d
    assert rep["components"]["feed_forward"]["total"] == L * 3 * d * 2048


@pytest.mark.parametrize("flavor, width, hidden", [("small", 512, 2048), ("base", 768, 3072), ("large", 1024, 4096)])
def test_small_base_large_flavors(flavor, width, hidden):
    args = copy.deepcopy(oelm_args[flavor])
    with torch.device("meta"):
        model = OELMTransformer(args)
    assert args.dim == width and args.vocab_size == 32000 and args.dim // args.n_heads == 64
    assert model.layers["0"].feed_forward.w1.weight.shape == (hidden, width)


def test_optimizer_never_sees_frozen_weights():
    model = build(oelm_debug())
    from torchtitan.config import Optimizer as OptCfg

    cfg = OptCfg(implementation="for-loop")
    opt = build_grouped_optimizers([model], cfg, parallel_dims=None)
    in_opt = {id(p) for g in opt.optimizers[0].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name
    tokens = torch.randint(0, 2048, (2, 17))
    model(tokens).sum().backward()
    opt.step()
    assert all(p.requires_grad for p in opt.optimizers[0].state)
    keys = opt.state_dict().keys()
    assert not any(".attention.wq." in k or ".attention.wk." in k for k in keys), [k for k in keys if "wq" in k]
    assert any(".attention.wv." in k for k in keys)


def test_freeze_map_mismatch_on_load_names_both():
    src = build(oelm_debug(oelm_freeze="qk"))
    dst = build(oelm_debug(oelm_freeze="kv"))
    with pytest.raises(ValueError, match=r"freeze map qk-\|.* does not match .* -kv\|"):
        dst.load_state_dict(src.state_dict())


def _argv(*extra):
    return ["--job.config_file", "train_configs/debug_oelm.toml", "--job.custom_config_module",
            "titan_linear.config", *extra]


@pytest.mark.parametrize("flag, value, key", [
    ("--model.oelm_freeze", "qv", "model.oelm_freeze"),
    ("--model.freeze_ratio", "1.5", "model.freeze_ratio"),
    ("--lr_scheduler.schedule", "step", "lr_scheduler.schedule"),
    ("--lr_scheduler.min_lr_factor", "2", "lr_scheduler.min_lr_factor"),
])
def test_bad_oelm_keys_name_key_and_value(flag, value, key):
    with pytest.raises(ValueError) as e:
        check(_argv(flag, value))
    msg = str(e.value)
    assert key in msg and value in msg and "\n" not in msg, msg


def test_context_parallel_refused_with_linear_layers():
    # The one refusal lives in HybridModelArgs.update_from_config, inherited by OELM.
    with pytest.raises(ValueError) as e:
        check(_argv("--model.linear_attn_ratio", "0.5", "--parallelism.context_parallel_degree", "2"))
    msg = str(e.value)
    assert "parallelism.context_parallel_degree" in msg and "linear" in msg and "\n" not in msg, msg


def test_debug_config_checks():
    job, args = check(_argv("--debug.seed", "5"))
    assert job.model.name == "llama3_oelm" and args.oelm_freeze == "qk" and args.frozen_layers == list(range(6))
    assert args.oelm_seed == 5
    assert re.fullmatch("F{6}", args.freeze_map)


@pytest.mark.parametrize("name, flavor, mode, schedule", [
    ("oelm_small", "small", "kv", "torchtitan"), ("oelm_base", "base", "kv", "cosine_restarts"),
    ("oelm_large", "large", "kv", "polynomial"), ("medium512_gpt", "medium512", "none", "torchtitan"),
    ("medium512_oelm", "medium512", "qk", "torchtitan"),
])
def test_seed_configs_check(name, flavor, mode, schedule):
    job, args = check(["--job.config_file", f"train_configs/{name}.toml"])
    assert job.model.flavor == flavor and args.oelm_freeze == mode and job.lr_scheduler.schedule == schedule
    assert job.optimizer.no_decay_bias_and_norm and job.training.seq_len == 512
    assert job.training.global_batch_size in (16, 64)
