"""Every shipped TOML parses and builds; bad values stop with one line naming the key."""

import copy
import glob
import os
import re

import pytest
import torch

from titan_linear import launch
from titan_linear.models.hybrid import HybridTransformer

from tests.helpers import REPO

ROOT = str(REPO)
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "train_configs", "*.toml")))
DEBUG = os.path.join(ROOT, "train_configs", "debug_model.toml")


def _argv(config, *extra):
    return launch.with_config_module(["--job.config_file", config, *extra])


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_shipped_config_builds_on_meta(config):
    job_config, args = launch.check(_argv(config))
    with torch.device("meta"):
        model = HybridTransformer(copy.deepcopy(args))
    assert len(model.layers) == args.n_layers
    assert job_config.metrics.enable_tensorboard
    m = re.search(r"linear_(\d\.\d\d)\.toml$", config)
    if m:
        ratio = float(m.group(1))
        assert job_config.model.linear_attn_ratio == ratio
        assert len(model.linear_layers) == int(ratio * args.n_layers + 0.5)
        assert f"{round(ratio * 100)}% linear" in job_config.job.description
        assert os.path.basename(config)[:-5] in job_config.job.dump_folder
    if os.path.basename(config) == "llama3_1b.toml":
        assert model.linear_layers == []


def test_1b_flavor_is_llama_3_2_1b():
    _, args = launch.check(_argv(os.path.join(ROOT, "train_configs", "llama3_1b.toml")))
    with torch.device("meta"):
        model = HybridTransformer(args)
    n = sum(p.numel() for p in model.parameters())
    assert 1.45e9 < n < 1.55e9  # 1.24B + untied output embedding (262M)


def test_dump_folders_are_distinct():
    folders = [launch.check(_argv(c))[0].job.dump_folder for c in CONFIGS]
    assert len(set(folders)) == len(folders)


BAD = [
    (["--model.linear_attn_ratio", "1.5"], "model.linear_attn_ratio", "[0, 1]"),
    (["--model.linear_attn_ratio", "-0.1"], "model.linear_attn_ratio", "[0, 1]"),
    (["--model.linear_attn_layers", "0", "9"], "model.linear_attn_layers", "[0, 5]"),
    (["--model.linear_attn_layers", "1", "1"], "model.linear_attn_layers", "repeated"),
    (["--model.linear_attn_placement", "sideways"], "model.linear_attn_placement", "uniform"),
    (["--model.n_heads", "7"], "model.n_heads", "divisor of model.dim"),
    (["--model.n_kv_heads", "3"], "model.n_kv_heads", "divisor of model.n_heads"),
    (["--parallelism.context_parallel_degree", "2"], "parallelism.context_parallel_degree", "linear"),
    (["--model.flavor", "9T"], "model.flavor", "debugmodel"),
    (["--validation.enable", "--validation.seq_len", "512"], "validation.seq_len", "training.seq_len"),
]


@pytest.mark.parametrize("extra,key,allowed", BAD, ids=[b[1] + "=" + b[0][-1] for b in BAD])
def test_bad_value_one_line_error(extra, key, allowed, capsys):
    rc = launch.main(["check", "--job.config_file", DEBUG, *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert key in err and allowed in err
    assert extra[-1] in err


def test_ratio_not_a_number_in_toml(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    text = open(DEBUG).read().replace("linear_attn_ratio = 0.5", 'linear_attn_ratio = "half"')
    bad.write_text(text)
    rc = launch.main(["check", "--job.config_file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "model.linear_attn_ratio" in err and "half" in err and "[0, 1]" in err


def test_convert_layer_map_not_a_boolean_in_toml(tmp_path, capsys):
    """A string is not silently taken as true (bool("false") would be)."""
    bad = tmp_path / "bad.toml"
    bad.write_text(open(DEBUG).read().replace("[checkpoint]\n", '[checkpoint]\ninitial_load_convert_layer_map = "false"\n'))
    rc = launch.main(["check", "--job.config_file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "checkpoint.initial_load_convert_layer_map = 'false'" in err and "true or false" in err


@pytest.mark.parametrize("key", ["stop_on_nonfinite", "stop_on_nonfinite_loss"])
def test_monitor_switch_not_a_boolean_in_toml(tmp_path, capsys, key):
    """The same for the [monitor] switches (a "false" string used to keep the stops on)."""
    bad = tmp_path / "bad.toml"
    bad.write_text(open(DEBUG).read() + f'\n[monitor]\n{key} = "false"\n')
    rc = launch.main(["check", "--job.config_file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert f"monitor.{key} = 'false'" in err and "true or false" in err


def test_unknown_toml_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(open(DEBUG).read().replace("[model]\n", "[model]\nlinear_atn_ratio = 0.5\n"))
    rc = launch.main(["check", "--job.config_file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "linear_atn_ratio" in err


def test_missing_config_file(capsys):
    rc = launch.main(["check", "--job.config_file", "/nonexistent/x.toml"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--job.config_file" in err and "/nonexistent/x.toml" in err
