"""models/fused.py: q, k, v and w1, w3 as one product each for decoding. Same logits as the
separate products (eager and through the compiled fixed-shape step), no weight stored twice,
a checkpoint loaded after fusing reaches the fused products, and unfusing goes back."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from titan_linear.inference import decode_step, prefill, prepare_model
from titan_linear.inference.graph_decode import compiled_step
from titan_linear.models.fused import fuse_projections, QKV, W13
from tests.helpers import build, decode_logits
from tests.models.test_linear_options import OPTIONS, tiny_args

CASES = {
    "hybrid-all_options": dict(linear_attn_layers=(0, 2), **OPTIONS["all"]),
    "grouped_heads": dict(linear_attn_layers=(1,), n_kv_heads=2),
}


def _decode(model, tokens, steps=6, calls=None):
    # the prefill runs the model's own forward; count the decode steps only
    return decode_logits(model, tokens, steps, after_prefill=None if calls is None else calls.clear)


@pytest.mark.parametrize("case", CASES)
def test_fused_decode_matches_separate_products(case):
    model = prepare_model(build(tiny_args(**CASES[case]), seed=0), torch.float32, max_len=64)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _decode(model, tokens)
    fuse_projections(model)
    for block in model.layers.values():
        fused_qkv, fused_w13 = getattr(block.attention, QKV), getattr(block.feed_forward, W13)
        # the modules' weights are views of the fused tensors: nothing is stored twice
        assert block.attention.wq.weight.data_ptr() == fused_qkv.data_ptr()
        assert block.feed_forward.w1.weight.data_ptr() == fused_w13.data_ptr()
        assert fused_qkv.shape[0] == sum(getattr(block.attention, n).weight.shape[0] for n in ("wq", "wk", "wv"))
    assert set(model.state_dict()) == set(build(tiny_args(**CASES[case]), seed=0).state_dict())
    # fused, the separate modules are not called (they share storage, so values alone cannot tell)
    calls = []
    for block in model.layers.values():
        for lin in (block.attention.wq, block.attention.wk, block.attention.wv, block.feed_forward.w1,
                    block.feed_forward.w3):
            lin.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(_decode(model, tokens, calls=calls), ref, rtol=1e-5, atol=1e-5)
    assert not calls
    fuse_projections(model, on=False)
    assert all(getattr(b.attention, QKV, None) is None for b in model.layers.values())
    torch.testing.assert_close(_decode(model, tokens, calls=calls), ref, rtol=1e-5, atol=1e-5)
    assert calls


def test_a_checkpoint_loaded_after_fusing_reaches_the_fused_products():
    args = tiny_args(**CASES["hybrid-all_options"])
    model = fuse_projections(prepare_model(build(args, seed=0), torch.float32, max_len=64))
    other = prepare_model(build(args, seed=5), torch.float32, max_len=64)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_decode(model, tokens, 5), _decode(other, tokens, 5), rtol=1e-5, atol=1e-5)


def test_compiled_step_takes_the_fused_products():
    # the fixed-shape step GraphDecoder compiles (aot_eager backend on the CPU) with fused weights
    model = prepare_model(build(tiny_args(**CASES["hybrid-all_options"]), seed=0), torch.float32, max_len=64)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    ref = _decode(model, tokens)
    fuse_projections(model)
    step = compiled_step(backend=CompileCounterWithBackend("aot_eager"))
    torch.testing.assert_close(decode_logits(model, tokens, 6, step), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_graph_decoder_matches_separate_eager_decode_on_cuda():
    from titan_linear.inference.graph_decode import GraphDecoder

    model = prepare_model(build(tiny_args(**CASES["hybrid-all_options"]), seed=0).cuda(), torch.float32, max_len=64)
    tokens = torch.randint(0, 256, (2, 30), device="cuda")
    runs = []
    for fused in (False, True):
        fuse_projections(model, on=fused)
        _, caches = prefill(model, tokens[:, :5], max_len=30, min_bucket=8)
        step = GraphDecoder(model, caches) if fused else (lambda tok, c=caches: decode_step(model, tok, c))
        runs.append(torch.stack([step(tokens[:, t]) for t in range(5, 30)], dim=1))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
