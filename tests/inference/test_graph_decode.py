"""GraphDecoder (inference/graph_decode.py): the torch.compile'd fixed-shape step across KV
buckets on the CPU, its CUDA-graph replay (compiled or not) against the eager decode_step on a
GPU. The uncompiled fixed-shape step is checked against the parallel forward on CPU in
test_inference.py and test_linear_options_decode.py."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from titan_linear.inference import decode_step, generate, prefill, prepare_model
from titan_linear.inference.graph_decode import compiled_step, GraphDecoder
from tests.helpers import build, debug_args
from tests.models.test_linear_options import OPTIONS, tiny_args

RATIOS = [0.0, 0.5, 1.0]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(ratio: float, dtype, device="cpu"):
    # Grouped-query heads (16 query, 4 kv): the step folds each group into its kv head's rows.
    model = build(debug_args(linear_attn_ratio=ratio, n_kv_heads=4), seed=0).to(device)
    return prepare_model(model, dtype, max_len=64)


def test_graph_decoder_refuses_a_cpu_model():
    model = _model(0.5, torch.float32)
    _, caches = prefill(model, torch.randint(0, 2048, (1, 5)), max_len=10)
    with pytest.raises(ValueError, match="needs a CUDA model; this one is on cpu"):
        GraphDecoder(model, caches)


@pytest.mark.parametrize("bad", [-2, 2.0, True])
def test_graph_decoder_refuses_kv_splits_that_are_not_integers_from_zero(bad):
    model = _model(0.5, torch.float32)
    _, caches = prefill(model, torch.randint(0, 2048, (1, 5)), max_len=10)
    with pytest.raises(ValueError, match=f"kv_splits = {bad!r} is not allowed: an integer >= 0 \\(0: automatic\\)"):
        GraphDecoder(model, caches, kv_splits=bad)


# Tiny models (3 layers of dim 64), so that tracing stays in seconds on the CPU.
COMPILE_CASES = {
    "softmax": dict(linear_attn_layers=()),
    "hybrid-all_options": dict(linear_attn_layers=(0, 2), **OPTIONS["all"]),
    "linear-conv-decay_per_feature": dict(linear_attn_layers=(0, 1, 2), **OPTIONS["short_conv"],
                                          **OPTIONS["decay_per_feature"]),
}


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiled_step_matches_decode_step_across_buckets_from_one_compile(case):
    # The step GraphDecoder captures, through torch.compile with the aot_eager backend: dynamo's
    # full graph and AOT autograd's functionalization of the in-place cache writes, without
    # inductor's code generation (GPU tests below run inductor). Batch 3; the KV storage grows
    # through buckets of 4, 8, 16 and 24 positions. (The GPU's attention kernel is checked
    # compiled on the CPU under Triton's interpreter in tests/ops/test_decode_attention.py.)
    counter = CompileCounterWithBackend("aot_eager")
    step = compiled_step(backend=counter)
    model = prepare_model(build(tiny_args(**COMPILE_CASES[case]), seed=0), torch.float32, max_len=64)
    tokens = torch.randint(0, 256, (3, 22))
    _, eager = prefill(model, tokens[:, :3], max_len=24, min_bucket=4)
    _, fixed = prefill(model, tokens[:, :3], max_len=24, min_bucket=4)
    capacities = set()
    with torch.no_grad():
        for t in range(3, 22):
            fixed.reserve(t + 1)
            capacities.add(fixed.capacity)
            got = step(model, tokens[:, t], fixed, torch.tensor([t]))
            fixed.length += 1
            torch.testing.assert_close(got, decode_step(model, tokens[:, t], eager), rtol=1e-5, atol=1e-5)
    assert capacities == ({24} if case.startswith("linear") else {4, 8, 16, 24})
    # every bucket from one compile: the KV length is dynamic
    assert counter.frame_count == 1


@cuda
@pytest.mark.parametrize("kv_splits", [0, 1, 8], ids=lambda k: f"kv_splits{k}")
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled_graph"])
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"ratio{r}")
def test_graph_decoder_matches_eager_decode_on_cuda(ratio, compile, kv_splits):
    model = _model(ratio, torch.float32, "cuda")
    tokens = torch.randint(0, 2048, (2, 40), device="cuda")
    runs = []
    for graph in (False, True):
        # KV buckets of 16, 32, then 45 = max_len: the decoder captures a graph for each.
        _, caches = prefill(model, tokens[:, :9], max_len=45, min_bucket=8)
        if graph:
            step = GraphDecoder(model, caches, compile=compile, kv_splits=kv_splits)
        else:
            step = lambda tok, c=caches: decode_step(model, tok, c)  # noqa: E731
        runs.append(torch.stack([step(tokens[:, t]) for t in range(9, 40)], dim=1))
        assert caches.length == 40
    assert caches.capacity == 45 and step.capacity == 45
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)


@cuda
def test_compiled_graph_decoder_bf16_across_buckets():
    # bf16 softmax layers take the decode attention kernel (fp32 scores, bf16 probabilities) in
    # the graph, SDPA eagerly; the compiled kernels round at other points than the eager ones, so compare by relative RMSE.
    model = _model(0.5, torch.bfloat16, "cuda")
    tokens = torch.randint(0, 2048, (3, 40), device="cuda")
    runs = []
    for compile in (False, True):
        _, caches = prefill(model, tokens[:, :9], max_len=45, min_bucket=8)
        step = GraphDecoder(model, caches, compile=compile)
        runs.append(torch.stack([step(tokens[:, t]) for t in range(9, 40)], dim=1).float())
    rmse = (runs[1] - runs[0]).pow(2).mean().sqrt() / runs[0].pow(2).mean().sqrt()
    assert rmse < 2e-2, rmse


@cuda
def test_graph_decoder_refuses_past_max_len_on_cuda():
    model = _model(0.5, torch.float32, "cuda")
    _, caches = prefill(model, torch.randint(0, 2048, (1, 5), device="cuda"), max_len=7, min_bucket=4)
    step = GraphDecoder(model, caches, compile=False)
    step(torch.tensor([1], device="cuda"))
    step(torch.tensor([2], device="cuda"))
    with pytest.raises(ValueError, match="the caches are full: max_len = 7 positions"):
        step(torch.tensor([3], device="cuda"))


@cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled_graph"])
def test_generate_with_cuda_graph_gives_the_eager_tokens(compile):
    model = _model(0.5, torch.bfloat16, "cuda")
    prompt = torch.randint(0, 2048, (12,)).tolist()
    eager = generate(model, prompt, 20, cuda_graph=False)
    graph = generate(model, prompt, 20, cuda_graph=True, compile=compile)
    assert graph.capture_ms > 0 and eager.capture_ms == 0
    # Greedy from bf16 logits: the masked full-bucket attention (and the compiled kernels) may
    # round a near tie differently, so compare the first tokens, before any such divergence
    # can compound.
    assert graph.tokens[:5] == eager.tokens[:5]
