"""titan_linear.eval.samples: every run answers every prompt in one markdown file, the same
file for the same seed; bad --run values stop with one line, exit 2, nothing written."""

from pathlib import Path

import pytest

from tests.helpers import DEBUG_TOML
from titan_linear.eval.samples import main, read_prompts

PROMPTS = Path(__file__).resolve().parents[2] / "titan_linear" / "assets" / "eval" / "prompts.txt"


def test_shipped_prompts():
    prompts = read_prompts(str(PROMPTS))
    assert 10 <= len(prompts) <= 20
    assert len(set(prompts)) == len(prompts)
    assert any(p.endswith(":\n") for p in prompts)  # speaker-name prompts, as tinyshakespeare has them


def _sample(tmp_path, out_name, seed_a=1, seed_b=2, extra=()):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\\n\n\nOnce upon a time\n")
    out = tmp_path / out_name
    rc = main(["--prompts", str(prompts), "--run", f"alpha={DEBUG_TOML}:random:{seed_a}",
               "--run", f"beta={DEBUG_TOML}:random:{seed_b}", "--max-new-tokens", "4", "--out", str(out), *extra])
    assert rc == 0
    return out.read_text()


def test_two_runs_side_by_side_and_deterministic(tmp_path):
    md = _sample(tmp_path, "a.md")
    sections = md.split("## Prompt ")[1:]
    assert len(sections) == 2
    assert sections[0].startswith("1\n\n> ROMEO:") and sections[1].startswith("2\n\n> Once upon a time")
    for section in sections:
        alpha, beta = section.split("### alpha")[1].split("### beta")
        assert "layer map `SLSLSL`" in alpha and "layer map `SLSLSL`" in beta
        assert "4 new tokens" in alpha and "4 new tokens" in beta or "stopped at EOS" in section
    assert "random init (seed 1)" in md and "random init (seed 2)" in md
    # Different random weights give different text; the same seeds the same file.
    texts = [s.split("```text\n")[1].split("\n```")[0] for s in md.split("### ")[1:]]
    assert texts[0] != texts[1] and texts[2] != texts[3]
    assert texts[0].startswith("ROMEO:\n") and texts[2].startswith("Once upon a time")
    assert _sample(tmp_path, "b.md") == md


@pytest.mark.parametrize("run,expected", [
    ("alpha", "write NAME=TOML:CHECKPOINT"),
    (f"{DEBUG_TOML}:random", "write NAME=TOML:CHECKPOINT"),
    (f"alpha={DEBUG_TOML}", "write NAME=TOML:CHECKPOINT"),
    (f"={DEBUG_TOML}:random", "write NAME=TOML:CHECKPOINT"),
    ("alpha=/no/such.toml:random", "no such config file"),
    (f"alpha={DEBUG_TOML}:/no/such/checkpoint", "no such checkpoint"),
    (f"alpha={DEBUG_TOML}:random:x", "integer seed"),
], ids=["name-only", "no-name", "no-checkpoint", "empty-name", "config", "checkpoint", "seed"])
def test_bad_run_is_one_line_exit_2_and_writes_nothing(run, expected, tmp_path, capsys):
    out = tmp_path / "out" / "s.md"
    rc = main(["--prompts", str(PROMPTS), "--run", run, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("titan_linear.eval.samples: error: --run = ")
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_repeated_run_name_and_empty_prompts_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    out = tmp_path / "s.md"
    spec = f"alpha={DEBUG_TOML}:random"
    assert main(["--prompts", str(PROMPTS), "--run", spec, "--run", spec, "--out", str(out)]) == 2
    assert "--run = 'alpha'" in capsys.readouterr().err
    assert main(["--prompts", str(empty), "--run", spec, "--out", str(out)]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert not out.exists()
