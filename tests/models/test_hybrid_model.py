"""HybridTransformer: stock llama3 at ratio 0, drop-in linear layers otherwise."""

import torch
from torchtitan.models.llama3 import llama3_args, Transformer

from titan_linear.models.hybrid import LinearAttention, LinearTransformerBlock
from tests.helpers import build, debug_args


def _stock_debug(seed: int) -> Transformer:
    import copy

    args = copy.deepcopy(llama3_args["debugmodel"])
    args.max_seq_len = 64
    return build(args, seed=seed, cls=Transformer)


def test_ratio_zero_is_stock_llama3():
    hybrid = build(debug_args(), seed=3)
    stock = _stock_debug(seed=3)
    mp = {n: p.shape for n, p in hybrid.named_parameters()}
    sp = {n: p.shape for n, p in stock.named_parameters()}
    assert mp == sp
    for (n, a), (_, b) in zip(hybrid.named_parameters(), stock.named_parameters()):
        assert torch.equal(a, b), n
    tokens = torch.randint(0, 2048, (2, 32))
    assert torch.equal(hybrid(tokens), stock(tokens))
    assert not any(isinstance(b, LinearTransformerBlock) for b in hybrid.layers.values())


def test_linear_layers_are_drop_ins():
    args = debug_args(linear_attn_ratio=0.5, n_kv_heads=4)
    model = build(args)
    assert model.linear_layers == [1, 3, 5]
    for i, block in model.layers.items():
        is_lin = int(i) in model.linear_layers
        assert isinstance(block, LinearTransformerBlock) == is_lin
        assert isinstance(block.attention, LinearAttention) == is_lin
    names = {n for n, _ in model.named_parameters()}
    stock_names = {n for n, _ in build(debug_args(n_kv_heads=4)).named_parameters()}
    assert names == stock_names
    assert model.layers["1"].attention.wk.weight.shape == (4 * 16, 256)
    assert model.linear_layer_map.tolist() == [0, 1, 0, 1, 0, 1]


def test_hybrid_trains_and_is_causal():
    torch.manual_seed(0)
    model = build(debug_args(linear_attn_ratio=0.5, n_kv_heads=8))
    tokens = torch.randint(0, 2048, (2, 48))
    out = model(tokens)
    assert torch.isfinite(out).all()
    changed = tokens.clone()
    changed[:, 30:] = torch.randint(0, 2048, (2, 18))
    out2 = model(changed)
    torch.testing.assert_close(out[:, :30], out2[:, :30], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, 30:], out2[:, 30:])
    # a few optimizer steps on a fixed batch lower the loss; every parameter gets a gradient
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_layer_map_mismatch_on_load_names_both_maps():
    src = build(debug_args(linear_attn_ratio=0.5))
    dst = build(debug_args(linear_attn_ratio=1.0 / 3.0))
    try:
        dst.load_state_dict(src.state_dict())
    except ValueError as e:
        assert "SLSLSL" in str(e) and dst.model_args.layer_map in str(e)
    else:
        raise AssertionError("loading a different layer map must fail")
    same = build(debug_args(linear_attn_ratio=0.5), seed=9)
    same.load_state_dict(src.state_dict())
    assert torch.equal(same.output.weight, src.output.weight)


def test_parameter_report_adds_up():
    model = build(debug_args(linear_attn_ratio=0.5))
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_attn = 4 * 256 * 256
    assert counts["linear_attention"] == 3 * per_attn
    assert counts["softmax_attention"] == 3 * per_attn
    assert "SLSLSL" in model.describe()


def test_flops_count_linear_layers_as_linear():
    soft = debug_args()
    lin = debug_args(linear_attn_ratio=1.0)
    m_soft, m_lin = build(soft), build(lin)
    _, f_soft_2k = soft.get_nparams_and_flops(m_soft, 2048)
    _, f_soft_8k = soft.get_nparams_and_flops(m_soft, 8192)
    _, f_lin_2k = lin.get_nparams_and_flops(m_lin, 2048)
    _, f_lin_8k = lin.get_nparams_and_flops(m_lin, 8192)
    assert f_lin_2k == f_lin_8k  # linear layers: cost per token independent of seq_len
    assert f_soft_8k - f_soft_2k == 6 * 6 * 16 * 2 * 16 * (8192 - 2048)
