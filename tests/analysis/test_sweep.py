"""The sweep driver (titan_linear.analysis.sweep): grid expansion and names, one-line refusals of
bad specs with nothing launched, --dry-run and --slurm output, and one real two-run sweep of the
debug model through torchrun on the CPU: a re-run skips both, a cut run resumes to the same end."""

import json
import os
import shutil
import subprocess
import textwrap

import pytest

from tests.integration.harness import REPO, losses_of, strip_ansi
from titan_linear.analysis import sweep as sweep_module
from titan_linear.analysis.runs import read_run
from titan_linear.analysis.sweep import main, parse_base
from titan_linear.analysis.sweep_spec import load_spec

DEBUG = str(REPO / "train_configs" / "debug_model.toml")
RUN_KEYS = {"name", "group", "base_config", "overrides", "seed"}


def write_spec(tmp_path, body: str, out: str | None = None) -> str:
    out = out or str(tmp_path / "out")
    path = tmp_path / "spec.toml"
    path.write_text(f'base = "{DEBUG}"\nout = "{out}"\n' + textwrap.dedent(body))
    return str(path)


GRID = """
    [fixed]
    "training.steps" = 4
    [grid]
    "model.linear_attn_ratio" = [0, 0.5]
    "debug.seed" = [0, 1]
    [[runs]]
    "model.linear_attn_ratio" = 0.5
    "model.linear_attn_placement" = ["front", "uniform"]
    "debug.seed" = [0, 1]
"""


def test_grid_expansion_names_groups_and_order(tmp_path):
    spec = load_spec(write_spec(tmp_path, GRID), parse_base)
    names = [r.name for r in spec.runs]
    # [[runs]]'s uniform point at 0.5 is the grid's own point: run once. Seed-major order.
    assert names == ["ratio0-uniform-seed0", "ratio0.5-uniform-seed0", "ratio0.5-front-seed0",
                     "ratio0-uniform-seed1", "ratio0.5-uniform-seed1", "ratio0.5-front-seed1"]
    by_name = {r.name: r for r in spec.runs}
    front = by_name["ratio0.5-front-seed1"]
    assert front.group == "ratio0.5-front"
    assert front.overrides == {"training.steps": 4, "model.linear_attn_ratio": 0.5,
                               "model.linear_attn_placement": "front", "debug.seed": 1}
    assert front.dump_folder == os.path.join(str(tmp_path / "out"), "ratio0.5-front-seed1")
    assert by_name["ratio0-uniform-seed0"].overrides == {"training.steps": 4, "model.linear_attn_ratio": 0, "debug.seed": 0}


def test_list_typed_key_takes_lists_of_lists(tmp_path):
    spec = load_spec(write_spec(tmp_path, """
        [grid]
        "model.linear_attn_layers" = [[1, 3], [0]]
        [[runs]]
        "model.linear_attn_layers" = [2, 4]
    """), parse_base)
    assert [r.name for r in spec.runs] == ["layers1_3", "layers0", "layers2_4"]
    assert spec.runs[2].overrides == {"model.linear_attn_layers": [2, 4]}


@pytest.mark.parametrize("body, words", [
    ('[grid]\n"model.linear_attn_rato" = [0.5]\n',
     ["[grid]", "'model.linear_attn_rato'", "did you mean 'model.linear_attn_ratio'"]),
    ('[grid]\n"training.seed" = [0, 1]\n', ["'training.seed'", "did you mean 'debug.seed'"]),
    ('[grid]\n"model.linear_attn_ratio" = ["half"]\n', ["model.linear_attn_ratio = 'half'", "a number"]),
    ('[grid]\n"model.linear_attn_ratio" = [0.5, 1.5]\n',
     ["run ratio1.5", "model.linear_attn_ratio = 1.5 is not allowed", "[0, 1]"]),
    ('[grid]\n"model.linear_attn_placement" = ["uniform", "sideways"]\n',
     ["run sideways", "model.linear_attn_placement", "'sideways'", "front"]),
    ('[fixed]\n"checkpoint.enable" = false\n[grid]\n"debug.seed" = [0]\n', ["checkpoint.enable = False", "checkpoints"]),
    ('[grid]\n"metrics.enable_tensorboard" = [true, false]\n',
     ["[grid] metrics.enable_tensorboard = False", "TensorBoard events"]),
    ('[grid]\n"job.dump_folder" = ["x"]\n', ["job.dump_folder", "the sweep driver sets it"]),
    ('[grid]\n"model.linear_attn_ratio" = 0.5\n', ["[grid] model.linear_attn_ratio = 0.5", "a list of values"]),
    ('[grid]\n"debug.seed" = [0]\n[eval]\nfactors = [0]\n', ["[eval] factors = [0]"]),
    ('[grid]\n"debug.seed" = [0]\n[eval]\nharness_tasks = "hellaswag"\n',
     ["[eval] harness_tasks = 'hellaswag'", "a list of lm-eval task names"]),
    ('[grid]\n"debug.seed" = [0]\n[eval]\nharness_tasks = ["a", 3]\n', ["[eval] harness_tasks = ['a', 3]"]),
    ('[grid]\n"debug.seed" = [0]\n[eval]\nharness_limit = 0\n', ["[eval] harness_limit = 0", "integer >= 1"]),
])
def test_bad_spec_is_one_line_exit_2_nothing_written(tmp_path, capsys, body, words):
    out = tmp_path / "out"
    assert main([write_spec(tmp_path, body, str(out)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("titan_linear.analysis.sweep: error: ")
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--per-gpu", "2"], ["--per-gpu = 2", "--gpus"]),
    (["--gpus", "0,0"], ["--gpus = '0,0'", "distinct"]),
    (["--parallel", "0"], ["--parallel = 0"]),
    (["--only", "nothing*"], ["--only = 'nothing*'", "ratio0-uniform-seed0"]),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, words):
    assert main([write_spec(tmp_path, GRID), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_runs_and_commands_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([write_spec(tmp_path, GRID, str(out)), "--dry-run", "--parallel", "2", "--eval",
                 "--only", "ratio0.5-*"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    heads = [ln for ln in text.splitlines() if not ln.startswith(" ")][:-1]
    assert [h.split()[0] for h in heads] == ["ratio0.5-uniform-seed0", "ratio0.5-front-seed0",
                                             "ratio0.5-uniform-seed1", "ratio0.5-front-seed1"]
    assert all("starts fresh" in h for h in heads)
    launch = next(ln for ln in text.splitlines() if "ratio0.5-front-seed1" in ln and "titan_linear.launch" in ln)
    for piece in ["--rdzv_endpoint localhost:0", "--nproc_per_node 1", f"--job.config_file {DEBUG}",
                  "--model.linear_attn_placement front", "--debug.seed 1", "--checkpoint.enable",
                  "--metrics.enable_tensorboard",
                  f"--job.dump_folder {out}/ratio0.5-front-seed1", "OMP_NUM_THREADS="]:
        assert piece in launch, piece
    perplexity = [ln for ln in text.splitlines() if "titan_linear.eval.perplexity" in ln]
    assert len(perplexity) == 4 and "--seq-lens 256 1024" in perplexity[0]  # 1x and 4x seq_len
    assert "titan_linear.eval.harness" not in text  # no [eval] harness_tasks: perplexity only
    assert text.splitlines()[-1] == "4 runs, 2 at a time"


def test_dry_run_lists_the_harness_when_the_spec_names_tasks(tmp_path, capsys):
    out = tmp_path / "out"
    body = GRID + '[eval]\nharness_tasks = ["titan_linear_shakespeare_ppl", "arc_easy"]\nharness_limit = 20\n'
    assert main([write_spec(tmp_path, body, str(out)), "--dry-run", "--eval", "--only", "ratio0.5-front-seed1"]) == 0
    harness = [ln for ln in capsys.readouterr().out.splitlines() if "titan_linear.eval.harness" in ln]
    assert len(harness) == 1
    for piece in ["--tasks titan_linear_shakespeare_ppl arc_easy", "--limit 20",
                  f"--out {out}/ratio0.5-front-seed1/eval/harness.json",
                  f"--checkpoint {out}/ratio0.5-front-seed1/checkpoint", "--model.linear_attn_placement front"]:
        assert piece in harness[0], piece


def test_slurm_writes_an_array_script_and_run_records(tmp_path, capsys):
    out = tmp_path / "out"
    script = tmp_path / "sweep.sbatch"
    spec = write_spec(tmp_path, GRID + '[slurm]\noptions = ["--time=01:00:00", "--cpus-per-task=4"]\n', str(out))
    assert main([spec, "--slurm", str(script), "--eval"]) == 0
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --array=0-5" in text and "#SBATCH --time=01:00:00" in text
    assert "#SBATCH --cpus-per-task=4" in text and "--cpus-per-task=8" not in text
    assert text.count("titan_linear.launch run") == 6 and text.count("titan_linear.eval.perplexity") == 6
    names = sorted(os.listdir(out))
    assert len(names) == 6
    record = json.loads((out / "ratio0.5-front-seed1" / "run.json").read_text())
    assert set(record) == RUN_KEYS
    assert record["group"] == "ratio0.5-front" and record["seed"] == 1 and record["base_config"] == DEBUG


def test_a_failed_run_is_reported_by_name_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    spec = load_spec(write_spec(tmp_path, '[fixed]\n"training.steps" = 4\n[grid]\n"debug.seed" = [0, 1]\n'), parse_base)
    sweep_module.check_runs(spec, spec.runs, False)

    def fake_launch(spec_, run, python):  # seed0 saves its final step; seed1 dies with a message
        if run.name == "seed0":
            step = os.path.join(run.dump_folder, "checkpoint", "step-4")
            return ["bash", "-c", f"mkdir -p {step} && touch {step}/.metadata"]
        return ["bash", "-c", "echo training...; echo 'titan_linear: error: rank 0 failed: boom'; exit 1"]

    monkeypatch.setattr(sweep_module, "launch_command", fake_launch)
    assert sweep_module.sweep(spec, spec.runs, [{}, {}], False, "python") == 1
    captured = capsys.readouterr()
    assert "seed1: failed" in captured.err and "titan_linear: error: rank 0 failed: boom" in captured.err
    rows = {ln.split()[0]: ln.split() for ln in captured.out.splitlines()[1:3]}
    assert rows["seed0"][1:4] == ["done", rows["seed0"][2], "4/4"] and rows["seed1"][1] == "failed"
    for run in spec.runs:
        assert set(json.loads(open(os.path.join(run.dump_folder, "run.json")).read())) == RUN_KEYS


TINY = """
    [fixed]
    "training.steps" = 4
    "checkpoint.interval" = 2
    "checkpoint.last_save_model_only" = false
    "training.seq_len" = 64
    "training.local_batch_size" = 4
    "metrics.log_freq" = 1
    "debug.deterministic" = true
    [grid]
    "debug.seed" = [0, 1]
    [eval]
    factors = [1, 2]
    max_tokens = 256
    harness_tasks = ["titan_linear_shakespeare_ppl"]
    harness_limit = 8
"""


@pytest.mark.integration
def test_real_sweep_skips_finished_runs_and_resumes_a_cut_one(tmp_path, capsys):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, TINY, str(out))
    # Two runs at once on the CPU: each has its own torchrun store on a free port.
    assert main([spec, "--parallel", "2"]) == 0, capsys.readouterr()
    runs = {name: out / name for name in ("seed0", "seed1")}
    for name, folder in runs.items():
        assert (folder / "checkpoint" / "step-4" / ".metadata").is_file()
        record = json.loads((folder / "run.json").read_text())
        assert record == {"name": name, "group": "debug_model", "base_config": DEBUG,
                          "overrides": {**record["overrides"], "debug.seed": int(name[-1])}, "seed": int(name[-1])}
    first = {n: losses_of(strip_ansi((f / "train.log").read_text())) for n, f in runs.items()}
    assert sorted(first["seed0"]) == [1, 2, 3, 4]
    assert first["seed0"][1] != first["seed1"][1]  # the seeds differ
    for name, folder in runs.items():  # the driver turned TensorBoard on: the runs reader has the curve
        read = read_run(str(folder))
        assert read["name"] == name and read["seed"] == int(name[-1]) and read["steps"] == 4
        assert dict(read["curves"]["train"]) == pytest.approx({s: v[0] for s, v in first[name].items()}, abs=1e-4)
    capsys.readouterr()

    sizes = {n: (f / "train.log").stat().st_size for n, f in runs.items()}
    assert main([spec]) == 0
    table = capsys.readouterr().out
    assert table.count("skipped") == 2 and "4/4" in table
    assert sizes == {n: (f / "train.log").stat().st_size for n, f in runs.items()}

    # Cut seed1 after its first checkpoint: its newest is step 2, as if stopped before step 4.
    shutil.rmtree(runs["seed1"] / "checkpoint" / "step-4")
    assert main([spec, "--eval", "--only", "seed1"]) == 0, capsys.readouterr()
    log = strip_ansi((runs["seed1"] / "train.log").read_text())
    resumed = log[log.rindex("titan_linear sweep:"):]
    assert "resuming from" in resumed and "step-2" in resumed
    again = losses_of(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):  # deterministic: the resumed steps repeat the uninterrupted ones
        assert again[step][0] == pytest.approx(first["seed1"][step][0], rel=1e-5)
    assert (runs["seed1"] / "checkpoint" / "step-4" / ".metadata").is_file()
    result = json.loads((runs["seed1"] / "eval" / "perplexity.json").read_text())
    assert [r["seq_len"] for r in result["results"]] == [64, 128]  # [eval] factors 1 and 2
    assert result["model"]["weights"].endswith("step-4") and result["model"]["layer_map"] == "SLSLSL"
    harness = json.loads((runs["seed1"] / "eval" / "harness.json").read_text())
    assert harness["results"]["titan_linear_shakespeare_ppl"]["bits_per_byte,none"] > 0
    assert harness["n_samples"]["titan_linear_shakespeare_ppl"]["effective"] == 8  # [eval] harness_limit


def test_names_show_switched_on_options_and_leave_out_per_seed_keys(tmp_path):
    (tmp_path / "ck0").mkdir()
    (tmp_path / "ck1").mkdir()
    spec = load_spec(write_spec(tmp_path, f"""
        [fixed]
        "training.steps" = 4
        [[runs]]
        "model.linear_attn_ratio" = 1.0
        "model.linear_attn_output_gate" = [true, false]
        "model.linear_attn_short_conv" = 4
        "job.description" = "from {tmp_path}/ck0"
        "debug.seed" = 0
        [[runs]]
        "model.linear_attn_ratio" = 1.0
        "model.linear_attn_output_gate" = [true, false]
        "model.linear_attn_short_conv" = 4
        "job.description" = "from {tmp_path}/ck1"
        "debug.seed" = 1
    """), parse_base)
    # job.description follows the seed: out of the names, so both seeds share each group
    assert [r.name for r in spec.runs] == ["gate-seed0", "seed0", "gate-seed1", "seed1"]
    groups = {r.name: r.group for r in spec.runs}
    assert groups["gate-seed0"] == groups["gate-seed1"] == "gate"
    assert groups["seed0"] == groups["seed1"]
    assert spec.runs[0].overrides["job.description"].endswith("ck0")


def test_names_leave_out_an_option_at_its_off_value(tmp_path):
    spec = load_spec(write_spec(tmp_path, """
        [fixed]
        "training.steps" = 4
        "model.linear_attn_ratio" = 1.0
        [[runs]]
        "model.linear_attn_output_gate" = true
        [[runs]]
        "model.linear_attn_short_conv" = [4, 0]
    """), parse_base)
    # the first block leaves the convolution at its default 0 (off): "gate", not "gate-conv0"
    # and the point with every option off takes the fallback name (the base config's)
    assert [r.name for r in spec.runs] == ["gate", "conv4", "debug_model"]


def test_prefix_starts_names_and_groups_and_bad_prefix_is_one_line(tmp_path, capsys):
    spec = load_spec(write_spec(tmp_path, 'prefix = "linearized"\n[grid]\n"model.linear_attn_ratio" = [0.5, 1.0]\n'
                                '"debug.seed" = [0, 1]\n'), parse_base)
    assert [r.name for r in spec.runs] == ["linearized-ratio0.5-seed0", "linearized-ratio1.0-seed0",
                                           "linearized-ratio0.5-seed1", "linearized-ratio1.0-seed1"]
    assert {r.group for r in spec.runs} == {"linearized-ratio0.5", "linearized-ratio1.0"}
    assert main([write_spec(tmp_path, 'prefix = "a b"\n[grid]\n"debug.seed" = [0]\n'), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prefix = 'a b' is not allowed" in err
