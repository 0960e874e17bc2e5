"""The attention op and the hybrid model on a CUDA GPU (skipped on CPU-only machines)."""

import pytest
import torch

from titan_linear.ops.efficient_attn import efficient_attention, efficient_attention_quadratic

# tests/conftest.py skips `gpu` tests on machines without CUDA.
pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _against(fn, ref_fn, q, k, v, do):
    """(out, grads) of fn on q, k, v and (ref, ref_grads) of ref_fn on fp32 copies of them."""
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do.to(q.dtype))
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = ref_fn(qr, kr, vr)
    return out, grads, ref, torch.autograd.grad(ref, (qr, kr, vr), do.float())


def _qkv(B, H, Hkv, T, D, dtype, key_scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(T * 7 + H)
    mk = lambda h, s=1.0: (torch.randn(B, h, T, D, device="cuda", generator=g) * s).to(dtype).requires_grad_()
    return mk(H), mk(Hkv, key_scale), mk(Hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,Hkv,T,D", [(2, 4, 4, 1, 64), (2, 4, 2, 100, 64), (1, 8, 2, 1000, 128)],
                         ids=lambda x: str(x))
def test_efficient_attention_cuda_matches_reference(B, H, Hkv, T, D, dtype):
    q, k, v = _qkv(B, H, Hkv, T, D, dtype)
    do = torch.randn(B, H, T, D, device="cuda")
    out, grads, ref, ref_grads = _against(efficient_attention, efficient_attention_quadratic, q, k, v, do)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    assert _rel(out, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        # Gradients that vanish in exact arithmetic (dq, dk at T = 1: the output is v) are
        # rounding noise in both; measure them against the incoming gradient's scale. With bf16
        # inputs the kernels' products take bf16 operands (2^-9), and the terms that cancel are
        # of size |do| |v|, so the noise floor is ~1e-2 |do|, not fp32's ~1e-6.
        scale = max(r.float().norm().item(), (1e-3 if dtype == torch.float32 else 1e-1) * do.norm().item())
        assert (g.float() - r.float()).norm().item() / scale < tol


def test_efficient_attention_cuda_large_keys_finite():
    q, k, v = _qkv(1, 4, 4, 512, 64, torch.bfloat16, key_scale=100.0)
    out = efficient_attention(q, k, v)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_efficient_attention_cuda_compiles_fullgraph():
    q, k, v = _qkv(2, 4, 2, 256, 64, torch.bfloat16)
    compiled = torch.compile(efficient_attention, fullgraph=True)
    assert _rel(compiled(q, k, v), efficient_attention(q, k, v)) < 1e-2


def test_hybrid_model_compiled_blocks_train_on_cuda():
    from tests.helpers import debug_args
    from titan_linear.models.hybrid import HybridTransformer

    args = debug_args(linear_attn_ratio=0.5, n_kv_heads=8)
    with torch.device("meta"):
        model = HybridTransformer(args)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block, fullgraph=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 2048, (4, 65), device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


# --------------------------------------------------------------------------------------
# The Triton path (titan_linear/ops/efficient_attn/triton_op.py)
# --------------------------------------------------------------------------------------


def test_efficient_attention_dispatches_to_triton_on_cuda():
    from titan_linear.ops.efficient_attn import impl_name

    assert impl_name("cuda", torch.bfloat16, 64) == "triton"
    assert impl_name("cuda", torch.float64, 64) == "torch (chunked)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_efficient_attention_triton_long_sequence_matches_chunked(dtype, D):
    """Many chunks and scan blocks (T = 5000: 10 chunks of 512 in bf16, 20 of 256 in fp32; scan
    blocks of 8), grouped heads, vs the torch path."""
    from titan_linear.ops.efficient_attn import efficient_attention_chunked, efficient_attention_triton

    q, k, v = _qkv(1, 4, 2, 5000, D, dtype, key_scale=3.0)
    do = torch.randn(1, 4, 5000, D, device="cuda")
    out, grads, ref, ref_grads = _against(efficient_attention_triton, efficient_attention_chunked, q, k, v, do)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(out, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < tol


@pytest.mark.parametrize("key_scale", [20.0, 100.0])
def test_efficient_attention_triton_large_keys_match_reference(key_scale):
    from titan_linear.ops.efficient_attn import efficient_attention_triton

    q, k, v = _qkv(1, 4, 4, 700, 64, torch.bfloat16, key_scale=key_scale)
    do = torch.randn(1, 4, 700, 64, device="cuda")
    out, grads, ref, ref_grads = _against(efficient_attention_triton, efficient_attention_quadratic, q, k, v, do)
    assert _rel(out, ref) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert _rel(g, r) < 3e-2


def test_efficient_attention_triton_value_mean_keeps_dq_accurate():
    """Values sharing a mean of 16 standard deviations (trained layers have such means): the
    backward's value shift keeps the mean's bf16 rounding out of dq and dk (without it, dq was
    off by 20 % in the interpreter and by up to 6 % in training on an H100)."""
    from titan_linear.ops.efficient_attn import efficient_attention_chunked, efficient_attention_triton

    q, k, v = _qkv(1, 8, 2, 3000, 64, torch.bfloat16)
    v = (v.detach().float() + 16 * torch.randn(64, device="cuda")).to(torch.bfloat16).requires_grad_()
    do = torch.randn(1, 8, 3000, 64, device="cuda")
    out, grads, ref, ref_grads = _against(efficient_attention_triton, efficient_attention_chunked, q, k, v, do)
    assert _rel(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 2e-2


def test_efficient_attention_triton_custom_op_passes_opcheck():
    from titan_linear.ops.efficient_attn.triton_op import efficient_attn_fwd
    from titan_linear.ops.efficient_attn.triton_tuning import launch_config

    q, k, v = _qkv(1, 4, 2, 300, 64, torch.bfloat16)
    torch.library.opcheck(efficient_attn_fwd, (q, k, v, *launch_config(64, torch.bfloat16)))


def test_efficient_attention_triton_memory_is_linear_in_seqlen():
    from titan_linear.ops.efficient_attn import efficient_attention_triton

    peaks = {}
    for T in (8192, 32768):
        q, k, v = _qkv(1, 8, 8, T, 64, torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = efficient_attention_triton(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        torch.cuda.synchronize()
        peaks[T] = torch.cuda.max_memory_allocated() - base
    # 4x the tokens: at most ~4x the memory (a T^2 term would give 16x).
    assert peaks[32768] < 4.5 * peaks[8192], peaks


@pytest.mark.parametrize("tiles,D", [(dict(chunk=128, sub_chunk=32, warps=8), 64),
                                     (dict(chunk=64, sub_chunk=16, warps=4, scan_chunks=2, scan_block=32), 64),
                                     (dict(v_split=2, warps=4), 128), (dict(v_split=4, warps=4), 64),
                                     (dict(fill=64), 128), (dict(fill=64, warps=4), 64), (dict(fill=32), 128)],
                         ids=["128-32-8", "64-16-4-scan2x32", "d128-v_split2-4warps", "d64-v_split4",
                              "d128-fill-64", "d64-fill-64", "d128-fill-32"])
def test_efficient_attention_triton_other_tiles_match_table(tiles, D):
    """Candidates a tune sweep passes (triton_tuning.override) compute the same function as the
    table's entry; the backward runs outside the override, with its forward's tiles."""
    from titan_linear.ops.efficient_attn import efficient_attention_triton
    from titan_linear.ops.efficient_attn.triton_tuning import override

    q, k, v = _qkv(1, 4, 2, 3000, D, torch.bfloat16)
    do = torch.randn(1, 4, 3000, D, device="cuda", dtype=torch.bfloat16)
    ref = efficient_attention_triton(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    with override(**tiles):
        out = efficient_attention_triton(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert _rel(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 2e-2
