"""Recurrent decoding of linear layers with their options (models/hybrid/linear_options.py) against
the parallel forward: prefill, then one token at a time, eager and fixed-shape, fp32 on CPU."""

import pytest
import torch

from titan_linear.inference import Caches, decode_step, generate, prefill, prepare_model, static_decode_step
from tests.helpers import build
from tests.models.test_linear_options import OPTIONS, tiny_args


def _model(options: dict, layers=(0, 2)):
    model = build(tiny_args(linear_attn_layers=layers, **options), seed=0)
    with torch.no_grad():  # move the options off their start values, so each one shows
        for name, p in model.named_parameters():
            if "short_conv" in name:
                p.normal_(0.0, 0.3)
            elif "log_scale" in name or "out_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return prepare_model(model, torch.float32, max_len=64)


def _fixed_shape_step(model, token, caches):
    caches.reserve(caches.length + 1)
    logits = static_decode_step(model, token.reshape(-1, 1), caches, torch.tensor([caches.length]))
    caches.length += 1
    return logits


CASES = [(name, decode_step) for name in OPTIONS] + [(name, _fixed_shape_step) for name in ("all", "decay_per_feature")]


@pytest.mark.parametrize("name,step", CASES, ids=[f"{n}-{s.__name__.strip('_')}" for n, s in CASES])
def test_decode_matches_parallel_forward(name, step):
    model = _model(OPTIONS[name])
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 20))
    expected = model(tokens)
    # a prompt of 2 < kernel - 1 positions: the convolution state starts partly zero; the KV
    # storage of the softmax layer grows through buckets of 4, 8, 16 and 24 positions
    for prompt_len in (2, 9):
        logits, caches = prefill(model, tokens[:, :prompt_len], max_len=24, all_logits=True, min_bucket=4)
        steps = [step(model, tokens[:, t], caches) for t in range(prompt_len, 20)]
        got = torch.cat([logits, torch.stack(steps, dim=1)], dim=1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_decode_from_nothing_all_options_all_linear():
    # No prefill: the first token starts every state (recurrence and convolution) from empty.
    model = _model(OPTIONS["all"], layers=(0, 1, 2))
    tokens = torch.randint(0, 256, (1, 12))
    caches = Caches.allocate(model, 1, 12)
    got = torch.stack([decode_step(model, tokens[:, t], caches) for t in range(12)], dim=1)
    torch.testing.assert_close(got, model(tokens), rtol=0, atol=1e-5)


def test_conv_state_is_fixed_size_and_generation_runs():
    model = _model(OPTIONS["short_conv"])
    _, caches = prefill(model, torch.randint(0, 256, (1, 9)), max_len=40)
    conv_bytes = {n: sum(t.nbytes for t in s) for n, s in caches.conv.items()}
    # 2 linear layers, (K - 1) = 3 inputs of q (64), k (32), v (32) channels, fp32
    assert conv_bytes == {n: 3 * (64 + 32 + 32) * 4 for n in ("0", "2")}
    before = caches.nbytes()
    decode_step(model, torch.tensor([5]), caches)
    assert {n: sum(t.nbytes for t in s) for n, s in caches.conv.items()} == conv_bytes
    assert all(caches.nbytes()[n] == before[n] for n in ("0", "2"))
    out = generate(model, [1, 2, 3], 5)
    assert len(out.tokens) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled_graph"])
def test_graph_decoder_with_all_options_matches_eager_on_gpu(compile):
    from titan_linear.inference.graph_decode import GraphDecoder

    model = _model(OPTIONS["all"]).cuda()
    tokens = torch.randint(0, 256, (2, 20), device="cuda")
    _, eager = prefill(model, tokens[:, :7], max_len=24)
    # KV buckets of 8, 16 and 24 positions: a graph captured for each
    _, graph = prefill(model, tokens[:, :7], max_len=24, min_bucket=4)
    step = GraphDecoder(model, graph, compile=compile)
    for t in range(7, 20):
        torch.testing.assert_close(step(tokens[:, t]), decode_step(model, tokens[:, t], eager), rtol=1e-4, atol=1e-4)
