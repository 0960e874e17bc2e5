"""GraphDecoder (inference/graph_decode.py): its CUDA-graph replay against the eager
decode_step on a GPU. The fixed-shape step it captures is checked against the parallel
forward on CPU in test_inference.py."""

import pytest
import torch

from titan_linear.inference import decode_step, generate, prefill, prepare_model
from titan_linear.inference.graph_decode import GraphDecoder
from tests.helpers import build, debug_args

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


@cuda
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"ratio{r}")
def test_graph_decoder_matches_eager_decode_on_cuda(ratio):
    model = _model(ratio, torch.float32, "cuda")
    tokens = torch.randint(0, 2048, (2, 40), device="cuda")
    runs = []
    for graph in (False, True):
        _, caches = prefill(model, tokens[:, :9], max_len=45)
        step = GraphDecoder(model, caches) if graph else (lambda tok, c=caches: decode_step(model, tok, c))
        runs.append(torch.stack([step(tokens[:, t]) for t in range(9, 40)], dim=1))
        assert caches.length == 40
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)


@cuda
def test_generate_with_cuda_graph_gives_the_eager_tokens():
    model = _model(0.5, torch.bfloat16, "cuda")
    prompt = torch.randint(0, 2048, (12,)).tolist()
    eager = generate(model, prompt, 20, cuda_graph=False)
    graph = generate(model, prompt, 20, cuda_graph=True)
    assert graph.capture_ms > 0 and eager.capture_ms == 0
    # Greedy from bf16 logits: the masked full-cache attention may round a near tie differently,
    # so compare the first tokens, before any such divergence can compound.
    assert graph.tokens[:5] == eager.tokens[:5]
