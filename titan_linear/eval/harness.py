"""lm-evaluation-harness on a TorchTitan checkpoint: `python -m titan_linear.eval.harness`.

    python -m titan_linear.eval.harness --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint --tasks titan_linear_shakespeare \\
        --out results/harness.json [--include-path DIR ...] [--limit N] [--batch-size 8] \\
        [--num-fewshot K] [--max-length N] [--device cpu|cuda] [--dtype bf16|fp32] \\
        [-- TorchTitan overrides]

Needs the `eval` extra (lm-eval 0.4.13). The model is built from the TOML and the DCP
checkpoint as every evaluation tool builds it (titan_linear/cli.py: same layer map check,
`--random-init` allowed) and wrapped in `TitanLinearLM`, an lm-eval `TemplateLM` registered
as model `titan_linear`; the config's tokenizer encodes, with BOS in front as training
data has it. `lm_eval.simple_evaluate` runs the tasks; the JSON holds lm-eval's results per
task (keys `metric,filter`), the model and the settings; a table goes to stdout.

- loglikelihood: context and continuation are encoded together and split where the
  context's tokens end (lm-eval's rule); one forward per batch of `--batch-size` requests,
  longest first, right-padded (causal layers never see the padding); fp32 log-softmax;
  is_greedy when every continuation token is the argmax.
- loglikelihood_rolling: the text after BOS cut into lm-eval's rolling windows of at most
  `--max-length` tokens (default: `training.seq_len`), each token scored exactly once, the
  last window with full context.
- generate_until: prefill then one token at a time from the caches of
  titan_linear.inference (KV caches for softmax layers, the recurrent state for linear
  ones); stops at EOS, `max_gen_toks` or the first `until` string (cut off). Greedy unless
  the task asks `do_sample` (temperature / top_k / top_p, seeded by `--seed`).

Tasks: the packaged ones (titan_linear/assets/eval/tasks, offline): `titan_linear_shakespeare_ppl`
(word / byte perplexity, bits per byte), `titan_linear_shakespeare_next_line` (acc, acc_norm),
`titan_linear_shakespeare_recall` (exact match); the tag `titan_linear_shakespeare` runs all
three. `--include-path DIR` adds folders of task YAMLs. lm-eval's own tasks (hellaswag, mmlu,
...) download from the Hugging Face hub: unreachable (or offline with no cached copy), the
command stops with one line naming the task. Bad input: one line naming the flag, exit 2,
nothing written. lm-eval's own CLI works too (docs/harness.md).
"""

import difflib
import json
import os
import shlex
import sys
from types import SimpleNamespace

import torch

from titan_linear.cli import check_at_least, load_model, model_parser, run_main, split_overrides, write_json
from titan_linear.config_errors import first_line
from titan_linear.data import hub
from titan_linear.data.sources import ASSETS_DIR

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    _LM_EVAL_MISSING = None
except ImportError as e:  # the `eval` extra is not installed: the CLI says so in one line
    TemplateLM, _LM_EVAL_MISSING = object, e

    def register_model(*names):
        return lambda cls: cls

PROG = "titan_linear.eval.harness"
TASKS_DIR = os.path.join(ASSETS_DIR, "eval", "tasks")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default


def local_dataset(data_files, **_metadata):
    """The datasets of a packaged task (its YAML's `custom_dataset`): `data_files` (split -> JSONL
    file, relative to the packaged task folder or absolute) read with `datasets`' json builder.
    Resolved here, at run time, so the tasks work from any directory and from an installed package."""
    import datasets

    if isinstance(data_files, str):
        data_files = {"test": data_files}
    files = {split: os.path.join(TASKS_DIR, f) for split, f in data_files.items()}
    return datasets.load_dataset("json", data_files=files)


def _register(cls):
    # `python -m` runs this file as __main__, and the task YAMLs import it again by name:
    # only that import registers, and __main__ hands over to it (bottom of the file).
    if __name__ == "__main__" or _LM_EVAL_MISSING is not None:
        return cls
    # lm-eval 0.4.13 adds its own models (hf, vllm, ...) to the registry only when the registry
    # is empty at the first look-up: registering titan_linear first would hide them
    # (`model="hf"` -> "no model for this name found"). Add them first (a cheap import: names only).
    import lm_eval.models  # noqa: F401

    return register_model("titan_linear")(cls)


@_register
class TitanLinearLM(TemplateLM):
    """A titan_linear checkpoint as an lm-eval model (`--model titan_linear`).

    Args:
        config: the training TOML.
        checkpoint: a DCP `step-N` folder or the checkpoint folder (newest step); or
        random_init: True for random weights seeded by `seed`.
        device, dtype: "cpu" / "cuda" / "cuda:N", "bf16" / "fp32" (defaults as `--device` / `--dtype`).
        seed: seeds random init and sampled generation. Default 0.
        max_length: the longest window in tokens; default `training.seq_len`.
        batch_size: requests per forward. Default 1.
        overrides: TorchTitan overrides, a list or one string ("--training.seq_len 64").
        loaded: an already loaded `titan_linear.cli.Loaded` (then the model arguments are unused).
        max_batch_size: accepted from lm-eval and unused.
    """

    def __init__(self, config=None, checkpoint=None, random_init=False, device=None, dtype=None, seed=0,
                 max_length=None, batch_size=1, overrides=None, loaded=None, max_batch_size=None):
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.seed = int(seed)
        if loaded is None:
            if config is None or (checkpoint is None) == (not random_init):
                raise ValueError("model_args config and exactly one of checkpoint / random_init=True are required")
            if isinstance(overrides, str):
                overrides = shlex.split(overrides)
            if isinstance(device, str) and device.startswith("cuda:"):  # lm-eval's CLI default is cuda:0
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(device[5:]))
                device = "cuda"
            args = SimpleNamespace(config=config, checkpoint=checkpoint, random_init=bool(random_init),
                                   seed=self.seed, device=device, dtype=dtype)
            loaded = load_model(args, list(overrides or []))
        self.loaded, self.model, self.titan_tokenizer = loaded, loaded.model, loaded.tokenizer
        self._device = loaded.device
        self.max_length = _positive_int("max_length", max_length or loaded.job_config.training.seq_len, minimum=2)
        from titan_linear.inference import ensure_rope_length

        ensure_rope_length(self.model, self.max_length)
        bos, eos = self.titan_tokenizer.bos_id, self.titan_tokenizer.eos_id
        if bos is None and eos is None:
            raise ValueError("model.hf_assets_path: the tokenizer declares neither BOS nor EOS; lm-eval needs one")
        self.bos_id, self.eos_id = bos, eos

    @property
    def eot_token_id(self) -> int:
        return self.eos_id if self.eos_id is not None else self.bos_id

    @property
    def prefix_token_id(self) -> int:
        # Training documents start with BOS: the context of a text with no context.
        return self.bos_id if self.bos_id is not None else self.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`, with BOS in front unless `add_special_tokens` is False (or it starts with BOS)."""
        ids = self.titan_tokenizer.encode(string, add_bos=False, add_eos=False)
        if add_special_tokens is not False and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.titan_tokenizer.decode(ids, skip_special_tokens=True)

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config."""
        return {"titan_linear": self.loaded.describe(), "max_length": self.max_length}

    # -- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self.score_pairs([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score_pairs(pairs, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _window(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The model's input: context + continuation minus its last token, the last max_length of them."""
        if len(cont) > self.max_length:
            raise ValueError(f"--max-length = {self.max_length} is not allowed: a continuation of {len(cont)} "
                             "tokens does not fit; give a larger one")
        assert ctx, "lm-eval always gives at least one context token"
        return (ctx + cont)[-(self.max_length + 1):-1]

    @torch.no_grad()
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) for each (context ids, continuation ids)."""
        from tqdm import tqdm

        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        # Longest first: a batch is padded to its first row, and the slowest batch runs first.
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        pad = self.eot_token_id
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="titan_linear scoring"):
            rows = order[start:start + self.batch_size]
            inputs = [self._window(*pairs[i]) for i in rows]
            batch = torch.full((len(rows), max(map(len, inputs))), pad, dtype=torch.long)
            for r, ids in enumerate(inputs):
                batch[r, :len(ids)] = torch.tensor(ids)
            logits = self.model(batch.to(self._device))  # (rows, width, vocab)
            for r, (i, ids) in enumerate(zip(rows, inputs)):
                cont = pairs[i][1]
                if not cont:
                    out[i] = (0.0, True)
                    continue
                logp = torch.log_softmax(logits[r, len(ids) - len(cont):len(ids)].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                out[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
        return out

    # -- generation --------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict):
        from titan_linear.inference import SamplingConfig

        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation_kwargs {unknown} are not allowed: model titan_linear reads {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks = {max_new} is not allowed: it leaves no room for the prompt in "
                             f"--max-length = {self.max_length}")
        temperature = float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample") else 0.0
        sampling = SamplingConfig(temperature, int(gen_kwargs.get("top_k") or 0),
                                  float(gen_kwargs.get("top_p") or 1.0)).check()
        return until, max_new, sampling

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="titan_linear generating"):
            context, gen_kwargs = req.args
            until, max_new, sampling = self._generation_settings(dict(gen_kwargs))
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            text = self.generate_text(prompt, until, max_new, sampling)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    @torch.no_grad()
    def generate_text(self, prompt: list[int], until: list[str], max_new: int, sampling=None) -> str:
        """The text generated after `prompt`: up to EOS, `max_new` tokens or the first `until` string (excluded)."""
        from titan_linear.inference import prefill, sample, SamplingConfig
        from titan_linear.inference.graph_decode import decoder

        sampling = sampling or SamplingConfig()
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        logits, caches = prefill(self.model, torch.tensor([prompt], device=self._device),
                                 max_len=len(prompt) + max_new)
        # As titan_linear.inference.generate decodes: from a CUDA graph on a GPU, eagerly elsewhere.
        step = decoder(self.model, caches, cuda_graph=self._device.type == "cuda" and max_new > 1)
        token = sample(logits[:, -1], sampling, generator)
        new: list[int] = []
        text = ""
        while True:
            if self.eos_id is not None and int(token) == self.eos_id:
                return text
            new.append(int(token))
            text = self.tok_decode(new)
            stops = [text.find(s) for s in until if s and s in text]
            if stops:
                return text[:min(stops)]
            if len(new) == max_new:
                return text
            token = sample(step(token), sampling, generator)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    try:
        n = int(value)
        ok = n == float(value) and n >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} = {value!r} is not allowed: an integer >= {minimum}")
    return n


# -- tasks ---------------------------------------------------------------------------------

_FULL_INDEX: dict = {}


def lm_eval_index(folders: tuple[str, ...]):
    """A TaskManager over lm-eval's own tasks and `folders` (built once per process: ~10 s)."""
    from lm_eval.tasks import TaskManager

    if folders not in _FULL_INDEX:
        _FULL_INDEX[folders] = TaskManager(include_path=list(folders))
    return _FULL_INDEX[folders]


def _not_local(name: str, local_names: list[str], folders: list[str]) -> str:
    near = difflib.get_close_matches(name, local_names, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return (f"--tasks = {name!r} is not allowed: {hint}it is not a local task (local: {', '.join(local_names)}; "
            f"folders: {', '.join(folders)}; add one with --include-path DIR)")


def resolve_tasks(names: list[str], include_paths: list[str]):
    """(TaskManager, the built tasks / groups) for `names`; raises ValueError naming --tasks.

    Names found in the local folders need no index of lm-eval's own tasks (which takes
    seconds to build). Another name needs the hub: when it does not answer (and HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE do not ask for the cache), the name is refused at once.
    """
    from lm_eval.tasks import TaskManager

    folders = [TASKS_DIR] + list(include_paths)
    manager = TaskManager(include_path=folders, include_defaults=False)
    local_names = list(manager.all_tasks)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        offline = hub.hub_offline()
        if not offline and not hub.hub_reachable():
            raise ValueError(_not_local(missing[0], local_names, folders) + "; lm-eval's own tasks read their data "
                             f"from the Hugging Face hub, which is unreachable from here ({hub.hub_endpoint()}); "
                             "to use a cached copy set HF_DATASETS_OFFLINE=1")
        manager = lm_eval_index(tuple(folders))
        for name in missing:
            if name not in manager.all_tasks:
                raise ValueError(_not_local(name, local_names, folders) + ", nor one of lm-eval's "
                                 "(python -m lm_eval ls tasks lists them)")
    built = []
    for name in names:
        try:
            loaded = manager.load(name)
        except Exception as e:  # a dataset that does not load, a bad YAML: one line naming the task
            why = " (offline: only cached datasets load)" if name in missing and hub.hub_offline() else ""
            raise ValueError(f"--tasks = {name!r} is not allowed: loading it failed{why}: "
                             f"{type(e).__name__}: {first_line(e)}") from e
        built += [loaded["groups"][name]] if name in loaded.get("groups", {}) else list(loaded["tasks"].values())
    try:
        manager.load(built)  # lm-eval's check that no task is asked for twice
    except ValueError as e:
        raise ValueError(f"--tasks = {' '.join(names)} is not allowed: {first_line(e)}") from e
    return manager, built


# -- command line --------------------------------------------------------------------------

def _parser():
    p = model_parser(f"python -m {PROG}", __doc__)
    p.add_argument("--tasks", nargs="+", required=True, help="task, group or tag names (local ones: titan_linear_*)")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--include-path", nargs="+", default=[], metavar="DIR", help="more folders of task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward (default 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own, else 0)")
    p.add_argument("--max-length", type=int, default=None, help="longest window in tokens (default training.seq_len)")
    return p


def check_args(args) -> None:
    """Raise ValueError naming the flag for every bad value that needs no model or task."""
    if _LM_EVAL_MISSING is not None:
        raise ValueError(f"--tasks is not allowed: lm-eval is not installed ({_LM_EVAL_MISSING}); "
                         "pip install 'titan_linear[eval]' (lm-eval==0.4.13)")
    for flag, value, minimum in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                                 ("--num-fewshot", args.num_fewshot, 0), ("--max-length", args.max_length, 2)):
        check_at_least(flag, value, minimum)
    for folder in args.include_path:
        if not os.path.isdir(folder):
            raise ValueError(f"--include-path = {folder!r} is not allowed: no such directory")


def run(argv: list[str]) -> int:
    """Parse, resolve the tasks, load, evaluate, write the JSON. Raises ValueError on bad input."""
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    check_args(args)
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    manager, tasks = resolve_tasks(args.tasks, args.include_path)
    loaded = load_model(args, overrides, max_len=args.max_length)
    lm = TitanLinearLM(loaded=loaded, max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                      limit=args.limit, batch_size=args.batch_size, device=loaded.device.type,
                                      log_samples=False)
    result = {
        "tool": PROG,
        "model": loaded.describe(),
        "settings": {
            "tasks": args.tasks, "task_folders": [TASKS_DIR] + args.include_path, "limit": args.limit,
            "batch_size": args.batch_size, "num_fewshot": args.num_fewshot, "max_length": lm.max_length,
            "seed": args.seed, "overrides": overrides, "lm_eval": lm_eval.__version__,
            "context": "BOS, then the text; rolling windows of at most max_length tokens score every token once",
        },
        "results": results["results"],
        "groups": results.get("groups", {}),
        "n_shot": results.get("n-shot", {}),
        "n_samples": results.get("n-samples", {}),
        "higher_is_better": results.get("higher_is_better", {}),
        "versions": results.get("versions", {}),
    }
    write_json(args.out, json.loads(json.dumps(result, default=handle_non_serializable)))
    print(make_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    from titan_linear.eval import harness

    sys.exit(harness.main())
