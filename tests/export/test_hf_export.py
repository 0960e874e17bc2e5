"""`python -m titan_linear.export.hf` and the HF model class: the exported folder computes what the
TorchTitan model computes (fp32 logits, greedy generation), at ratio 0 as a plain Llama."""

import argparse
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.helpers import DEBUG_TOML, OELM_TOML  # noqa: E402

# 4 layers of width 64, 4 heads on 2 kv heads (grouped-query), the packaged 2048-token tokenizer.
TINY = ["--model.n_layers", "4", "--model.dim", "64", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--training.seq_len", "64"]
OPTIONS = ["--model.linear_attn_temperature", "2.0", "--model.linear_attn_learned_temperature",
           "--model.linear_attn_output_norm", "--model.linear_attn_output_gate", "--model.linear_attn_short_conv", "4",
           "--model.linear_attn_decay"]


def _load(config: str, overrides: list[str], seed: int = 0):
    from titan_linear.cli import load_model

    args = argparse.Namespace(config=config, checkpoint=None, random_init=True, seed=seed, device="cpu", dtype="fp32")
    loaded = load_model(args, TINY + overrides)
    # init_weights leaves the options at neutral values (norm weight 1, equal temperatures):
    # draw them at random so that a wrong mapping or permutation would show in the logits.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if any(s in name for s in ("log_scale", "log_decay", "out_norm", "short_conv")):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))
    return loaded


def _export(loaded, out):
    from titan_linear.export.hf import write_export

    write_export(loaded, str(out))
    return str(out)


def _tokens(seed: int = 0, bs: int = 2, seqlen: int = 37):
    return torch.randint(0, 2048, (bs, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config,overrides", [
    (DEBUG_TOML, ["--model.linear_attn_ratio", "0.5"]),
    (DEBUG_TOML, ["--model.linear_attn_ratio", "0.5", *OPTIONS]),
    # a rate per key feature: permuted with wk's rows, so a wrong permutation shows in the logits
    (DEBUG_TOML, ["--model.linear_attn_ratio", "0.5", "--model.linear_attn_decay",
                  "--model.linear_attn_decay_rates", "feature"]),
    (OELM_TOML, ["--model.linear_attn_ratio", "0.5"]),
], ids=["ratio0.5", "ratio0.5-options", "ratio0.5-decay-per-feature", "oelm-ratio0.5"])
def test_export_logits_match_torchtitan_model(tmp_path, config, overrides):
    from transformers import AutoModelForCausalLM

    loaded = _load(config, overrides)
    out = _export(loaded, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(hf).__name__ == "TitanLinearForCausalLM"
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, loaded.model(tokens), atol=1e-5, rtol=0)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "titan_linear_llama"
    assert cfg["linear_layers"] == loaded.model_args.linear_layers == [1, 3]
    assert cfg["titan_linear"]["layer_map"] == "SLSL"
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    if "feature" in overrides:
        assert cfg["linear_attn_decay_rates"] == "feature"
    if config == OELM_TOML:
        assert cfg["titan_linear"]["oelm"]["freeze_map"] == "FFFF"
        assert cfg["titan_linear"]["oelm"]["frozen_projections"] == ["q_proj", "k_proj"]
    if "--model.linear_attn_short_conv" in overrides:
        assert cfg["linear_attn_short_conv"] == 4 and cfg["linear_attn_output_gate"] is True
        assert cfg["linear_attn_decay"] is True
        _check_self_contained(out, tmp_path, hf(_tokens()).logits)


def _check_self_contained(out, tmp_path, want):
    """The folder loads and computes the same logits in a process where titan_linear cannot be
    imported (its code files are all it needs)."""
    import subprocess
    import sys

    torch.save({"tokens": _tokens(), "want": want.detach()}, tmp_path / "io.pt")
    script = (
        "import sys, torch; sys.modules['titan_linear'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"m = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True, dtype=torch.float32)\n"
        "with torch.no_grad(): torch.testing.assert_close(m(io['tokens']).logits, io['want'], atol=1e-6, rtol=0)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_export_ratio0_is_a_plain_llama(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    loaded = _load(DEBUG_TOML, ["--model.linear_attn_ratio", "0"])
    out = _export(loaded, tmp_path / "hf")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not os.path.exists(os.path.join(out, "modeling_titan_linear.py"))
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, loaded.model(tokens), atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("ROMEO:", add_special_tokens=False) == loaded.tokenizer.encode("ROMEO:", add_bos=False, add_eos=False)


def test_registered_auto_classes_and_greedy_generate_match_the_project(tmp_path):
    import titan_linear.export  # noqa: F401 (registers titan_linear_llama)
    from transformers import AutoModelForCausalLM

    from titan_linear.inference import generate

    loaded = _load(DEBUG_TOML, ["--model.linear_attn_ratio", "0.5"], seed=3)
    out = _export(loaded, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no trust_remote_code
    prompt = _tokens(2, bs=1, seqlen=6)
    got = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, 6:].tolist()
    want = generate(loaded.model, prompt[0].tolist(), 12).tokens
    assert got == want
    with pytest.raises(ValueError, match="padding is not supported"):
        hf(prompt, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))


def test_export_command_writes_from_a_checkpoint_and_refuses_a_full_out(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from titan_linear.export.hf import main

    loaded = _load(DEBUG_TOML, ["--model.linear_attn_ratio", "0.5"], seed=4)
    dcp.save(loaded.model.state_dict(), checkpoint_id=str(tmp_path / "checkpoint" / "step-3"))
    out = tmp_path / "hf"
    argv = ["--config", DEBUG_TOML, "--checkpoint", str(tmp_path / "checkpoint"), "--out", str(out), "--", *TINY,
            "--model.linear_attn_ratio", "0.5"]
    assert main(argv) == 0
    assert "layer map SLSL" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
    tokens = _tokens(5)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, loaded.model(tokens), atol=1e-5, rtol=0)

    before = sorted(os.listdir(out))
    capsys.readouterr()  # from_pretrained's progress bar
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "is not an empty folder" in err, err
    assert sorted(os.listdir(out)) == before
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
