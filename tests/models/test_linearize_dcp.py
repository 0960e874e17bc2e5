"""Linearizing a model trained here: a run's initial load (`checkpoint.initial_load_path`) of a
DCP checkpoint of another layer map (titan_linear/initial_load.py), through TorchTitan's own
CheckpointManager.load; resumes and the OELM freeze map stay strict."""

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan_linear import launch
from titan_linear.models.maps import CONVERT_KEY

from tests.helpers import adamw_losses, build, DEBUG_TOML, OELM_TOML

TINY = ["--model.n_layers", "4", "--model.dim", "64", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--training.seq_len", "64"]


def _config(dump, *extra, config=DEBUG_TOML):
    """(job_config, model_args) exactly as a run of TINY with `extra` would parse them."""
    return launch.check(["--job.config_file", config, *TINY, "--job.dump_folder", str(dump),
                         "--checkpoint.enable", *extra])


def _save(path, *extra, seed=0):
    """A TINY model built with `extra`, saved to `path` as TorchTitan saves a model (DCP, its
    flattened state dict); returns the model."""
    from torchtitan.components.checkpoint import ModelWrapper

    _, args = _config(path.parent / "unused", *extra)
    model = build(args, seed=seed)
    dcp.save(ModelWrapper(model).state_dict(), checkpoint_id=str(path), no_dist=True)
    return model


def _load(dump, *extra, config=DEBUG_TOML):
    """A model of `extra` (init from seed 1) after TorchTitan's CheckpointManager.load, with the
    check the trainer installs (train.py)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_linear.initial_load import install

    job_config, args = _config(dump, *extra, config=config)
    cls = get_train_spec(job_config.model.name).model_cls
    model = build(args, seed=1, cls=cls)
    manager = CheckpointManager(dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                                states={}, checkpoint_config=job_config.checkpoint, sd_adapter=None,
                                base_folder=job_config.job.dump_folder)
    try:
        install(manager, job_config, cls, args)
        assert manager.load(step=job_config.checkpoint.load_step)
    finally:
        manager.close()
    return model


def _one_line(e) -> str:
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


def _fresh_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_ratio0_checkpoint_starts_a_ratio_half_hybrid_that_trains(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = tmp_path / "pre" / "step-4"
    source = _save(src, "--model.linear_attn_ratio", "0")
    before = _fresh_copy(build(_config(tmp_path / "x", "--model.linear_attn_ratio", "0.5",
                                       "--model.linear_attn_output_gate")[1], seed=1))
    model = _load(tmp_path / "post", "--model.linear_attn_ratio", "0.5", "--model.linear_attn_output_gate",
                  "--checkpoint.initial_load_path", str(src), "--checkpoint.initial_load_model_only",
                  "--checkpoint.initial_load_convert_layer_map")
    assert model.model_args.layer_map == "SLSL"
    ours, theirs = model.state_dict(), source.state_dict()
    for key, value in theirs.items():
        if key != "linear_layer_map":
            assert torch.equal(ours[key], value), key  # softmax and linear layers alike
    assert model.linear_layer_map.tolist() == [0, 1, 0, 1]  # the model keeps its own map
    fresh = [k for k in ours if k not in theirs]
    assert fresh == ["layers.1.attention.wg.weight", "layers.3.attention.wg.weight"], fresh
    for key in fresh:
        assert torch.equal(ours[key], before[key]), key  # the option keeps its initial value
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("titan_linear: initial load")]
    assert lines == [
        f"titan_linear: initial load from {src}: layer map SSSS -> SLSL (layers 1,3 become linear; their "
        "wq/wk/wv/wo come from the checkpoint's softmax layers)",
        f"titan_linear: initial load from {src}: it has no attention.wg.weight (layers 1,3): these "
        "linear-layer option tensors keep their initial values",
    ], lines

    # A few AdamW steps on one batch of ids: the converted model trains.
    torch.manual_seed(0)
    ids = torch.randint(0, 2048, (4, 65))
    losses = adamw_losses(model, ids, 10)
    assert losses[-1] < 0.8 * losses[0], losses


def test_other_layer_map_without_the_key_is_one_line_naming_it(tmp_path, capsys):
    src = tmp_path / "pre" / "step-4"
    _save(src, "--model.linear_attn_ratio", "0")
    load = ["--model.linear_attn_ratio", "0.5", "--checkpoint.initial_load_path", str(src)]
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "post", *load)
    msg = _one_line(e)
    assert "layer map SSSS does not match this model's layer map SLSL" in msg and f"{CONVERT_KEY} = true" in msg
    # launch check (preflight) says the same before any rank starts, and accepts it with the key
    rc = launch.main(["check", "--job.config_file", DEBUG_TOML, *TINY, "--job.dump_folder", str(tmp_path / "post"),
                      "--checkpoint.enable", *load])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"titan_linear: error: {msg}", err
    rc = launch.main(["check", "--job.config_file", DEBUG_TOML, *TINY, "--job.dump_folder", str(tmp_path / "post"),
                      "--checkpoint.enable", *load, "--checkpoint.initial_load_convert_layer_map"])
    err = capsys.readouterr().err
    assert rc == 0 and "layer map SSSS -> SLSL (layers 1,3 become linear" in err, err
    # a conversion loads the model only
    with pytest.raises(ValueError, match="checkpoint.initial_load_model_only = false is not allowed"):
        _load(tmp_path / "post", *load, "--checkpoint.initial_load_convert_layer_map",
              "--checkpoint.no-initial-load-model-only")


def test_resume_into_other_layer_map_is_still_refused(tmp_path, capsys):
    dump = tmp_path / "run"
    _save(dump / "checkpoint" / "step-4", "--model.linear_attn_ratio", "0")
    extra = ["--model.linear_attn_ratio", "0.5", "--checkpoint.initial_load_path", str(tmp_path),
             "--checkpoint.initial_load_convert_layer_map"]
    with pytest.raises(ValueError) as e:  # the model's load hook, on TorchTitan's resume (of the model)
        _load(dump, *extra, "--checkpoint.exclude_from_loading", "dataloader,optimizer,lr_scheduler")
    assert "layer map SSSS does not match this model's layer map SLSL" in _one_line(e)
    rc = launch.main(["check", "--job.config_file", DEBUG_TOML, *TINY, "--job.dump_folder", str(dump),
                      "--checkpoint.enable", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "resume with the same" in err and "step-4" in err, err


@pytest.mark.parametrize("source, target", [
    ((), ()),  # a llama3_mixed checkpoint (nothing frozen) into llama3_oelm (qk frozen)
    (("--model.freeze_ratio", "0.5"), ()),  # llama3_oelm checkpoints of two freeze maps
], ids=["mixed-to-oelm", "freeze-ratio"])
def test_oelm_freeze_map_never_converts(tmp_path, source, target):
    from torchtitan.components.checkpoint import ModelWrapper
    from torchtitan.protocols.train_spec import get_train_spec

    src = tmp_path / "pre" / "step-4"
    if source:
        job_config, args = _config(tmp_path / "unused", *source, config=OELM_TOML)
        model = build(args, cls=get_train_spec(job_config.model.name).model_cls)
        dcp.save(ModelWrapper(model).state_dict(), checkpoint_id=str(src), no_dist=True)
    else:
        _save(src, "--model.linear_attn_ratio", "0")
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "post", *target, "--checkpoint.initial_load_path", str(src),
              "--checkpoint.initial_load_convert_layer_map", config=OELM_TOML)
    msg = _one_line(e)
    assert "OELM freeze map" in msg and "use the same model.oelm_freeze and model.freeze_ratio" in msg, msg


def test_option_tensors_this_model_lacks_are_refused_by_name(tmp_path):
    src = tmp_path / "pre" / "step-4"
    _save(src, "--model.linear_attn_ratio", "0.5", "--model.linear_attn_output_gate")
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "post", "--model.linear_attn_ratio", "0.5", "--checkpoint.initial_load_path", str(src))
    msg = _one_line(e)
    assert "no place for its tensor 'layers.1.attention.wg.weight'" in msg and "attention.wg.weight (layers 1,3)" in msg


def test_checkpoint_without_a_layer_map_counts_as_softmax_only(tmp_path):
    """A DCP checkpoint with no `linear_layer_map` (a stock llama3 one) converts like a ratio-0 one."""
    from torchtitan.components.checkpoint import ModelWrapper

    from titan_linear.initial_load import model_tensors, plan
    from titan_linear.models.hybrid import HybridTransformer

    _, args = _config(tmp_path / "unused", "--model.linear_attn_ratio", "0")
    state = {k: v for k, v in ModelWrapper(build(args)).state_dict().items() if k != "linear_layer_map"}
    dcp.save(state, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    _, args = _config(tmp_path / "unused", "--model.linear_attn_ratio", "0.5")
    own, maps = model_tensors(HybridTransformer, args)
    todo = plan(str(tmp_path / "step-1"), own, maps, convert=True, model_only=True)
    assert todo.skip == {"linear_layer_map"} and "layer map SSSS -> SLSL" in todo.notes[0], todo
    with pytest.raises(ValueError, match=CONVERT_KEY):
        plan(str(tmp_path / "step-1"), own, maps, convert=False, model_only=True)


def test_linearize_through_the_torchtitan_trainer(tmp_path):
    """run_train.sh at ratio 0.5 from a ratio-0 DCP checkpoint: the trainer logs the conversion,
    loads it and trains (the loss falls)."""
    from tests.integration.harness import losses_of, run_train, SMALL, tail

    src = tmp_path / "pre" / "step-4"
    _save(src, "--model.linear_attn_ratio", "0")
    proc = run_train([
        "--config", DEBUG_TOML, *SMALL, *TINY, "--job.dump_folder", str(tmp_path / "post"),
        "--model.linear_attn_ratio", "0.5", "--checkpoint.initial_load_path", str(src),
        "--checkpoint.initial_load_model_only", "--checkpoint.initial_load_convert_layer_map",
        "--checkpoint.interval", "1000", "--training.steps", "6", "--lr_scheduler.warmup_steps", "1",
        "--optimizer.lr", "1e-2",
    ])
    assert proc.returncode == 0, tail(proc.stdout)
    assert f"Loading the checkpoint from {src}" in proc.stdout, tail(proc.stdout)
    # once from launch check, once from rank 0
    assert proc.stdout.count("layer map SSSS -> SLSL (layers 1,3 become linear") == 2, tail(proc.stdout)
    losses = [loss for _, (loss, _) in sorted(losses_of(proc.stdout).items())]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
