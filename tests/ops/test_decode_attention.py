"""ops/decode_attention.py: the split-over-positions decode attention kernel against an fp64
softmax over the filled positions, on the CPU under Triton's interpreter (in one child process,
as tests/inference/test_gemv.py does; the interpreter multiplies bf16 `tl.dot` operands wrongly,
so fp32 and fp16 there) and on a GPU in bf16; and the compiled decode step that takes it.
"""

import pytest
import torch

from tests.helpers import run_interpreted

# (bs, n_kv, rows, d, capacity, pos, splits): grouped rows (4), one row, a group that is no
# power of two (5) at head dim 64; splits automatic (0), one, and several that do not divide the
# storage, including more splits than positions; pos at the first, a middle and the last position.
CASES = [
    (2, 3, 4, 32, 200, 130, 0),
    (2, 3, 4, 32, 200, 130, 1),
    (2, 3, 4, 32, 200, 130, 7),
    (1, 2, 1, 16, 64, 0, 3),
    (1, 1, 5, 64, 300, 299, 5),
    (1, 2, 4, 16, 40, 17, 64),
]
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def reference(q, k, v, pos: int) -> torch.Tensor:
    """fp64 softmax(q kᵀ / √d) v over positions 0..pos."""
    q, k, v = q.double(), k[:, :, : pos + 1].double(), v[:, :, : pos + 1].double()
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def _inputs(bs, n_kv, rows, d, capacity, pos, dtype, device="cpu"):
    g = torch.Generator().manual_seed(bs * 1000 + capacity + pos)
    # q as a view with other strides than a fresh tensor; scores spread over a few units
    q = (2 * torch.randn(bs, rows, n_kv, d, generator=g)).transpose(1, 2)
    k, v = torch.randn(2, bs, n_kv, capacity, d, generator=g)
    # Positions past pos hold NaN: a kernel that read them would return NaN.
    k[:, :, pos + 1:] = float("nan")
    v[:, :, pos + 1:] = float("nan")
    return [t.to(device, dtype) for t in (q, k, v)]


def _kernel_errors(bs, n_kv, rows, d, capacity, pos, splits, dtype) -> dict:
    from titan_linear.ops import decode_attention as da

    q, k, v = _inputs(bs, n_kv, rows, d, capacity, pos, getattr(torch, dtype))
    got = da.decode_attention(q, k, v, torch.tensor([pos]), splits)
    ref = reference(q, k, v, pos)
    return {"error": ((got.double() - ref).abs().max() / ref.abs().max()).item(), "shape": list(got.shape),
            "dtype": str(got.dtype), "splits": splits or da.auto_splits(bs, n_kv, q.device)}


def _opcheck() -> dict:
    from titan_linear.ops import decode_attention as da

    q, k, v = _inputs(1, 2, 4, 16, 70, 50, torch.float32)
    report = torch.library.opcheck(da.decode_attention_splits, (q, k, v, torch.tensor([50]), 3, 64))
    return {name: str(result) for name, result in report.items()}


def _compiled_step_error() -> dict:
    """The compiled fixed-shape step of a tiny hybrid (aot_eager), which takes the kernel for its
    softmax layers, against the eager decode_step (SDPA over the filled positions), across KV
    buckets of 4, 8 and 16 positions."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from titan_linear.inference import prepare_model
    from titan_linear.inference.graph_decode import compiled_step
    from tests.helpers import build, decode_logits
    from tests.models.test_linear_options import tiny_args

    counter = CompileCounterWithBackend("aot_eager")
    model = prepare_model(build(tiny_args(linear_attn_layers=(0,)), seed=0), torch.float32, max_len=32)
    tokens = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(0))
    ref = decode_logits(model, tokens, 11, max_len=16, min_bucket=4)
    got = decode_logits(model, tokens, 11, compiled_step(backend=counter), kv_splits=3, max_len=16, min_bucket=4)
    # per step, relative to that step's largest logit
    error = ((got - ref).abs().amax((0, 2)) / ref.abs().amax((0, 2))).max().item()
    return {"error": error, "frames": counter.frame_count}


@pytest.mark.parametrize("bad", [-1, 2.0, True])
def test_decode_attention_refuses_splits_that_are_not_integers_from_zero(bad):
    from titan_linear.ops.decode_attention import decode_attention

    q, k, v = _inputs(1, 2, 4, 16, 70, 50, torch.float32)
    with pytest.raises(ValueError, match=f"kv_splits = {bad!r} is not allowed: an integer >= 0"):
        decode_attention(q, k, v, torch.tensor([50]), bad)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    code = ("import json, tests.ops.test_decode_attention as t\n"
            "from titan_linear.ops import decode_attention as da\n"
            "da.DEVICES = ('cuda', 'cpu')\n"
            "print(json.dumps({'kernel': {dt: [t._kernel_errors(*c, dt) for c in t.CASES] for dt in ('float32', 'float16')},\n"
            "                  'opcheck': t._opcheck(), 'step': t._compiled_step_error()}))")
    return run_interpreted(code)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU tests run the compiled kernel")


@no_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=["B{}-H{}-R{}-d{}-C{}-pos{}-s{}".format(*c) for c in CASES])
def test_decode_attention_interpreted_matches_fp64(interpreted, index, dtype):
    bs, n_kv, rows, d, capacity, pos, splits = CASES[index]
    got = interpreted["kernel"][dtype][index]
    # finite (nothing past pos was read: it holds NaN) and within the dtype's rounding
    assert got["error"] < TOL[dtype], got
    assert got["shape"] == [bs, n_kv, rows, d] and got["dtype"] == f"torch.{dtype}"


@no_cuda
def test_automatic_splits_fill_the_gpu(interpreted):
    # 132 SMs (the interpreter's stand-in), 6 kv heads: about two programs per SM
    assert interpreted["kernel"]["float32"][0]["splits"] == 44


@no_cuda
def test_decode_attention_custom_op_passes_opcheck(interpreted):
    assert set(interpreted["opcheck"].values()) == {"SUCCESS"}, interpreted["opcheck"]


@no_cuda
def test_compiled_step_with_the_kernel_matches_eager_decode(interpreted):
    assert interpreted["step"]["error"] < 1e-5, interpreted["step"]
    assert interpreted["step"]["frames"] == 1  # one compile for every bucket


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("splits", [0, 1, 16])
def test_decode_attention_bf16_on_gpu_matches_fp64(d, splits):
    from titan_linear.ops.decode_attention import decode_attention

    capacity, pos = 5000, 4321
    q, k, v = _inputs(2, 8, 4, d, capacity, pos, torch.bfloat16, "cuda")
    got = decode_attention(q, k, v, torch.tensor([pos], device="cuda"), splits)
    ref = reference(q, k, v, pos)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < TOL["bfloat16"]
