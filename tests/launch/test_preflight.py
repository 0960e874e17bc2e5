"""`launch check` finds before any rank starts what used to fail inside a rank.

Each case: one line on stderr naming the key and the value, exit status 2, and
nothing written (the dump folder is not even created).
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan_linear import launch
from titan_linear.checkpoint import check_intact, CheckpointError

from tests.helpers import DEBUG_TOML as DEBUG, OELM_TOML as OELM, REPO

ROOT = str(REPO)


def _check(capsys, tmp_path, *extra, config=DEBUG):
    dump = tmp_path / "dump"
    rc = launch.main(["check", "--job.config_file", config, "--job.dump_folder", str(dump), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err, dump


def _refused(capsys, tmp_path, *extra, config=DEBUG, needles=()):
    rc, err, dump = _check(capsys, tmp_path, *extra, config=config)
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("titan_linear: error: ")
    for n in needles:
        assert n in err, err
    assert not dump.exists()
    return err


# --- the recipe is checked for every model, and a key a model cannot honour is refused ---

@pytest.mark.parametrize("extra, needles", [
    (["--lr_scheduler.schedule", "bogus"], ["lr_scheduler.schedule = 'bogus'", "polynomial"]),
    (["--lr_scheduler.power", "2"], ["lr_scheduler.power = 2.0", "polynomial"]),
    (["--lr_scheduler.schedule", "polynomial", "--lr_scheduler.decay_ratio", "0.5"], ["lr_scheduler.decay_ratio"]),
    (["--monitor.grad_norm_warn", "-1"], ["monitor.grad_norm_warn = -1.0"]),
    (["--model.oelm_freeze", "kv"], ["model.oelm_freeze = 'kv'", "llama3_oelm only"]),
    (["--model.freeze_ratio", "0.5"], ["model.freeze_ratio = 0.5", "llama3_oelm only"]),
    (["--optimizer.early_step_in_backward"], ["optimizer.no_decay_bias_and_norm", "early_step_in_backward"]),
])
def test_recipe_keys_checked_on_the_hybrid(capsys, tmp_path, extra, needles):
    _refused(capsys, tmp_path, *extra, needles=needles)


@pytest.mark.parametrize("config", [DEBUG, OELM], ids=["llama3_mixed", "llama3_oelm"])
def test_recipe_applies_to_every_model(config):
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_linear.recipe import train_spec_builders

    job, _ = launch.check(launch.with_config_module(["--job.config_file", config]))
    spec = get_train_spec(job.model.name)
    for field, fn in train_spec_builders().items():
        assert getattr(spec, field) is fn, field


# --- data ---

def _write(path, text):
    path.write_text(text)
    return str(path)


def test_text_without_path(capsys, tmp_path):
    _refused(capsys, tmp_path, "--training.dataset", "text", needles=["training.dataset_path is not set", "'text'"])


def test_unknown_dataset(capsys, tmp_path):
    _refused(capsys, tmp_path, "--training.dataset", "shakespear", needles=["training.dataset = 'shakespear'", "tinyshakespeare"])


@pytest.mark.parametrize("content, needle", [("", "is empty"), ("\n\n   \n\n", "blank lines")])
def test_empty_or_blank_text(capsys, tmp_path, content, needle):
    path = _write(tmp_path / "t.txt", content)
    _refused(capsys, tmp_path, "--training.dataset", "text", "--training.dataset_path", path,
             needles=[f"training.dataset_path = {path!r}", needle])


@pytest.mark.parametrize("content, needle", [
    ('{"text": "a"}\n{"text": oops}\n', "line 2 is not JSON"),
    ("", "holds no records"),
    ('{"body": "a"}\n', 'no string "text" field'),
])
def test_bad_jsonl(capsys, tmp_path, content, needle):
    path = _write(tmp_path / "d.jsonl", content)
    _refused(capsys, tmp_path, "--training.dataset", "jsonl", "--training.dataset_path", path, needles=[needle])


def test_validation_data_checked_too(capsys, tmp_path):
    path = _write(tmp_path / "v.txt", "\n\n")
    _refused(capsys, tmp_path, "--validation.enable", "--validation.dataset", "text",
             "--validation.dataset_path", path, needles=["validation.dataset_path"])


def test_token_file_checked_over_every_id(capsys, tmp_path):
    ids = np.random.default_rng(0).integers(0, 2048, size=3_000_000, dtype=np.uint16)
    ids[2_900_000] = 4000  # far past the first million ids
    path = tmp_path / "tok.bin"
    ids.tofile(path)
    _refused(capsys, tmp_path, "--training.dataset", "tokens", "--training.dataset_path", str(path),
             needles=["training.dataset_path", "outside [0, 2048)", "0..4000"])
    ids[2_900_000] = 7
    ids.tofile(path)
    rc, err, _ = _check(capsys, tmp_path, "--training.dataset", "tokens", "--training.dataset_path", str(path))
    assert rc == 0, err


def test_missing_tokenizer_dir(capsys, tmp_path):
    _refused(capsys, tmp_path, "--model.hf_assets_path", str(tmp_path / "nope"), needles=["model.hf_assets_path"])


def test_tokenizer_larger_than_vocab(capsys, tmp_path):
    _refused(capsys, tmp_path, "--model.vocab_size", "1000", needles=["model.vocab_size = 1000", "2048"])


# --- resume ---

def _checkpoint(folder, step, layer_map, size=4096):
    state = {"linear_layer_map": torch.tensor(layer_map, dtype=torch.int8), "w": torch.randn(size)}
    dcp.save(state, checkpoint_id=str(folder / f"step-{step}"), no_dist=True)
    return folder / f"step-{step}"


def _one_data_file(step_dir):
    (file,) = [f for f in os.listdir(step_dir) if f.endswith(".distcp")]
    return step_dir / file


def test_resume_into_other_layer_map(capsys, tmp_path):
    ckpt = tmp_path / "dump" / "checkpoint"
    _checkpoint(ckpt, 10, [1, 1, 1, 0, 0, 0])
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path / "dump")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "LLLSSS" in err and "SLSLSL" in err and "step-10" in err


def test_truncated_checkpoint_names_file_and_earlier_step(capsys, tmp_path):
    ckpt = tmp_path / "dump" / "checkpoint"
    _checkpoint(ckpt, 5, [0, 1, 0, 1, 0, 1])
    bad = _checkpoint(ckpt, 10, [0, 1, 0, 1, 0, 1])
    data = _one_data_file(bad)
    data.write_bytes(data.read_bytes()[:100])
    dump = str(tmp_path / "dump")
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", dump])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(data) in err and "truncated" in err and "--checkpoint.load_step 5" in err
    # the opt-in way back: TorchTitan's own key
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", dump, "--checkpoint.load_step", "5"])
    err = capsys.readouterr().err
    assert rc == 0 and "resuming from" in err and "step-5" in err
    # and generate says the same of the damaged folder
    with pytest.raises(CheckpointError, match=r"truncated.*step-5 is intact"):
        check_intact(str(bad))


def test_truncated_metadata(capsys, tmp_path):
    bad = _checkpoint(tmp_path / "dump" / "checkpoint", 3, [0, 1, 0, 1, 0, 1])
    meta = bad / ".metadata"
    meta.write_bytes(meta.read_bytes()[:20])
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path / "dump")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(meta) in err and "unreadable" in err and "no earlier step is intact" in err


def test_incomplete_save_is_reported(capsys, tmp_path):
    ckpt = tmp_path / "dump" / "checkpoint"
    _checkpoint(ckpt, 5, [0, 1, 0, 1, 0, 1])
    cut = _checkpoint(ckpt, 10, [0, 1, 0, 1, 0, 1])
    os.remove(cut / ".metadata")
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path / "dump")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "step-10 is incomplete" in err and "resuming from step-5" in err


def test_load_step_that_does_not_exist(capsys, tmp_path):
    _checkpoint(tmp_path / "dump" / "checkpoint", 5, [0, 1, 0, 1, 0, 1])
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path / "dump"),
                      "--checkpoint.load_step", "7"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "checkpoint.load_step = 7" in err and "steps there: 5" in err


# --- the dump folder's lock ---

def test_live_run_holds_its_dump_folder(capsys, tmp_path):
    dump = tmp_path / "dump"
    lock = launch.take_lock(str(dump))
    try:
        rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", str(dump)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "job.dump_folder" in err and f"pid {os.getpid()}" in err
    finally:
        lock.close()
    # a lock file left by a dead holder does not block
    assert (dump / launch.LOCK_FILE).exists()
    rc = launch.main(["check", "--job.config_file", DEBUG, "--job.dump_folder", str(dump)])
    assert rc == 0, capsys.readouterr().err


def test_config_ok_writes_nothing(capsys, tmp_path):
    rc, err, dump = _check(capsys, tmp_path)
    assert rc == 0 and not dump.exists()


# --- the README's set-up works as written ---

def test_debug_config_saves_a_checkpoint_for_generate():
    """The README runs `generate --checkpoint outputs/debug_model/checkpoint` right after `./dev.sh train`."""
    job, _ = launch.check(launch.with_config_module(["--job.config_file", DEBUG]))
    assert job.checkpoint.enable and job.training.steps % job.checkpoint.interval == 0
    assert job.lr_scheduler.warmup_steps <= job.training.steps


def test_relative_config_is_the_callers(tmp_path):
    """run_train.sh resolves a relative --config against the caller's directory, not the repo's."""
    import subprocess
    import sys

    (tmp_path / "mine.toml").write_text(open(DEBUG).read().replace("linear_attn_ratio = 0.5", "linear_attn_ratio = 7"))
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([os.path.join(ROOT, "run_train.sh"), "--config", "mine.toml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("titan_linear: error: model.linear_attn_ratio = 7 is not allowed: "
                                   "a number in [0, 1]"), proc.stderr


@pytest.mark.parametrize("extra, needles", [
    (["--monitor.grad_norm_warn", "abc"], ["--monitor.grad-norm-warn", "'abc'"]),
    (["--monitor.bogus", "1"], ["Unrecognized options: --monitor.bogus"]),
])
def test_bad_command_line_flag_is_one_line(capsys, tmp_path, extra, needles):
    """tyro's framed message on a flag it cannot parse becomes one line."""
    _refused(capsys, tmp_path, *extra, needles=needles)
