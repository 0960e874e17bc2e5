"""Generation (titan_linear/inference/): prefill + decode against the parallel forward, caches,
sampling, and the benchmark's CPU smoke path."""

import json

import pytest
import torch

from titan_linear.inference import (
    bucket_length,
    Caches,
    KVCache,
    SamplingConfig,
    decode_step,
    filter_logits,
    generate,
    prefill,
    prepare_model,
    recurrent_state_from_prompt,
    static_decode_step,
)
from titan_linear.ops.efficient_attn import efficient_attention_recurrent, RecurrentState
from tests.helpers import build, debug_args, REPO

RATIOS = [0.0, 0.5, 1.0]


def _model(ratio: float, dtype=torch.float32, seed: int = 0, max_len: int = 64):
    # Grouped-query heads (16 query, 4 kv), so the caches' kv-head layout is exercised.
    model = build(debug_args(linear_attn_ratio=ratio, n_kv_heads=4), seed=seed)
    return prepare_model(model, dtype, max_len=max_len)


def _fixed_shape_step(model, token, caches):
    # graph_decode.static_decode_step as GraphDecoder drives it, without the graph (CPU): room
    # for the token first, which moves the KV storage to the next bucket when it is full.
    caches.reserve(caches.length + 1)
    logits = static_decode_step(model, token.reshape(-1, 1), caches, torch.tensor([caches.length]))
    caches.length += 1
    return logits


@pytest.mark.parametrize("step", [decode_step, _fixed_shape_step], ids=["eager", "fixed_shape"])
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"ratio{r}")
@pytest.mark.parametrize("prompt_len", [1, 23], ids=lambda t: f"P{t}")
def test_prefill_then_decode_step_matches_parallel_forward(ratio, prompt_len, step):
    model = _model(ratio, torch.float64)
    torch.manual_seed(1)
    tokens = torch.randint(0, 2048, (2, 41))
    expected = model(tokens)  # (2, 41, vocab): one parallel forward over the whole sequence
    # KV storage in buckets of 8, 16, 32, then 48 = max_len: the steps cross each boundary, and
    # the fixed-shape step reads the unwritten positions of the bucket (weight 0).
    logits, caches = prefill(model, tokens[:, :prompt_len], max_len=48, all_logits=True, min_bucket=8)
    steps = [step(model, tokens[:, t], caches) for t in range(prompt_len, 41)]
    got = torch.cat([logits, torch.stack(steps, dim=1)], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert caches.length == 41 and caches.capacity == 48


def test_prefill_then_decode_step_matches_parallel_forward_oelm(ratio=0.5):
    import copy

    from titan_linear.models.oelm import oelm_args, OELMTransformer

    args = copy.deepcopy(oelm_args["debugmodel"])
    args.max_seq_len, args.linear_attn_ratio, args.n_kv_heads = 64, ratio, 4
    model = prepare_model(build(args, cls=OELMTransformer), torch.float64)
    tokens = torch.randint(0, 2048, (1, 30))
    logits, caches = prefill(model, tokens[:, :20], max_len=30, all_logits=True)
    steps = [decode_step(model, tokens[:, t], caches) for t in range(20, 30)]
    got = torch.cat([logits, torch.stack(steps, dim=1)], dim=1)
    torch.testing.assert_close(got, model(tokens), rtol=0, atol=1e-9)


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"ratio{r}")
def test_prefill_last_logits_fp32(ratio):
    model = _model(ratio)
    tokens = torch.randint(0, 2048, (1, 37))
    last, _ = prefill(model, tokens, max_len=40)
    torch.testing.assert_close(last[:, 0], model(tokens)[:, -1], rtol=1e-5, atol=1e-5)


def test_recurrent_state_from_prompt_is_the_recurrence_final_state():
    torch.manual_seed(0)
    # Keys up to ~|60|: exp(k) alone would overflow fp32's range in the naive sum.
    q = torch.randn(2, 4, 57, 16, dtype=torch.float64)
    k = 20 * torch.randn(2, 2, 57, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 57, 8, dtype=torch.float64)
    _, ref = efficient_attention_recurrent(q, k, v, output_final_state=True)
    got = recurrent_state_from_prompt(k, v)
    torch.testing.assert_close(got.z, ref.z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.S, ref.S, rtol=1e-10, atol=1e-12)
    got32 = recurrent_state_from_prompt(k.float(), v.float())
    assert torch.isfinite(got32.S).all() and got32.S.dtype == torch.float32


def _bytes_by_kind(model, caches: Caches) -> tuple[int, int]:
    linear = set(str(i) for i in model.linear_layers)
    used = caches.nbytes()
    return (sum(b for n, b in used.items() if n in linear), sum(b for n, b in used.items() if n not in linear))


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"ratio{r}")
def test_linear_cache_constant_kv_cache_grows(ratio):
    model = _model(ratio)
    n_lin = len(model.linear_layers)
    n_soft = 6 - n_lin
    tokens = torch.randint(0, 2048, (1, 40))
    _, caches = prefill(model, tokens[:, :8], max_len=40)
    allocated = caches.allocated_nbytes()
    lin0, soft0 = _bytes_by_kind(model, caches)
    shapes = {n: c.S.shape for n, c in caches.layers.items() if isinstance(c, RecurrentState)}
    # per token and softmax layer: k and v, 4 kv heads x 16 dims, fp32
    per_token = n_soft * 2 * 4 * 16 * 4
    for step, t in enumerate(range(8, 39), start=1):
        decode_step(model, tokens[:, t], caches)
        lin, soft = _bytes_by_kind(model, caches)
        assert lin == lin0, "linear layers' state must not grow"
        assert soft == soft0 + step * per_token
        assert caches.allocated_nbytes() == allocated  # max_len is under one bucket: no move
    assert {n: c.S.shape for n, c in caches.layers.items() if isinstance(c, RecurrentState)} == shapes
    # 4 kv heads x (16 x 16 + 16) fp32 numbers per linear layer, whatever the length
    assert lin0 == n_lin * 4 * (16 * 16 + 16) * 4
    assert sum(isinstance(c, KVCache) for c in caches.layers.values()) == n_soft


def test_bucket_length_powers_of_two_from_min_bucket_up_to_max_len():
    assert [bucket_length(n, 100, 8) for n in (0, 1, 8, 9, 16, 17, 64, 65, 100)] == [8, 8, 8, 16, 16, 32, 64, 100, 100]
    assert bucket_length(1000, 4096) == 1024 and bucket_length(1025, 4096) == 2048
    assert bucket_length(3, 5, 8) == 5


@pytest.mark.parametrize("step", [decode_step, _fixed_shape_step], ids=["eager", "fixed_shape"])
def test_kv_cache_grows_by_buckets_and_keeps_its_contents(step):
    model = _model(0.5)
    tokens = torch.randint(0, 2048, (2, 20))
    _, grown = prefill(model, tokens[:, :3], max_len=20, min_bucket=4)
    _, whole = prefill(model, tokens[:, :3], max_len=20, min_bucket=20)  # one bucket: never moves
    per_position = sum(2 * c.k[:, :, :1].nbytes for c in grown.kv_caches())
    states = grown.allocated_nbytes() - per_position * grown.capacity  # recurrent: fixed size
    capacities = [grown.capacity]
    for t in range(3, 20):
        step(model, tokens[:, t], grown)
        step(model, tokens[:, t], whole)
        capacities.append(grown.capacity)
        assert grown.allocated_nbytes() == states + per_position * grown.capacity
    assert capacities == [4] + [4] + [8] * 4 + [16] * 8 + [20] * 4
    # Bitwise for the eager step, which reads exactly the filled positions either way; the
    # fixed-shape step reads the whole bucket, and its masked positions change the order of the
    # softmax's sums (fp32 rounding).
    atol = 0 if step is decode_step else 1e-6
    as_tuple = lambda c: (c.k, c.v) if isinstance(c, KVCache) else tuple(c)  # noqa: E731
    for name, c in whole.layers.items():
        torch.testing.assert_close(as_tuple(grown.layers[name]), as_tuple(c), rtol=0, atol=atol,
                                   msg=lambda m: f"layer {name}: {m}")
    with pytest.raises(ValueError, match="the caches are full: max_len = 20 positions"):
        step(model, tokens[:, 0], grown)
    assert grown.length == 20


def test_decode_step_refuses_to_overrun_the_kv_cache():
    model = _model(0.5)
    _, caches = prefill(model, torch.randint(0, 2048, (1, 4)), max_len=5)
    decode_step(model, torch.tensor([1]), caches)
    with pytest.raises(ValueError, match="max_len = 5"):
        decode_step(model, torch.tensor([1]), caches)


@pytest.mark.parametrize("ratio", [0.5], ids=lambda r: f"ratio{r}")
def test_greedy_generate_is_deterministic_and_is_argmax_of_full_forward(ratio):
    model = _model(ratio)
    prompt = [1, 50, 60, 70]
    a = generate(model, prompt, 12)
    b = generate(model, prompt, 12)
    assert a.tokens == b.tokens and len(a.tokens) == 12 and len(a.decode_ms) == 11
    # The same tokens as greedy decoding by re-running the whole sequence each time.
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert a.tokens == seq[len(prompt):]


def test_sampled_generate_is_reproducible_from_its_seed():
    model = _model(0.5)
    cfg = SamplingConfig(temperature=1.0, top_k=200, top_p=0.95)
    a = generate(model, [1, 2, 3], 16, cfg, seed=7)
    b = generate(model, [1, 2, 3], 16, cfg, seed=7)
    c = generate(model, [1, 2, 3], 16, cfg, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_generate_stops_on_eos_without_returning_it():
    model = _model(0.5)
    first = generate(model, [1, 2, 3], 5).tokens
    out = generate(model, [1, 2, 3], 5, eos_id=first[2])
    assert out.stopped_on_eos and out.tokens == first[:2]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.2, 0.25]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, False, False, True]
    # 0.5 < 0.6 so the next most likely (0.25) is needed; 0.5 + 0.25 >= 0.6 stops there.
    assert kept(filter_logits(logits, top_p=0.6)) == [True, False, False, True]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False]


@pytest.mark.parametrize("field,value,flag", [
    ("temperature", -1.0, "--temperature"), ("top_k", -3, "--top-k"), ("top_p", 0.0, "--top-p"),
])
def test_sampling_config_errors_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=f"{flag} = {value!r}"):
        SamplingConfig(**{field: value}).check()


def test_benchmark_cpu_smoke(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location

    path = REPO / "benchmarks" / "inference.py"
    spec = spec_from_file_location("benchmark_inference", path)
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "inf.json"
    bench.main(["--device", "cpu", "--flavor", "debugmodel", "--contexts", "16", "32",
                "--ratios", "0", "1", "--decode-tokens", "2", "--out", str(out)])
    bench.main(["--device", "cpu", "--flavor", "debugmodel", "--contexts", "16", "--ratios", "0.5",
                "--batches", "1", "3", "--decode-tokens", "2", "--out", str(out), "--append"])
    rows = json.loads(out.read_text())
    assert [(r["ratio"], r["context"], r["batch"]) for r in rows] == [
        (0.0, 16, 1), (0.0, 32, 1), (1.0, 16, 1), (1.0, 32, 1), (0.5, 16, 1), (0.5, 16, 3)]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["device"] == "cpu"
        assert r["decode"] == "eager" and r["compile"] == "off" and r["capture_s"] is None
        assert r["tokens_per_s"] == pytest.approx(1000 * r["batch"] / r["decode_ms_per_token"], abs=0.1)
        # eagerly, a step reads the filled positions: context + 3 at the last of 2 timed steps,
        # after the untimed warm-up step
        assert r["kv_positions"] == (0 if r["ratio"] == 1.0 else r["context"] + 3)
    cache = {(r["ratio"], r["context"], r["batch"]): r["cache_gib"] for r in rows}
    assert cache[(1.0, 16, 1)] == cache[(1.0, 32, 1)]  # recurrent states: independent of the context
    assert cache[(0.0, 32, 1)] > cache[(0.0, 16, 1)]  # KV caches: grow with it
    assert cache[(0.5, 16, 3)] == pytest.approx(3 * cache[(0.5, 16, 1)], rel=1e-2)  # and with the batch


def _save_dcp(model, path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(model.state_dict(), checkpoint_id=str(path))


def test_load_model_weights_reads_a_dcp_checkpoint_and_its_newest_step(tmp_path):
    from titan_linear.inference.build import load_model_weights

    src = build(debug_args(linear_attn_ratio=0.5), seed=1)
    _save_dcp(build(debug_args(linear_attn_ratio=0.5), seed=5), tmp_path / "checkpoint" / "step-2")
    _save_dcp(src, tmp_path / "checkpoint" / "step-10")
    dst = build(debug_args(linear_attn_ratio=0.5), seed=2)
    used = load_model_weights(dst, str(tmp_path / "checkpoint"))
    assert used.endswith("step-10")
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_model_weights_refuses_another_layer_map(tmp_path):
    from titan_linear.inference.build import load_model_weights

    _save_dcp(build(debug_args(linear_attn_ratio=0.0)), tmp_path / "step-1")
    with pytest.raises(ValueError, match="layer map SSSSSS does not match this model's layer map SLSLSL"):
        load_model_weights(build(debug_args(linear_attn_ratio=0.5)), str(tmp_path / "step-1"))


DEBUG_TOML = "train_configs/debug_model.toml"


@pytest.mark.parametrize("extra,expected", [
    (["--device", "tpu"], "--device = 'tpu' is not allowed: one of cpu, cuda"),
    (["--dtype", "fp8"], "--dtype = 'fp8' is not allowed: one of bf16, fp32"),
    (["--top-p", "1.5"], "--top-p = 1.5 is not allowed"),
    (["--max-new-tokens", "0"], "--max-new-tokens = 0 is not allowed"),
    (["--config", "no_such.toml"], "--config = 'no_such.toml' is not allowed: no such file"),
], ids=["device", "dtype", "top_p", "max_new_tokens", "config"])
def test_generate_command_bad_values_are_one_line_exit_2(extra, expected, capsys):
    from titan_linear.generate import main

    rc = main(["--config", DEBUG_TOML, "--random-init", "--prompt", "ROMEO:", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and expected in err, err


def test_generate_command_random_init_prints_text_and_timings(capsys):
    from titan_linear.generate import main

    rc = main(["--config", DEBUG_TOML, "--random-init", "--prompt", "ROMEO:", "--max-new-tokens", "5",
               "--device", "cpu", "--", "--model.linear_attn_ratio", "1.0"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].startswith("model: llama3_mixed debugmodel, layer map LLLLLL, weights: random init, cpu fp32")
    assert out[1].startswith("ROMEO:")
    assert out[2].startswith("prefill: ") and out[3].startswith("decode: ")
