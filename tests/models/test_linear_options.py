"""Options of the linear layer (models/hybrid/linear_options.py, docs/attention.md "Options"):
off = the seed's layer bit for bit; each option changes the output, trains, checks its key,
and its recurrent decode matches the parallel forward (tests/inference/test_linear_options_decode.py)."""

import pytest
import torch
import torch.nn.functional as F
from torchtitan.config import ConfigManager

from titan_linear.models.hybrid import ConfigError, hybrid_args, LinearAttention
from titan_linear.models.oelm import oelm_args
from titan_linear.ops.efficient_attn import efficient_attention
from titan_linear.recipe import no_decay
from tests.helpers import build, debug_args, DEBUG_TOML, OELM_TOML

# One setting per option, and all of them together.
OPTIONS = {
    "temperature": {"linear_attn_temperature": 0.5},
    "learned_temperature": {"linear_attn_temperature": 2.0, "linear_attn_learned_temperature": True},
    "output_norm": {"linear_attn_output_norm": True},
    "output_gate": {"linear_attn_output_gate": True},
    "short_conv": {"linear_attn_short_conv": 4},
    "decay": {"linear_attn_decay": True},
}
OPTIONS["all"] = {k: v for opts in OPTIONS.values() for k, v in opts.items()}
# Not in "all" (which keeps one rate per kv head): the decay with a rate per key feature.
OPTIONS["decay_per_feature"] = {"linear_attn_decay": True, "linear_attn_decay_rates": "feature"}

NEW_PARAMS = {
    "temperature": set(),
    "learned_temperature": {"q_log_scale", "k_log_scale"},
    "output_norm": {"out_norm.weight"},
    "output_gate": {"wg.weight"},
    "short_conv": {"short_conv.q_weight", "short_conv.k_weight", "short_conv.v_weight"},
    "decay": {"k_log_decay"},
    "decay_per_feature": {"k_log_decay"},
}


def tiny_args(**changes):
    """3 layers (linear, softmax, linear), dim 64, 4 query heads of 16 over 2 kv heads: small
    enough that the tests of every option stay fast on a loaded 2-core machine."""
    base = dict(n_layers=3, dim=64, n_heads=4, n_kv_heads=2, vocab_size=256, linear_attn_layers=(0, 2))
    return debug_args(**{**base, **changes})


def _model(seed=0, **options):
    return build(tiny_args(**options), seed=seed)


def _seed_forward(self, x, freqs_cis, attention_masks, positions=None):
    """The linear layer as it was before the options: the seed's formula, written out."""
    bs, seqlen, _ = x.shape
    q, k, v = (p(x).view(bs, seqlen, -1, self.head_dim).transpose(1, 2) for p in (self.wq, self.wk, self.wv))
    out = efficient_attention(q, k, v).transpose(1, 2).contiguous().view(bs, seqlen, -1)
    return self.wo(out)


def test_default_is_the_seed_layer_bit_for_bit(monkeypatch):
    model = _model(seed=3)
    stock_names = {n for n, _ in build(tiny_args(linear_attn_layers=())).named_parameters()}
    assert {n for n, _ in model.named_parameters()} == stock_names
    tokens = torch.randint(0, 256, (2, 40))
    got = model(tokens)
    reference = _model(seed=3)
    monkeypatch.setattr(LinearAttention, "forward", _seed_forward)
    expected = reference(tokens)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_changes_output_and_adds_its_parameters(name):
    tokens = torch.randint(0, 256, (2, 24))
    base = _model(seed=1)
    model = _model(seed=1, **OPTIONS[name])
    assert not torch.allclose(model(tokens), base(tokens), atol=1e-4)
    attn = model.layers["0"].attention
    new = {n for n, _ in attn.named_parameters()} - {n for n, _ in base.layers["0"].attention.named_parameters()}
    wanted = set().union(*(NEW_PARAMS[n] for n in OPTIONS if n != "all")) if name == "all" else NEW_PARAMS[name]
    assert new == wanted
    # softmax layers are untouched; the new weights are initialised, the same for the same seed
    assert {n for n, _ in model.layers["1"].named_parameters()} == {n for n, _ in base.layers["1"].named_parameters()}
    again = _model(seed=1, **OPTIONS[name])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_option_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 64)
    model = _model(**OPTIONS["all"])
    attn = model.layers["0"].attention
    with torch.no_grad():
        attn.q_log_scale.uniform_(-1, 1)
        attn.short_conv.k_weight.normal_()
        attn.k_log_decay.uniform_(-3, 0)
    # learned temperature starts at the fixed one: scale 1 / 2 on both q and k
    assert torch.allclose(torch.exp(_model(**OPTIONS["learned_temperature"]).layers["0"].attention.k_log_scale),
                          torch.full((2,), 0.5))
    q, k, v, _ = attn.project(x)
    # the convolution: y_t = x_t + sum_j w[j] x_{t-K+1+j}, written as F.conv1d here
    xk = attn.wk(x)
    w = attn.short_conv.k_weight
    conv = F.conv1d(F.pad(xk.transpose(1, 2), (3, 0)), w[:, None, :], groups=w.shape[0]).transpose(1, 2)
    want_k = (xk + conv).view(2, 9, 2, 16).transpose(1, 2) * 0.5
    # the decay: a_h * s added to kv head h's keys at position s, a_h = exp(k_log_decay)
    want_k = want_k + torch.exp(attn.k_log_decay)[:, None, None] * torch.arange(9.0)[:, None]
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    xq = attn.short_conv(attn.wq(x), xk, attn.wv(x))[0][0].view(2, 9, 4, 16).transpose(1, 2)
    torch.testing.assert_close(q, xq * torch.exp(attn.q_log_scale)[:, None, None], rtol=1e-6, atol=1e-6)
    # output: RMSNorm per head, then the sigmoid gate of the block input
    o = torch.randn(2, 4, 9, 16)
    with torch.no_grad():
        attn.out_norm.weight.uniform_(0.5, 1.5)
    rms = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.out_norm.weight[:, None, :]
    gate = torch.sigmoid(attn.wg(x)).view(2, 9, 4, 16).transpose(1, 2)
    torch.testing.assert_close(attn.mix_output(o, x), rms * gate, rtol=1e-5, atol=1e-5)


# All options with the decay's rate per key feature instead of per kv head.
ALL_PER_FEATURE = {**OPTIONS["all"], **OPTIONS["decay_per_feature"]}


@pytest.mark.parametrize("options", [OPTIONS["all"], ALL_PER_FEATURE], ids=["all", "all-decay-per-feature"])
def test_all_options_train_and_are_causal(options):
    model = _model(**options)
    tokens = torch.randint(0, 256, (2, 32))
    out = model(tokens)
    changed = tokens.clone()
    changed[:, 20:] = torch.randint(0, 256, (2, 12))
    assert torch.equal(model(changed)[:, :20], out[:, :20])
    F.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    attn = model.layers["0"].attention
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_optimizer_groups_and_parameter_counts():
    model = _model(**OPTIONS["all"])
    decay = {n for n, p in model.named_parameters() if not no_decay(n, p)}
    assert "layers.0.attention.wg.weight" in decay and "layers.0.attention.short_conv.q_weight" in decay
    assert "layers.0.attention.out_norm.weight" not in decay and "layers.0.attention.q_log_scale" not in decay
    base = _model()
    # per linear layer (2): out_norm 4x16, wg 64x64, log scales 4 + 2, kernels 4 x (64 + 32 + 32),
    # log decay rates 2
    extra = 2 * (64 + 64 * 64 + 4 + 2 + 4 * (64 + 32 + 32) + 2)
    assert model.parameter_counts()["linear_attention"] == base.parameter_counts()["linear_attention"] + extra
    args = model.model_args
    n0, f0 = base.model_args.get_nparams_and_flops(base, 64)
    n1, f1 = args.get_nparams_and_flops(model, 64)
    assert n1 - n0 == extra and f1 - f0 == 6 * extra


def test_compiled_block_matches_eager():
    model = _model(**OPTIONS["all"])
    block = model.layers["0"]
    x = torch.randn(1, 16, 64)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, model.freqs_cis, None), block(x, model.freqs_cis, None),
                               rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _model(**OPTIONS["all"])
    block = model.layers["0"]
    x = torch.randn(1, 16, 64, requires_grad=True)

    def grads(module):
        model.zero_grad()
        x.grad = None
        module(x, model.freqs_cis, None).square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    plain = grads(block)
    for a, b in zip(grads(checkpoint_wrapper(block, preserve_rng_state=False)), plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _config(toml, *overrides):
    return ConfigManager().parse_args(["--job.config_file", toml, *overrides])


BAD = [
    ("linear_attn_temperature", "0", "model.linear_attn_temperature = 0.0 is not allowed"),
    ("linear_attn_temperature", "-1", "model.linear_attn_temperature = -1.0 is not allowed"),
    ("linear_attn_temperature", "inf", "model.linear_attn_temperature = inf is not allowed"),
    ("linear_attn_short_conv", "1", "model.linear_attn_short_conv = 1 is not allowed"),
    ("linear_attn_short_conv", "-4", "model.linear_attn_short_conv = -4 is not allowed"),
    ("linear_attn_short_conv", "33", "model.linear_attn_short_conv = 33 is not allowed"),
    ("linear_attn_decay_rates", "channel",
     "model.linear_attn_decay_rates = 'channel' is not allowed: one of head, feature"),
    ("linear_attn_decay_rates", "feature",
     "model.linear_attn_decay_rates = 'feature' is not allowed: 'head' (the default) unless model.linear_attn_decay = true"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_values_name_the_key(key, value, message):
    import copy

    args = copy.deepcopy(hybrid_args["debugmodel"])
    cfg = _config(DEBUG_TOML, f"--model.{key}", value)
    with pytest.raises(ConfigError) as err:
        args.update_from_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert args.linear_attn_temperature == 1.0 and args.linear_attn_short_conv == 0  # untouched


def test_non_bool_switch_is_refused():
    import copy

    args = copy.deepcopy(hybrid_args["debugmodel"])
    cfg = _config(DEBUG_TOML)
    cfg.model.linear_attn_output_gate = 1
    with pytest.raises(ConfigError, match=r"^model.linear_attn_output_gate = 1 is not allowed: true or false$"):
        args.update_from_config(cfg)


def test_keys_reach_the_model_args():
    import copy

    args = copy.deepcopy(hybrid_args["debugmodel"])
    cfg = _config(DEBUG_TOML, "--model.linear_attn_temperature", "0.7", "--model.linear_attn_learned_temperature",
                  "--model.linear_attn_output_norm", "--model.linear_attn_output_gate",
                  "--model.linear_attn_short_conv", "4")
    args.update_from_config(cfg)
    assert (args.linear_attn_temperature, args.linear_attn_learned_temperature, args.linear_attn_output_norm,
            args.linear_attn_output_gate, args.linear_attn_short_conv) == (0.7, True, True, True, 4)


@pytest.mark.parametrize("key,value", [("linear_attn_output_gate", None), ("linear_attn_short_conv", "4"),
                                       ("linear_attn_temperature", "0.5")])
def test_oelm_refuses_the_options(key, value):
    import copy

    args = copy.deepcopy(oelm_args["debugmodel"])
    cfg = _config(OELM_TOML, f"--model.{key}", *([value] if value else []))
    with pytest.raises(ConfigError, match=rf"^model.{key} = .* is not allowed: unset for model.name = 'llama3_oelm' "
                                          r"\(it applies to llama3_mixed only\)$"):
        args.update_from_config(cfg)
    args.update_from_config(_config(OELM_TOML))  # the defaults are accepted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [OPTIONS["all"], ALL_PER_FEATURE], ids=["all", "all-decay-per-feature"])
def test_all_options_on_the_triton_path_compiled_bf16(options):
    from titan_linear.ops.efficient_attn import impl_name

    assert impl_name("cuda", torch.bfloat16, 16) == "triton"
    model = build(tiny_args(**options, max_seq_len=512), seed=0).cuda()
    tokens = torch.randint(0, 256, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(tokens).float()
        compiled = torch.compile(model)(tokens).float()
    reference = model(tokens)  # fp32
    assert torch.isfinite(compiled).all()
    for got in (eager, compiled):
        assert (got - reference).norm() / reference.norm() < 2e-2
    F.cross_entropy(compiled.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_decay_is_a_decayed_normalised_state():
    """The bias a·s on the keys is a decay γ = exp(−a) of the state: o_t = Σ_d p_t[d] ·
    Σ_{s≤t} γ^(t−s) exp(k_s[d]) v_s / Σ_{s≤t} γ^(t−s) exp(k_s[d]), written out here per (t, s);
    and the rates start at RetNet's γ_h = 1 − 2^(−5−h)."""
    from titan_linear.models.hybrid.linear_options import decayed_keys, initial_log_decay

    gamma = 1 - torch.exp(-torch.exp(initial_log_decay(3)).double())
    torch.testing.assert_close(gamma, torch.tensor([2.0**-5, 2.0**-6, 2.0**-7], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    log_decay = torch.tensor([-1.0, -4.0], dtype=torch.float64)
    got = efficient_attention(q, decayed_keys(k, log_decay, start=7).double(), v)
    a = torch.exp(log_decay)
    t, s = torch.arange(30.0)[:, None], torch.arange(30.0)[None, :]
    w = torch.exp(-a[:, None, None] * (t - s)).masked_fill(s > t, 0.0)  # (heads, t, s)
    num = torch.einsum("hts,hsd,hse->htde", w, torch.exp(k[0]), v[0])
    den = torch.einsum("hts,hsd->htd", w, torch.exp(k[0]))
    want = torch.einsum("htd,htde->hte", torch.softmax(q[0], -1), num / den[..., None])
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)


def test_decay_per_feature_decays_each_feature_at_its_rate():
    """With a rate per key feature (linear_attn_decay_rates = "feature") feature d of kv head h
    decays at its own γ = exp(−a[h, d]), written out per (t, s, d); the rates start spread from
    γ = 1 − 2^−2 to 1 − 2^−12 within every head; one 1-D parameter (no weight decay) of
    kv heads × head dim rates."""
    from titan_linear.models.hybrid.linear_options import decayed_keys, initial_log_decay

    gamma = 1 - torch.exp(-torch.exp(initial_log_decay(2, 11, "feature")).double())
    torch.testing.assert_close(gamma, (2.0 ** -torch.arange(2.0, 13.0, dtype=torch.float64)).repeat(2))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    log_decay = torch.linspace(-5.0, 0.5, 16, dtype=torch.float64)
    got = efficient_attention(q, decayed_keys(k, log_decay, start=3).double(), v)
    a = torch.exp(log_decay).view(2, 1, 1, 8)
    t, s = torch.arange(30.0)[:, None, None], torch.arange(30.0)[None, :, None]
    w = torch.exp(-a * (t - s)).masked_fill(s > t, 0.0)  # (heads, t, s, d)
    num = torch.einsum("htsd,hsd,hse->htde", w, torch.exp(k[0]), v[0])
    den = torch.einsum("htsd,hsd->htd", w, torch.exp(k[0]))
    want = torch.einsum("htd,htde->hte", torch.softmax(q[0], -1), num / den[..., None])
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    model = _model(**OPTIONS["decay_per_feature"])
    p = model.layers["0"].attention.k_log_decay
    assert p.shape == (2 * 16,) and no_decay("layers.0.attention.k_log_decay", p)

