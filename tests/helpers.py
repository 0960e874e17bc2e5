"""Small builders shared by the tests."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(REPO / "train_configs" / "debug_model.toml")
OELM_TOML = str(REPO / "train_configs" / "debug_oelm.toml")

from titan_linear.models.hybrid import hybrid_args, HybridModelArgs, HybridTransformer


def debug_args(base: HybridModelArgs | None = None, **changes) -> HybridModelArgs:
    """A copy of `base` (default: the hybrid's debug flavor) at 64 positions, with `changes` set."""
    args = copy.deepcopy(hybrid_args["debugmodel"] if base is None else base)
    args.max_seq_len = 64
    for k, v in changes.items():
        setattr(args, k, v)
    return args


def build(args, seed: int = 0, cls=HybridTransformer):
    """Build `cls(args)` on meta, then materialise and init_weights as torchtitan's Trainer does."""
    with torch.device("meta"):
        model = cls(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def adamw_losses(model, ids: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    """Train `model` for `steps` AdamW steps on one batch of ids (next-token loss); the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def decode_logits(model, tokens: torch.Tensor, steps: int, step=None, kv_splits: int = 0, after_prefill=None,
                  **prefill_kwargs) -> torch.Tensor:
    """(bs, 1 + steps, vocab) logits: the last position of a prefill of tokens[:, :3], then
    `steps` decode steps fed tokens[:, 3:]. Eager `decode_step` by default; with `step` (one of
    graph_decode.compiled_step's) the fixed-shape step, as GraphDecoder runs it. prefill_kwargs
    go to `prefill` (max_len defaults to 3 + steps); `after_prefill()` runs between the two."""
    from titan_linear.inference import decode_step, prefill

    prefill_kwargs.setdefault("max_len", 3 + steps)
    logits, caches = prefill(model, tokens[:, :3], **prefill_kwargs)
    if after_prefill is not None:
        after_prefill()
    out = [logits[:, -1]]
    with torch.no_grad():
        for t in range(3, 3 + steps):
            if step is None:
                out.append(decode_step(model, tokens[:, t], caches))
                continue
            caches.reserve(t + 1)
            out.append(step(model, tokens[:, t], caches, torch.tensor([t], device=tokens.device), kv_splits))
            caches.length += 1
    return torch.stack(out, 1)


def run_interpreted(code: str):
    """Run `code` in a child Python with TRITON_INTERPRET=1 (the interpreter replaces
    @triton.jit when triton is first imported, so it cannot be switched on in this process) and
    return the JSON its last printed line holds. Importing torch and triton costs ~7 s, so a test
    file runs all its cases in one child."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
