"""`titan_linear.eval.harness`: the lm-eval model `titan_linear` on the random-init debug model (CPU,
64-token training length), checked against the perplexity tool, the model's own logits and the
project's greedy generation; the CLI on the packaged tasks; one-line refusals."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from titan_linear.eval import harness, perplexity  # noqa: E402

from tests.helpers import DEBUG_TOML, REPO  # noqa: E402

OVERRIDES = ["--training.seq_len", "64"]
MAX_LENGTH = 160


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small forwards: two intra-op threads on a shared 2-core machine wait on each other
    (~10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm():
    return harness.TitanLinearLM(config=DEBUG_TOML, random_init=True, device="cpu", max_length=MAX_LENGTH,
                                 batch_size=4, overrides=OVERRIDES)


def _texts(n: int) -> list[str]:
    with open(f"{harness.TASKS_DIR}/shakespeare_ppl.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:n]


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab) fp32 log-probabilities of each next token, one unpadded forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)


def _req(kind: str, *args) -> Instance:
    return Instance(kind, {}, args, 0)


def test_rolling_loglikelihood_agrees_with_perplexity_tool(lm, tmp_path):
    """One window: lm-eval's rolling log-likelihood of a paragraph is -(perplexity's loss x tokens)
    on the same tokens ([BOS] + paragraph) of the same random model."""
    text = next(t for t in _texts(200) if 80 <= len(lm.tok_encode(t, add_special_tokens=False)) <= MAX_LENGTH)
    n = len(lm.tok_encode(text, add_special_tokens=False))
    (tmp_path / "doc.txt").write_text(text)
    out = tmp_path / "ppl.json"
    rc = perplexity.main(["--config", DEBUG_TOML, "--random-init", "--device", "cpu", "--dataset", "text",
                          "--dataset-path", str(tmp_path / "doc.txt"), "--seq-lens", str(n), "--max-batches", "1",
                          "--out", str(out), "--", *OVERRIDES])
    assert rc == 0
    ppl = json.loads(out.read_text())["results"][0]
    assert ppl["n_tokens"] == n
    (ours,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    assert ours == pytest.approx(-ppl["loss"] * n, rel=1e-4)


def test_rolling_windows_score_every_token_once(lm, monkeypatch):
    """Texts longer than max_length: a sum over windows of at most max_length inputs, each token
    predicted once, each window as long as possible (computed here without lm-eval's helpers),
    and the batched, padded forwards give what one unpadded forward per window gives."""
    L = 16
    monkeypatch.setattr(lm, "max_length", L)
    size = {t: len(lm.tok_encode(t, add_special_tokens=False)) for t in _texts(100)}
    texts = [t for t in size if size[t] > 2 * L][:2] + [next(t for t in size if size[t] < L)]
    ours = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    for text, got in zip(texts, ours):
        s = [lm.bos_id] + lm.tok_encode(text, add_special_tokens=False)
        n = len(s) - 1
        expected, covered = 0.0, 0
        while covered < n:
            end = min(covered + L, n)
            start = max(0, end - L)
            logp = _logprobs(lm.model, s[start:end + 1])  # row j predicts s[start + j + 1]
            expected += sum(logp[j - start - 1, s[j]].item() for j in range(covered + 1, end + 1))
            covered = end
        assert got == pytest.approx(expected, rel=1e-5)


def test_loglikelihood_is_the_sum_of_continuation_logprobs(lm):
    pairs = [("ROMEO:\nBut soft, what light", " through yonder window breaks?"),
             ("JULIET:", "\nO Romeo, Romeo!"), ("", "First Citizen:"), ("KING RICHARD II:\nNo", "")]
    ours = lm.loglikelihood([_req("loglikelihood", c, k) for c, k in pairs])
    tok = lm.titan_tokenizer
    for (ctx, cont), (logprob, greedy) in zip(pairs, ours):
        if ctx:
            whole = tok.encode(ctx + cont, add_bos=True, add_eos=False)
            n_ctx = len(tok.encode(ctx, add_bos=True, add_eos=False))
        else:
            whole = [tok.bos_id] + tok.encode(cont, add_bos=False, add_eos=False)
            n_ctx = 1
        if len(whole) == n_ctx:
            assert (logprob, greedy) == (0.0, True)
            continue
        logp = _logprobs(lm.model, whole)[n_ctx - 1:]
        target = torch.tensor(whole[n_ctx:])
        assert logprob == pytest.approx(logp.gather(1, target[:, None]).sum().item(), rel=1e-5)
        assert greedy == bool((logp.argmax(-1) == target).all())


def test_is_greedy(lm):
    ctx = lm.tok_encode("ROMEO:\n")
    a = int(_logprobs(lm.model, ctx + [0])[-1].argmax())
    b = int(_logprobs(lm.model, ctx + [a, 0])[-1].argmax())
    other = (b + 1) % lm.model.model_args.vocab_size
    scores = lm._loglikelihood_tokens([(("", ""), ctx, [a, b]), (("", ""), ctx, [a, other])])
    assert scores[0][1] is True and scores[1][1] is False
    assert scores[0][0] > scores[1][0]


def test_generate_until_is_greedy_generation_cut_at_until(lm):
    from titan_linear.inference import generate, SamplingConfig

    prompt = "ROMEO:\n"
    ref = generate(lm.model, lm.tok_encode(prompt), 12, SamplingConfig(), eos_id=lm.eos_id, cuda_graph=False)
    text = lm.tok_decode(ref.tokens)
    assert len(text) >= 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    full, cut = lm.generate_until([_req("generate_until", prompt, {"until": [], "max_gen_toks": 12}),
                                   _req("generate_until", prompt, {"until": ["\x00never", stop], "max_gen_toks": 12})])
    assert full == text
    assert cut == text[:text.index(stop)] and len(cut) < len(text)


@pytest.mark.parametrize("kwargs, expected", [
    ({"num_beams": 4}, "generation_kwargs ['num_beams'] are not allowed"),
    ({"max_gen_toks": MAX_LENGTH}, f"max_gen_toks = {MAX_LENGTH} is not allowed"),
])
def test_generation_kwargs_refused(lm, kwargs, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        lm.generate_until([_req("generate_until", "ROMEO:", kwargs)])


def _cli(tmp_path, *flags):
    out = tmp_path / "harness.json"
    rc = harness.main(["--config", DEBUG_TOML, "--random-init", "--device", "cpu", "--out", str(out), *flags,
                       "--", *OVERRIDES])
    return rc, out


def test_cli_runs_every_local_task(tmp_path, capsys):
    rc, out = _cli(tmp_path, "--tasks", "titan_linear_shakespeare", "--limit", "2", "--num-fewshot", "1",
                   "--batch-size", "4")
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["tool"] == "titan_linear.eval.harness" and r["model"]["layer_map"] == "SLSLSL"
    assert r["settings"]["max_length"] == 64 and r["settings"]["limit"] == 2
    res = r["results"]
    ppl, mc, gen = (res[f"titan_linear_shakespeare_{t}"] for t in ("ppl", "next_line", "recall"))
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ppl[key] > 0, key
    # bits per byte and byte perplexity are one number in two units
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-9)
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert 0 <= gen["exact_match,strip"] <= 1
    assert r["n_shot"] == {"titan_linear_shakespeare_ppl": 0, "titan_linear_shakespeare_next_line": 1,
                           "titan_linear_shakespeare_recall": 1}
    assert all(v["effective"] == 2 for v in r["n_samples"].values())


def test_registered_for_lm_eval_by_name(tmp_path):
    """lm-eval builds the model from its name and a model_args string, as its own CLI does."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"config={DEBUG_TOML},random_init=True,device=cpu,overrides={' '.join(OVERRIDES)}"
    manager = TaskManager(include_path=harness.TASKS_DIR, include_defaults=False)
    results = lm_eval.simple_evaluate(model="titan_linear", model_args=args, tasks=["titan_linear_shakespeare_ppl"],
                                      task_manager=manager, limit=1, log_samples=False)
    assert results["config"]["titan_linear"]["weights"] == "random init"
    assert results["results"]["titan_linear_shakespeare_ppl"]["bits_per_byte,none"] > 0


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setattr(harness.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(harness.hub, "hub_reachable", lambda timeout=5.0: False)


@pytest.mark.parametrize("flags, expected", [
    (["--tasks", "hellaswag"], "--tasks = 'hellaswag' is not allowed: it is not a local task"),
    (["--tasks", "titan_linear_shakespeare_pp"], "did you mean 'titan_linear_shakespeare_ppl'?"),
    (["--tasks", "titan_linear_shakespeare_ppl", "--limit", "0"], "--limit = 0 is not allowed: an integer >= 1"),
    (["--tasks", "titan_linear_shakespeare_ppl", "--batch-size", "0"], "--batch-size = 0 is not allowed"),
    (["--tasks", "titan_linear_shakespeare_ppl", "--num-fewshot", "-1"], "--num-fewshot = -1 is not allowed"),
    (["--tasks", "titan_linear_shakespeare_ppl", "--include-path", "/no/such"],
     "--include-path = '/no/such' is not allowed: no such directory"),
    (["--tasks", "titan_linear_shakespeare_ppl", "--max-length", "1"], "--max-length = 1 is not allowed"),
], ids=["hub", "unknown", "limit", "batch", "fewshot", "include", "max_length"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, no_hub, flags, expected):
    rc, _ = _cli(tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("titan_linear.eval.harness: error: ") and expected in err[0], err
    assert list(tmp_path.iterdir()) == []
    if "hellaswag" in flags or "titan_linear_shakespeare_pp" in flags:
        assert "unreachable" in err[0] and harness.TASKS_DIR in err[0]


@pytest.fixture
def hub_index(monkeypatch, tmp_path_factory):
    """lm-eval's index stood in for by the local tasks plus one hub task, and the hub offline."""
    import datasets
    from huggingface_hub import constants
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("hub_tasks")
    (folder / "hub_only.yaml").write_text("task: hub_only\ndataset_path: titan-linear-test/no-such-dataset\n"
                                          "output_type: loglikelihood_rolling\ntest_split: test\n"
                                          "doc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    index = TaskManager(include_path=[harness.TASKS_DIR, str(folder)], include_defaults=False)
    monkeypatch.setattr(harness, "lm_eval_index", lambda folders: index)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("task, expected", [
    ("no_such_task", "nor one of lm-eval's"),
    ("hub_only", "--tasks = 'hub_only' is not allowed: loading it failed (offline: only cached datasets load)"),
])
def test_offline_hub_task_and_unknown_task(tmp_path, capsys, hub_index, task, expected):
    rc, _ = _cli(tmp_path, "--tasks", task)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_task_data_rebuilds_identically():
    from titan_linear.tools import make_harness_tasks

    assert make_harness_tasks.main(["--check"]) == 0


def test_only_the_harness_imports_lm_eval():
    """lm-eval is an optional extra: no other module of the package imports it."""
    import ast

    package = REPO / "titan_linear"
    for path in package.rglob("*.py"):
        if path == package / "eval" / "harness.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "lm_eval" or n.startswith("lm_eval.") for n in names), path


def test_lm_eval_own_models_stay_known_after_import():
    """lm-eval 0.4.13 adds its own models to the registry only when the registry is empty at the first
    look-up: importing the harness (which registers titan_linear) must not hide `hf` (fresh process)."""
    import subprocess
    import sys

    script = ("import titan_linear.eval.harness\n"
              "from lm_eval.api.registry import get_model\n"
              "print(get_model('hf').__name__, get_model('titan_linear').__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["HFLM", "TitanLinearLM"]
