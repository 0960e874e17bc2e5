"""ops/gemv.py: the Triton matrix-vector kernel against an fp64 product, its launch heuristic, and
use_gemv (models/fused.py) keeping a decode step's logits.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 before triton is
first imported), so those checks run in one child process, as tests/ops/test_triton_attn.py
does. The interpreter multiplies bf16 operands of `tl.dot` wrongly, so the dot path (2-16 rows)
is checked there in fp32 and fp16; bf16 takes the elementwise path (1 row), and the GPU test
checks bf16 on both.
"""

import pytest
import torch

from titan_linear.inference import prefill, prepare_model
from titan_linear.models.fused import fuse_projections, use_gemv
from titan_linear.ops import gemv
from tests.helpers import build, decode_logits, run_interpreted
from tests.models.test_linear_options import OPTIONS, tiny_args

# (rows, N, K, dtype, override): one row with N past the last full tile; one row, bf16, K in 4
# slices of 2 steps; the heuristic's own split (13 tiles of 1024 columns: 4 slices); the dot
# path in fp32 over 2 slices and 3 rows; 16 rows of fp16, 4 slices of 16-column steps, N = 130.
CASES = [
    (1, 100, 256, "float32", {}),
    (1, 100, 512, "bfloat16", dict(split=4, block_k=64)),
    (1, 200, 1024, "float32", {}),
    (3, 70, 512, "float32", dict(split=2)),
    (16, 130, 256, "float16", dict(split=4, block_k=16)),
    (5, 64, 128, "float16", {}),
]
# Relative to the product's largest entry: the output's own rounding, 2^-11 (fp16), and 2^-7 for bf16
# (the interpreter truncates fp32 to bf16 where a GPU rounds to nearest).
TOL = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3}


def _kernel_errors(rows, n, k, dtype, fields) -> dict:
    """The kernel on seeded inputs: its error against fp64, whether a second call is bitwise the
    same, the config it ran, and whether it left the split-K counters at zero."""
    g = torch.Generator().manual_seed(rows * 1000 + n)
    dt = getattr(torch, dtype)
    x, w = torch.randn(rows, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
    with gemv.override(**fields):
        cfg = gemv.launch_config(rows, n, k)
        y = gemv.gemv(x, w, *cfg)
        again = gemv.gemv(x, w, *cfg)
    ref = x.double() @ w.double().T
    return {"error": ((y.double() - ref).abs().max() / ref.abs().max()).item(), "dtype": str(y.dtype),
            "shape": list(y.shape), "same": torch.equal(y, again), "config": cfg._asdict(),
            "counters_zero": not gemv._counters(torch.device("cpu")).any().item()}


def _opcheck() -> list[dict]:
    """torch.library.opcheck of the custom op on both paths, split-K: schema, fake tensor (what
    torch.compile traces with), AOT dispatch with dynamic shapes."""
    x1, x3, w = torch.randn(1, 256), torch.randn(3, 256), torch.randn(70, 256)
    return [torch.library.opcheck(torch.ops.titan_linear.gemv.default, (x, w, *cfg))
            for x, cfg in ((x1, gemv.GemvConfig(16, 64, 4)), (x3, gemv.GemvConfig(64, 64, 2, dot=True)))]


def _model_errors() -> dict:
    """A tiny hybrid model (linear, softmax, linear layers, every linear option) in fp16 on the
    CPU, the kernel allowed there: decode logits with use_gemv against without, at batch 1 (the
    elementwise path) and 2 (the dot path), fused and not; the kernel's calls per decode step
    and in a 20-token prefill; and the fixed-shape step through torch.compile (aot_eager: the
    custom op's fake while tracing, the kernel when run) against the eager use_gemv decode."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from titan_linear.inference.graph_decode import compiled_step

    import torch.nn.functional as F

    gemv.DEVICES = ("cuda", "cpu")
    calls = {"kernel": 0, "F.linear": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    gemv.gemv = counted("kernel", gemv.gemv)
    F.linear = counted("F.linear", F.linear)
    model = prepare_model(build(tiny_args(**OPTIONS["all"]), seed=0), torch.float16, max_len=64)
    out = {}
    for batch in (1, 2):
        tokens = torch.randint(0, 256, (batch, 24), generator=torch.Generator().manual_seed(batch))
        for fused in (False, True):
            fuse_projections(model, on=fused)
            calls.update({"kernel": 0, "F.linear": 0})
            ref = decode_logits(use_gemv(model, on=False), tokens, 4)
            products = dict(calls)
            use_gemv(model)
            calls.update({"kernel": 0, "F.linear": 0})
            got = decode_logits(model, tokens, 4)
            with_gemv = dict(calls)
            calls.update({"kernel": 0, "F.linear": 0})
            prefill(model, tokens[:, :20], max_len=24)
            scale = ref.float().abs().max()
            out[f"B{batch}-fused{fused}"] = {"error": ((got.float() - ref.float()).abs().max() / scale).item(),
                                             "products": products, "with_gemv": with_gemv, "prefill": dict(calls)}
    # compiled: batch 2, fused, gemv on
    step = compiled_step(backend=CompileCounterWithBackend("aot_eager"))
    ref = decode_logits(model, tokens, 4)
    got = decode_logits(model, tokens, 4, step)
    out["compiled"] = {"error": ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()}
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    code = ("import json, tests.inference.test_gemv as t\n"
            "print(json.dumps({'kernel': [t._kernel_errors(*c) for c in t.CASES], 'opcheck': t._opcheck(),\n"
            "                  'model': t._model_errors()}))")
    return run_interpreted(code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU tests run the compiled kernel")
@pytest.mark.parametrize("index", range(len(CASES)), ids=["M{}-N{}-K{}-{}".format(*c[:4]) for c in CASES])
def test_gemv_interpreted_matches_fp64(interpreted, index):
    rows, n, k, dtype, fields = CASES[index]
    got = interpreted["kernel"][index]
    assert got["error"] < TOL[dtype], got
    assert got["shape"] == [rows, n] and got["dtype"] == f"torch.{dtype}"
    # deterministic split-K sums, and counters left ready for the next launch
    assert got["same"] and got["counters_zero"], got
    assert got["config"]["dot"] == (rows > 1) and all(got["config"][f] == v for f, v in fields.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU tests run the compiled kernel")
def test_split_k_cases_really_split(interpreted):
    assert [c["config"]["split"] for c in interpreted["kernel"]] == [1, 4, 4, 2, 4, 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU tests run the compiled kernel")
def test_gemv_custom_op_passes_opcheck(interpreted):
    for report in interpreted["opcheck"]:
        assert set(report.values()) == {"SUCCESS"}, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU tests run the compiled kernel")
def test_use_gemv_interpreted_keeps_decode_logits(interpreted):
    model = interpreted["model"]
    for case in ("B1-fusedFalse", "B1-fusedTrue", "B2-fusedFalse", "B2-fusedTrue"):
        # fp16 logits of two summation orders (the kernel's fp32 sums, CPU F.linear's); a wrong
        # product gives O(1)
        assert model[case]["error"] < 1e-2, (case, model[case])
        # every product the decode takes without use_gemv (a 3-token prefill, 4 steps), and
        # only those, goes to the kernel with it
        products, with_gemv = model[case]["products"], model[case]["with_gemv"]
        assert products["kernel"] == 0 and products["F.linear"] > 0, (case, model[case])
        assert with_gemv == {"kernel": products["F.linear"], "F.linear": 0}, (case, model[case])
        # a 20-token prefill: its (bs · 20)-row products take F.linear, the head on the last
        # position the kernel
        assert model[case]["prefill"]["kernel"] == 1 and model[case]["prefill"]["F.linear"] > 0, (case, model[case])
    # fusion: fewer products
    assert model["B1-fusedTrue"]["products"]["F.linear"] < model["B1-fusedFalse"]["products"]["F.linear"]
    assert model["compiled"]["error"] < 1e-2, model["compiled"]


def test_use_gemv_falls_back_on_cpu_and_switches_back():
    model = prepare_model(build(tiny_args(**OPTIONS["all"]), seed=0), torch.float32, max_len=64)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    names = set(model.state_dict())
    ref = decode_logits(model, tokens, 5)
    use_gemv(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m) is gemv.GemvLinear for m in linears) and model.output in linears
    assert set(model.state_dict()) == names
    # CPU fp32: not a kernel input, so F.linear itself: the same logits bit for bit
    assert torch.equal(decode_logits(model, tokens, 5), ref)
    fuse_projections(model)
    torch.testing.assert_close(decode_logits(model, tokens, 5), ref, rtol=1e-5, atol=1e-5)
    use_gemv(model, on=False)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_supports_only_few_rows_of_cuda_16_bit_inputs():
    w = torch.empty(32, 64, dtype=torch.bfloat16)
    assert not gemv.supports(torch.empty(1, 64, dtype=torch.bfloat16), w)  # on the CPU
    try:
        gemv.DEVICES = ("cuda", "cpu")
        assert gemv.supports(torch.empty(2, 1, 64, dtype=torch.bfloat16), w)
        assert not gemv.supports(torch.empty(17, 64, dtype=torch.bfloat16), w)  # a prefill's rows
        assert not gemv.supports(torch.empty(1, 64), w.float())  # fp32
        assert not gemv.supports(torch.empty(1, 64, dtype=torch.bfloat16), w, torch.empty(32, dtype=torch.bfloat16))
        w48 = torch.empty(32, 48, dtype=torch.bfloat16)[:, :40]
        assert not gemv.supports(torch.empty(1, 40, dtype=torch.bfloat16), w48)  # K not a multiple of 16
    finally:
        gemv.DEVICES = ("cuda",)


def test_launch_config_at_the_1b_decode_shapes():
    # (rows, N, K) -> (block_n, block_k, split, dot) on 132 SMs (launch_config's docstring)
    expected = {
        (1, 128256, 2048): (16, 512, 1, False),  # output head
        (1, 16384, 2048): (16, 512, 1, False),  # fused w1·w3
        (1, 3072, 2048): (16, 512, 4, False),  # fused q·k·v
        (1, 2048, 2048): (16, 256, 8, False),  # wo
        (1, 2048, 8192): (16, 512, 8, False),  # w2
        (4, 2048, 8192): (64, 128, 32, True),
        (16, 3072, 2048): (64, 128, 8, True),
    }
    for (rows, n, k), want in expected.items():
        cfg = gemv.launch_config(rows, n, k, sms=132)
        assert (cfg.block_n, cfg.block_k, cfg.split, cfg.dot) == want, (rows, n, k, cfg)
        programs = -(-n // cfg.block_n) * cfg.split
        assert programs >= 4 * 132 or k // cfg.split < 512, (rows, n, k, programs)


def test_override_replaces_fields_nests_restores_and_is_checked():
    base = gemv.launch_config(1, 2048, 2048)
    with gemv.override(split=2):
        with gemv.override(block_k=128, warps=8):
            assert gemv.launch_config(1, 2048, 2048) == base._replace(split=2, block_k=128, warps=8)
        assert gemv.launch_config(1, 2048, 2048) == base._replace(split=2)
    assert gemv.launch_config(1, 2048, 2048) == base
    with pytest.raises(TypeError, match="unknown fields"):
        with gemv.override(BK=64):
            pass
    bad = [(dict(split=3), "split = 3 is not allowed: a power of two"),
           (dict(block_k=1024, split=4), "not allowed for K = 2048: block_k × split must divide K"),
           (dict(block_n=8), "block_n = 8, block_k = 256 are not allowed"),
           (dict(stages=0), "stages = 0 is not allowed"),
           (dict(dot=False), "dot = False is not allowed for 4 rows")]
    for fields, message in bad:
        with gemv.override(**fields), pytest.raises(ValueError, match=message):
            gemv.launch_config(4 if "dot" in fields else 1, 2048, 2048)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_gemv_matches_cublas_at_the_1b_shapes_on_cuda(rows):
    for n, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048), (100, 256)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        y = gemv.linear(x, w)
        ref = x.double() @ w.double().T
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 8e-3, (rows, n, k)
        assert torch.equal(y, gemv.linear(x, w)), (rows, n, k)  # deterministic split-K


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_gemv_graph_decoder_matches_cublas_graph_decoder_on_cuda(batch):
    from titan_linear.inference.graph_decode import GraphDecoder

    model = build(tiny_args(**OPTIONS["all"]), seed=0).cuda()
    model = fuse_projections(prepare_model(model, torch.bfloat16, max_len=64))
    tokens = torch.randint(0, 256, (batch, 30), device="cuda")
    runs = []
    for on in (False, True):
        use_gemv(model, on=on)
        _, caches = prefill(model, tokens[:, :5], max_len=30, min_bucket=8)
        step = GraphDecoder(model, caches)
        runs.append(torch.stack([step(tokens[:, t]) for t in range(5, 30)], dim=1).float())
    scale = runs[0].abs().max()
    assert ((runs[1] - runs[0]).abs().max() / scale).item() < 3e-2
