"""Causal efficient attention: the chunked and recurrent forms against the quadratic reference.

The properties are those of docs/attention.md ("Checks every implementation passes"). Exactness
checks run in float64, where every implementation must agree to ~1e-10; fp32 and bf16 runs are
compared with the float64 reference by relative RMSE, as fla's tests do.
"""

import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titan_linear.ops.efficient_attn import (
    RecurrentState,
    efficient_attention,
    efficient_attention_chunked,
    efficient_attention_quadratic,
    efficient_attention_recurrent,
    efficient_attention_step,
)


def _inputs(B, H, T, D, n_kv_heads=None, d_v=None, key_scale=2.0, dtype=torch.float64, seed=42):
    """Leaf tensors q (B, H, T, D), k (B, n_kv, T, D) scaled by key_scale, v (B, n_kv, T, d_v)."""
    gen = torch.Generator().manual_seed(seed)
    n_kv_heads = n_kv_heads or H
    q = torch.randn(B, H, T, D, generator=gen)
    k = torch.randn(B, n_kv_heads, T, D, generator=gen) * key_scale
    v = torch.randn(B, n_kv_heads, T, d_v or D, generator=gen)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _forward_backward(fn, q, k, v, seed=0):
    """fn's output and (dq, dk, dv) for a fixed random output gradient."""
    o = fn(q, k, v)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.dtype)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _as_float64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


def _rel_rmse(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def _recurrent(q, k, v):
    return efficient_attention_recurrent(q, k, v)[0]


def _assert_all_close(got, want, atol=1e-10, rtol=1e-10):
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


SHAPES = [(1, 1, 2, 16), (2, 7, 2, 8), (1, 63, 2, 16), (2, 65, 1, 8), (1, 130, 2, 8)]


@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("B,T,H,D", SHAPES, ids=[f"B{b}-T{t}-H{h}-D{d}" for b, t, h, d in SHAPES])
def test_efficient_attention_chunked_matches_quadratic(B, T, H, D, chunk_size):
    q, k, v = _inputs(B, H, T, D)
    got = _forward_backward(lambda *x: efficient_attention_chunked(*x, chunk_size=chunk_size), q, k, v)
    _assert_all_close(got, _forward_backward(efficient_attention_quadratic, q, k, v))


def test_efficient_attention_chunked_many_chunks_and_other_sub_chunk():
    # 300 positions in chunks of 32: 10 chunks (odd levels in the scan), sub-chunks of 8, d_v != d_k.
    def chunked(q, k, v):
        return efficient_attention_chunked(q, k, v, chunk_size=32, sub_chunk_size=8)

    q, k, v = _inputs(1, 2, 300, 8, d_v=5)
    got = _forward_backward(chunked, q, k, v)
    _assert_all_close(got, _forward_backward(efficient_attention_quadratic, q, k, v))


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 2, 8), (2, 37, 2, 8)], ids=["B1-T1-H2-D8", "B2-T37-H2-D8"])
def test_efficient_attention_recurrent_matches_quadratic(B, T, H, D):
    q, k, v = _inputs(B, H, T, D)
    want = _forward_backward(efficient_attention_quadratic, q, k, v)
    _assert_all_close(_forward_backward(_recurrent, q, k, v), want)


ALL_FORMS = [efficient_attention, _recurrent, efficient_attention_quadratic]


@pytest.mark.parametrize("fn", ALL_FORMS, ids=lambda f: f.__name__)
def test_gqa_head_h_reads_kv_head_h_div_group(fn):
    # 4 query heads on 2 kv heads: heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1 (SDPA's
    # enable_gqa). The expected values come from copying each kv head for its group of queries.
    q, k, v = _inputs(2, 4, 40, 8, n_kv_heads=2)

    def copied_kv(q, k, v):
        return efficient_attention_quadratic(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))

    want = _forward_backward(copied_kv, q, k, v)
    _assert_all_close(_forward_backward(fn, q, k, v), want)
    # The other mapping (head h reads kv head h % 2) gives other outputs, so the check above can fail.
    wrong = efficient_attention_quadratic(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))
    assert not torch.allclose(wrong, want[0], atol=1e-3)


@pytest.mark.parametrize("fn", [efficient_attention, _recurrent], ids=lambda f: f.__name__)
@pytest.mark.parametrize("t0", [0, 15, 16, 47, 70])
def test_causality_later_tokens_change_nothing_before(fn, t0):
    # fp32 at key scale 20, where the global-max trick already leaks the future; the later tokens
    # get keys at scale 100. Outputs up to t0 must not move at all, nor must their gradients reach
    # positions after t0.
    q, k, v = _inputs(1, 4, 100, 8, n_kv_heads=2, key_scale=20.0, dtype=torch.float32)
    q2, k2, v2 = _inputs(1, 4, 100, 8, n_kv_heads=2, key_scale=100.0, dtype=torch.float32, seed=7)
    later = torch.arange(100) > t0
    pairs = ((q, q2), (k, k2), (v, v2))
    mix = [torch.where(later[:, None], b, a).detach().requires_grad_() for a, b in pairs]
    o, o_mixed = fn(q, k, v), fn(*mix)
    assert torch.equal(o[:, :, : t0 + 1], o_mixed[:, :, : t0 + 1])
    assert not torch.equal(o[:, :, t0 + 1 :], o_mixed[:, :, t0 + 1 :])
    for grad in torch.autograd.grad(o_mixed[:, :, : t0 + 1].sum(), mix):
        assert torch.equal(grad[:, :, t0 + 1 :], torch.zeros_like(grad[:, :, t0 + 1 :]))


@pytest.mark.parametrize("key_scale", [50.0, 100.0], ids=lambda s: f"x{s:g}")
def test_efficient_attention_large_keys_finite_and_exact(key_scale):
    q, k, v = _inputs(2, 4, 130, 16, n_kv_heads=2, key_scale=key_scale, dtype=torch.float32)
    want = _forward_backward(efficient_attention_quadratic, *_as_float64(q, k, v))
    # fp32 keeps ~1e-6 here; 2e-5 also catches a backward that loses |k| · eps (4e-4 at x100).
    for fn in (efficient_attention, _recurrent):
        got = _forward_backward(fn, q, k, v)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert torch.isfinite(a).all(), f"{fn.__name__} {name} not finite"
            assert _rel_rmse(a, b) < 2e-5, f"{fn.__name__} {name}: rel RMSE {_rel_rmse(a, b):.2e}"
    # In float64 the chunked form is the reference, up to rounding.
    q64, k64, v64 = _as_float64(q, k, v)
    _assert_all_close(_forward_backward(efficient_attention, q64, k64, v64), want, atol=1e-9, rtol=1e-9)


def test_single_token_returns_its_value():
    # With one position every weight is exp(k_0 − z_0) = 1, so o_0 = v_0 of the head's kv head.
    q, k, v = _inputs(3, 4, 1, 8, n_kv_heads=2, key_scale=100.0, dtype=torch.float32)
    for fn in (efficient_attention, _recurrent):
        torch.testing.assert_close(fn(q, k, v), v.repeat_interleave(2, 1), atol=1e-6, rtol=1e-6)


def test_efficient_attention_bf16_close_to_fp32_reference():
    q, k, v = _inputs(2, 4, 130, 16, n_kv_heads=2, key_scale=5.0, dtype=torch.bfloat16)
    got = _forward_backward(efficient_attention, q, k, v)
    upcast = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = _forward_backward(efficient_attention_quadratic, *upcast)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.bfloat16, name
        assert _rel_rmse(a, b) < 2e-2, f"{name}: rel RMSE {_rel_rmse(a, b):.2e}"


@pytest.mark.parametrize("split", [1, 23, 49])
def test_efficient_attention_recurrent_continues_from_state(split):
    q, k, v = _inputs(2, 4, 50, 8, n_kv_heads=2, d_v=6)
    o_full, state_full = efficient_attention_recurrent(q, k, v, output_final_state=True)
    first = [x[:, :, :split] for x in (q, k, v)]
    second = [x[:, :, split:] for x in (q, k, v)]
    o1, state = efficient_attention_recurrent(*first, output_final_state=True)
    o2, state_end = efficient_attention_recurrent(*second, initial_state=state, output_final_state=True)
    assert isinstance(state, RecurrentState)
    assert state.S.shape == (2, 2, 8, 6) and state.z.shape == (2, 2, 8)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o_full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state_end.S, state_full.S, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state_end.z, state_full.z, atol=1e-12, rtol=1e-12)


def test_efficient_attention_step_loop_matches_parallel():
    q, k, v = _inputs(2, 4, 40, 8, n_kv_heads=2, key_scale=20.0, dtype=torch.float32)
    state, outputs = None, []
    for t in range(40):
        token = [x[:, :, t : t + 1] for x in (q, k, v)]
        o_t, state = efficient_attention_step(*token, state)
        assert o_t.shape == (2, 4, 1, 8) and o_t.dtype == torch.float32
        outputs.append(o_t)
    parallel = efficient_attention(q, k, v)
    torch.testing.assert_close(torch.cat(outputs, dim=2), parallel, atol=1e-5, rtol=1e-5)
    _, final = efficient_attention_recurrent(q, k, v, output_final_state=True)
    torch.testing.assert_close(state.S, final.S)
    torch.testing.assert_close(state.z, final.z)


@pytest.mark.parametrize("key_scale", [1.0, 100.0], ids=lambda s: f"x{s:g}")
@pytest.mark.parametrize("fn", ALL_FORMS, ids=lambda f: f.__name__)
def test_attention_rows_are_causal_and_sum_to_one(fn, key_scale):
    # With v = identity (d_v = T) the output is the implied T × T attention matrix itself.
    T = 40
    q, k, _ = _inputs(1, 2, T, 8, key_scale=key_scale, dtype=torch.float32)
    v = torch.eye(T).expand(1, 2, T, T)
    attn = fn(q, k, v).detach()
    assert (attn >= 0).all()
    assert torch.equal(attn.triu(1), torch.zeros_like(attn))
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, T), atol=1e-5, rtol=0)
    # and v = ones gives ones
    ones = torch.ones(1, 2, T, 3)
    torch.testing.assert_close(fn(q, k, ones), ones, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", ALL_FORMS, ids=lambda f: f.__name__)
def test_transposed_inputs_as_the_model_passes_them(fn):
    # torchtitan's attention hands over (bs, seqlen, heads, d) projections transposed to
    # (bs, heads, seqlen, d): non-contiguous views, which must give the same result.
    q, k, v = _inputs(2, 4, 50, 8, n_kv_heads=2)
    views = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    assert not views[0].is_contiguous()
    _assert_all_close(_forward_backward(fn, *views), _forward_backward(fn, q, k, v))


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_efficient_attention_memory_is_linear_in_seqlen():
    # The largest tensor of forward + backward is the 16 × T × d sub-chunk block, so doubling T
    # doubles it; any T × T tensor (4M elements at T = 2048) would break both checks.
    largest = {}
    for T in (1024, 2048):
        q, k, v = _inputs(1, 2, T, 8, n_kv_heads=1, dtype=torch.float32)
        with _LargestTensor() as mode:
            efficient_attention(q, k, v).sum().backward()
        largest[T] = mode.numel
    assert largest[2048] == 2 * largest[1024]
    assert largest[2048] <= 16 * 2048 * 8


def test_bad_shapes_raise_value_error_naming_them():
    q, k, v = _inputs(1, 3, 8, 4, n_kv_heads=2)
    with pytest.raises(ValueError, match="n_heads=3 must be a multiple of n_kv_heads=2"):
        efficient_attention(q, k, v)
    q, k, v = _inputs(1, 2, 8, 4)
    with pytest.raises(ValueError, match="chunk_size=24 must be a multiple of sub_chunk_size=16"):
        efficient_attention_chunked(q, k, v, chunk_size=24)
    with pytest.raises(ValueError, match="one token"):
        efficient_attention_step(q, k, v)


def _can_compile_cpu() -> bool:
    """Inductor on the CPU needs a C++ compiler."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("clang++") is not None


@pytest.mark.skipif(not _can_compile_cpu(), reason="torch.compile's CPU backend needs a C++ compiler")
def test_efficient_attention_compiles_fullgraph():
    # T = 64 in chunks of 16: padding-free, but four chunks, so the scan is compiled too.
    def attend(q, k, v):
        return efficient_attention(q, k, v) + efficient_attention_chunked(q, k, v, chunk_size=16)

    q, k, v = _inputs(1, 4, 64, 16, n_kv_heads=2, dtype=torch.float32)
    got = _forward_backward(torch.compile(attend, fullgraph=True), q, k, v)
    _assert_all_close(got, _forward_backward(attend, q, k, v), atol=1e-5, rtol=1e-5)
