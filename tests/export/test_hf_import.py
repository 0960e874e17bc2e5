"""Starting `llama3_mixed` from a Hugging Face Llama folder (linearizing): the train spec's
HybridStateDictAdapter through TorchTitan's own loading code (`CheckpointManager.dcp_load`)."""

import argparse
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.helpers import adamw_losses, DEBUG_TOML  # noqa: E402

TINY = ["--model.n_layers", "4", "--model.dim", "64", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--training.seq_len", "64"]


def _hf_llama(folder, seed: int = 0, **changes):
    """A tiny random LlamaForCausalLM with TINY's shape and TorchTitan's RoPE, saved to `folder`
    with the packaged tokenizer (built here, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from titan_linear.data.tokenizer import BUILTIN_TOKENIZER_DIR

    kwargs = dict(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    kwargs.update(changes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()
    model.save_pretrained(str(folder))
    for name in os.listdir(BUILTIN_TOKENIZER_DIR):
        shutil.copyfile(os.path.join(BUILTIN_TOKENIZER_DIR, name), os.path.join(folder, name))
    return model


def _import(folder, ratio: float, extra=()):
    """The hybrid of TINY at `ratio`, filled from `folder` as TorchTitan's CheckpointManager does
    for `checkpoint.initial_load_in_hf` (its own dcp_load, with the train spec's adapter)."""
    from torchtitan.components.checkpoint import CheckpointManager, ModelWrapper

    from titan_linear.cli import load_model
    from titan_linear.inference.build import train_spec

    args = argparse.Namespace(config=DEBUG_TOML, checkpoint=None, random_init=True, seed=7, device="cpu", dtype="fp32")
    loaded = load_model(args, [*TINY, "--model.hf_assets_path", str(folder),
                               "--model.linear_attn_ratio", str(ratio), *extra])
    adapter = train_spec(loaded.job_config).state_dict_adapter(loaded.model_args, str(folder))
    wrapper = ModelWrapper(loaded.model)
    manager = SimpleNamespace(sd_adapter=adapter, states={"model": wrapper})
    CheckpointManager.dcp_load(manager, wrapper.state_dict(), checkpoint_id=str(folder), from_hf=True,
                               from_quantized=False)
    return loaded


def _tokens(seed=0, bs=2, seqlen=40):
    return torch.randint(0, 2048, (bs, seqlen), generator=torch.Generator().manual_seed(seed))


def test_import_ratio0_logits_equal_hf(tmp_path):
    hf = _hf_llama(tmp_path)
    loaded = _import(tmp_path, 0.0)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def test_import_ratio_half_loads_every_weight_and_trains(tmp_path):
    from titan_linear.models.hybrid.state_dict_adapter import HybridStateDictAdapter

    hf = _hf_llama(tmp_path, seed=1)
    loaded = _import(tmp_path, 0.5, ["--model.linear_attn_output_gate"])
    model = loaded.model
    assert model.model_args.layer_map == "SLSL"
    # Every HF tensor landed in the same-named module, linear layers included (the gate has none
    # in a Llama and keeps its init).
    ours = HybridStateDictAdapter(loaded.model_args, None).to_hf(model.state_dict())
    for name, value in hf.state_dict().items():
        assert torch.equal(ours[name], value), name

    # A few steps of plain AdamW on one batch of text: the loss falls.
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "titan_linear", "assets", "data",
                             "tinyshakespeare.txt"), encoding="utf-8").read(4000)
    ids = torch.tensor(loaded.tokenizer.encode(text, add_bos=True, add_eos=False)[: 4 * 65]).view(4, 65)
    model.train()
    losses = adamw_losses(model, ids, 8)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("changes,expected", [
    (dict(num_hidden_layers=5), "this model has no place for its tensor 'model.layers.4."),
    (dict(intermediate_size=128), "model.layers.0.mlp.gate_proj.weight is (128, 64) there and (256, 64)"),
    (dict(attention_bias=True), "no place for its tensor 'model.layers.0.self_attn.k_proj.bias'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "rope factor = 1.0 and this model 8.0"),
    (dict(rms_norm_eps=1e-6), "rms_norm_eps = 1e-06 and this model 1e-05"),
], ids=["layers", "ffn", "bias", "rope-scaling", "norm-eps"])
def test_import_mismatch_is_one_line_naming_it(tmp_path, changes, expected):
    _hf_llama(tmp_path, **changes)
    with pytest.raises(ValueError) as e:
        _import(tmp_path, 0.5)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "checkpoint.initial_load_path" in msg and expected in msg, msg


def test_import_tied_embeddings_fill_the_output(tmp_path):
    hf = _hf_llama(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in json.dumps(_safetensors_names(tmp_path))
    loaded = _import(tmp_path, 0.0)
    tokens = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def _safetensors_names(folder):
    from titan_linear.models.hybrid.state_dict_adapter import safetensors_shapes

    return sorted(safetensors_shapes(str(folder)))


def test_linearize_through_the_torchtitan_trainer(tmp_path):
    """run_train.sh with checkpoint.initial_load_in_hf at ratio 0.5: the trainer loads the HF
    folder through llama3_mixed's adapter, then trains and the loss falls."""
    from tests.integration.harness import losses_of, run_train, SMALL, tail

    folder = tmp_path / "hf"
    _hf_llama(folder, seed=2)
    proc = run_train([
        "--config", DEBUG_TOML, *SMALL, *TINY, "--job.dump_folder", str(tmp_path / "run"),
        "--model.hf_assets_path", str(folder), "--model.linear_attn_ratio", "0.5",
        "--checkpoint.initial_load_path", str(folder), "--checkpoint.initial_load_in_hf",
        "--checkpoint.initial_load_model_only", "--checkpoint.interval", "1000",
        "--training.steps", "8", "--lr_scheduler.warmup_steps", "1", "--optimizer.lr", "3e-3",
    ])
    assert proc.returncode == 0, tail(proc.stdout)
    assert f"Loading the checkpoint from {folder}" in proc.stdout, tail(proc.stdout)
    assert "layer map SLSL" in proc.stdout
    losses = [loss for _, (loss, _) in sorted(losses_of(proc.stdout).items())]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses


# config.json of Llama 3.2 1B as published (transformers 4.x layout: rope_theta beside rope_scaling).
LLAMA_3_2_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True,
}


def test_llama_3_2_flavor_accepts_its_config_and_1b_flavor_refuses_it(tmp_path):
    from titan_linear.models.hybrid import hybrid_args, HybridStateDictAdapter
    from titan_linear.models.hybrid.state_dict_adapter import ffn_hidden_dim

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    args = hybrid_args["llama3.2-1B"]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, ffn_hidden_dim(args)) == (
        2048, 16, 32, 8, 128256, 8192)
    HybridStateDictAdapter(args, str(tmp_path))._check_config(str(tmp_path), "here")
    with pytest.raises(ValueError, match="rope factor = 32.0 and this model 8.0"):
        HybridStateDictAdapter(hybrid_args["1B"], str(tmp_path))._check_config(str(tmp_path), "here")
