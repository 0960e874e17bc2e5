"""titan_linear.eval.attention_maps: the maps are the layers' attention (map x V = the input of
wo), rows sum to 1, causal, statistics in range; the command writes its JSON or, on bad
flags, one line, exit 2 and nothing."""

import json
import math
import sys

import pytest
import torch

from tests.helpers import build, debug_args, DEBUG_TOML
from titan_linear.eval.attention_maps import capture_attention, layer_maps, linear_map, main, map_statistics, softmax_map
from titan_linear.ops.efficient_attn.naive import efficient_attention_quadratic

T = 24


def _wo_inputs(model, tokens):
    """The input of every layer's `wo` (the attention output), as (heads, T, head_dim)."""
    seen = {}

    def hook_for(i):
        def hook(module, args):
            x = args[0]  # (1, T, heads * head_dim)
            seen[i] = x.view(x.shape[0], x.shape[1], -1, model.layers[str(i)].attention.head_dim)[0].transpose(0, 1)

        return hook

    handles = [block.attention.wo.register_forward_pre_hook(hook_for(int(name))) for name, block in model.layers.items()]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("n_kv_heads", [16, 4], ids=["MHA", "GQA4"])
def test_map_times_v_is_the_attention_output_of_softmax_and_linear_layers(n_kv_heads):
    model = build(debug_args(n_kv_heads=n_kv_heads, linear_attn_ratio=0.5)).double().eval()
    # Sharper q, k than at init, so the maps are far from uniform and a wrong map shows.
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.wq.weight.mul_(8.0)
            block.attention.wk.weight.mul_(8.0)
    tokens = torch.randint(0, model.model_args.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    expected = _wo_inputs(model, tokens)
    with torch.no_grad():
        captured = capture_attention(model, tokens, list(range(6)))
    assert [captured[i]["kind"] for i in range(6)] == ["softmax", "linear"] * 3
    for i in range(6):
        A, err = layer_maps(captured[i])
        group = 16 // n_kv_heads
        out = A @ captured[i]["v"][0].repeat_interleave(group, dim=0)
        torch.testing.assert_close(out, expected[i], rtol=1e-9, atol=1e-9)
        assert err < 1e-9
        torch.testing.assert_close(A.sum(-1), torch.ones(16, T, dtype=A.dtype))
        assert torch.all(A.triu(1) == 0)
        assert A.min() >= 0
        # Not uniform: the test would not notice a map that ignores q and k otherwise.
        assert A[:, -1].max() > 3.0 / T


def test_linear_map_is_exact_where_a_global_shift_would_underflow():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 40, 8, generator=g, dtype=torch.float64)
    # Keys drifting over +-200: exp of them overflows fp32 and fp64 without a per-row shift.
    k = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) * 3 + torch.linspace(-200, 200, 40)[:, None]
    v = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    A = linear_map(q, k)
    assert torch.isfinite(A).all()
    torch.testing.assert_close(A @ v.repeat_interleave(2, dim=1), efficient_attention_quadratic(q, k, v))
    A32 = linear_map(q.float(), k.float())
    assert torch.isfinite(A32).all()
    torch.testing.assert_close(A32.double(), A, rtol=1e-4, atol=1e-5)
    # Softmax maps: SDPA's output.
    A = softmax_map(q, k)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    torch.testing.assert_close(A @ v.repeat_interleave(2, dim=1), sdpa)


def test_map_statistics_of_known_maps():
    n = 5
    diag = torch.eye(n)[None]
    first = torch.zeros(1, n, n)
    first[..., 0] = 1
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    s = map_statistics(torch.cat([diag, first, uniform[None]]))
    assert s["entropy"][:2] == [0.0, 0.0]
    assert s["entropy"][2] == pytest.approx(sum(math.log(t + 1) for t in range(1, n)) / (n - 1), abs=1e-6)
    assert s["diagonal_mass"][:2] == [1.0, 0.0] and s["first_token_mass"][:2] == [0.0, 1.0]
    assert s["mean_distance"][0] == 0.0 and s["mean_distance"][1] == pytest.approx(2.5)  # mean of t = 1..4
    assert s["mean_distance"][2] == pytest.approx(sum(t / 2 for t in range(1, n)) / (n - 1))


def test_command_writes_statistics_and_maps(tmp_path, capsys):
    out, maps = tmp_path / "r" / "maps.json", tmp_path / "maps.pt"
    rc = main(["--config", DEBUG_TOML, "--random-init", "--text", "ROMEO: But soft, what light through yonder window",
               "--max-tokens", "12", "--out", str(out), "--save-maps", str(maps)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["tokens"] == 12 and len(result["token_strings"]) == 12
    assert result["model"]["layer_map"] == "SLSLSL"
    assert [layer["kind"] for layer in result["layers"]] == ["softmax", "linear"] * 3
    for layer in result["layers"]:
        assert layer["output_max_abs_error"] < 1e-4
        assert len(layer["heads"]) == 16
        for head in layer["heads"]:
            assert head["entropy"] >= 0 and head["entropy"] <= result["uniform_entropy"] + 1e-6
            assert 0 <= head["mean_distance"] <= 11
            assert 0 <= head["first_token_mass"] <= 1 and 0 <= head["diagonal_mass"] <= 1
    saved = torch.load(maps)
    assert sorted(saved["maps"]) == list(range(6)) and saved["kinds"][1] == "linear"
    for A in saved["maps"].values():
        assert A.shape == (16, 12, 12)
        torch.testing.assert_close(A.sum(-1), torch.ones(16, 12))
        assert torch.all(A.triu(1) == 0)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


BAD = [
    (["--text", "ROMEO:", "--max-tokens", "1"], "--max-tokens = 1"),
    (["--text", "ROMEO:", "--layers", "6"], "--layers = [6]"),
    (["--text-file", "/no/such/file.txt"], "--text-file = '/no/such/file.txt'"),
    (["--text", "a", "--text-file", "b"], "--text-file"),
    (["--text", "ROMEO:", "--dtype", "fp8"], "--dtype = 'fp8'"),
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[1].split()[0] for b in BAD])
def test_command_bad_flags_are_one_line_exit_2_and_write_nothing(extra, expected, tmp_path, capsys):
    rc = main(["--config", DEBUG_TOML, "--random-init", "--out", str(tmp_path / "out.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert err.startswith("titan_linear.eval.attention_maps: error:")
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rc = main(["--config", DEBUG_TOML, "--random-init", "--text", "ROMEO:", "--out", str(tmp_path / "out.json"),
               "--plot", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--plot" in err and "needs matplotlib" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not _has_matplotlib(), reason="needs matplotlib")
def test_command_plots_a_layer_by_head_grid(tmp_path):
    png = tmp_path / "grid.png"
    rc = main(["--config", DEBUG_TOML, "--random-init", "--text", "ROMEO: But soft", "--layers", "0", "1",
               "--out", str(tmp_path / "m.json"), "--plot", str(png)])
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
