"""An exported folder evaluated with lm-eval's own `hf` model (HFLM, trust_remote_code) on the
packaged offline tasks agrees with the native adapter (`titan_linear`, titan_linear.eval.harness)
on the same random-init weights: perplexity, multiple choice and greedy generation, each compared
per document as well as on the task's metrics.

What HFLM does with the export (lm-eval 0.4.13, lm_eval/models/huggingface.py):
- loglikelihood / loglikelihood_rolling: `model(input_ids)` with no attention_mask on batches
  right-padded with token 0; every layer is causal, so the padding cannot reach a real position;
- generate_until: `generate(input_ids, attention_mask)`, batches left-padded: the export refuses a
  mask with zeros (its linear layers see every position), so generation runs with batch size 1;
- tokens: contexts get BOS only with `add_bos_token=True` (the exported tokenizer, like the
  project's, adds none by itself); the rolling windows of a perplexity task start from BOS (the
  `prefix_token_id`) anyway, and `add_bos_token=True` puts a second BOS there (lm-eval issue
  #3333). So: `add_bos_token=True` for multiple choice and generation, not for perplexity.
"""

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate", reason="lm-eval's hf model imports accelerate (lm-eval[hf])")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from titan_linear.eval import harness  # noqa: E402 (registers `titan_linear`; `hf` must stay known)

from tests.export.test_hf_export import _export, _load  # noqa: E402
from tests.helpers import DEBUG_TOML  # noqa: E402

PPL, MC, GEN = (f"titan_linear_shakespeare_{t}" for t in ("ppl", "next_line", "recall"))
LONG = 160  # max_length past the training length (64) so that most contexts keep their BOS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small forwards: one intra-op thread is faster on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the loaded TorchTitan model, its export folder): 4 layers SLSL, training length 64."""
    loaded = _load(DEBUG_TOML, ["--model.linear_attn_ratio", "0.5"], seed=7)
    return loaded, _export(loaded, tmp_path_factory.mktemp("lm_eval") / "hf")


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=harness.TASKS_DIR, include_defaults=False)


def _native(model, tasks, task, limit, batch_size, max_length=None):
    lm = harness.TitanLinearLM(loaded=model[0], max_length=max_length, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, limit=limit, batch_size=batch_size,
                                   log_samples=True)


def _hf(model, tasks, task, limit, batch_size, extra=""):
    args = f"pretrained={model[1]},trust_remote_code=True,dtype=float32{extra}"
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[task], task_manager=tasks, limit=limit,
                                   batch_size=batch_size, device="cpu", log_samples=True)


def _per_doc(results, task, key="resps"):
    return [s[key] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_perplexity_agrees(model, tasks):
    """Rolling windows of the default length: the training seq_len for both (config.json's
    max_position_embeddings for HFLM), paragraphs of several windows, batches of 4 windows."""
    native = _native(model, tasks, PPL, limit=6, batch_size=4)
    hf = _hf(model, tasks, PPL, limit=6, batch_size=4)
    want, got = native["results"][PPL], hf["results"][PPL]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert native["config"]["model_args"] != hf["config"]["model_args"]  # really two models
    assert [r[0][0] for r in _per_doc(hf, PPL)] == pytest.approx([r[0][0] for r in _per_doc(native, PPL)], rel=1e-5)
    # add_bos_token=True: [BOS, BOS, text]: the first token is scored after two BOS, and BOS itself is scored.
    double = _hf(model, tasks, PPL, limit=2, batch_size=4, extra=",add_bos_token=True")["results"][PPL]
    assert double["bits_per_byte,none"] != pytest.approx(want["bits_per_byte,none"], rel=1e-3)


def test_multiple_choice_agrees_with_add_bos_token(model, tasks):
    """loglikelihood of 4 choices, batches of 4 right-padded rows: acc and acc_norm exactly, each
    choice's log-likelihood and is_greedy per document."""
    native = _native(model, tasks, MC, limit=8, batch_size=4, max_length=LONG)
    hf = _hf(model, tasks, MC, limit=8, batch_size=4, extra=f",add_bos_token=True,max_length={LONG}")
    for key in ("acc,none", "acc_norm,none"):
        assert hf["results"][MC][key] == native["results"][MC][key], key
    for want, got in zip(_per_doc(native, MC), _per_doc(hf, MC), strict=True):
        assert [r[0][0] for r in got] == pytest.approx([r[0][0] for r in want], rel=1e-5)
        assert [r[0][1] for r in got] == [r[0][1] for r in want]


def test_generation_agrees_with_add_bos_token(model, tasks):
    """Greedy generate_until (until newline, 32 tokens): HF's generate without a cache, one prompt at
    a time, writes exactly what the native adapter writes from its caches."""
    native = _native(model, tasks, GEN, limit=3, batch_size=1, max_length=LONG)
    hf = _hf(model, tasks, GEN, limit=3, batch_size=1, extra=f",add_bos_token=True,max_length={LONG}")
    want = _per_doc(native, GEN, "filtered_resps")
    assert _per_doc(hf, GEN, "filtered_resps") == want
    assert any(len(r[0]) > 5 for r in want)  # something was generated
    assert hf["results"][GEN]["exact_match,strip"] == native["results"][GEN]["exact_match,strip"]


def test_contexts_get_bos_only_with_add_bos_token(model):
    """Why the two settings: the native adapter's contexts start with BOS (training documents do);
    HFLM's only with add_bos_token=True, and its perplexity windows start with BOS either way."""
    from lm_eval.models.huggingface import HFLM

    native = harness.TitanLinearLM(loaded=model[0])
    bos = native.bos_id
    text = "ROMEO:\nBut soft"
    want = native.tok_encode(text)
    assert want[0] == bos
    plain = HFLM(pretrained=model[1], trust_remote_code=True, dtype="float32", device="cpu")
    assert plain.tok_encode(text) == want[1:]
    assert plain.prefix_token_id == bos  # the rolling windows' first input
    with_bos = HFLM(pretrained=model[1], trust_remote_code=True, dtype="float32", device="cpu", add_bos_token=True)
    assert with_bos.tok_encode(text) == want
    assert with_bos.tok_batch_encode([text])[0][0].tolist() == want  # generate_until's prompts


def test_left_padded_generation_is_refused(model):
    """HFLM left-pads a batch of prompts of unequal lengths for generate(): refused in one line."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model[1], trust_remote_code=True, dtype="float32", device="cpu", batch_size=2)
    reqs = [Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 4}), i)
            for i, ctx in enumerate(["ROMEO:", "JULIET:\nO Romeo, Romeo!"])]
    with pytest.raises(ValueError, match="padding is not supported.*batch_size=1"):
        lm.generate_until(reqs, disable_tqdm=True)
