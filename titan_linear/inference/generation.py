"""The generation loop: prefill the prompt, then decode one token at a time, with timings."""

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .graph_decode import decoder
from .prefill import prefill
from .sampling import sample, SamplingConfig


@dataclass
class GenerationResult:
    """New tokens and how long they took.

    Args:
        tokens: the generated ids, without the prompt (and without the EOS that stopped it).
        prefill_ms: wall time of the prefill (prompt forward and cache fill).
        decode_ms: wall time of each decode step, one per token fed back into the model.
        stopped_on_eos: generation ended because EOS was sampled.
        capture_ms: wall time of compiling and capturing the decode step's CUDA graphs, one per
            bucket of KV storage the text reached (0 when decoding eagerly); not in decode_ms.
    """

    tokens: list[int]
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)
    stopped_on_eos: bool = False
    capture_ms: float = 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else float("nan")

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.decode_ms)
        return 1000.0 * len(self.decode_ms) / total if total > 0 else float("nan")


def _now(device: torch.device) -> float:
    """A wall clock that waits for the device's queued work first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    eos_id: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = True,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `prompt` (one sequence).

    The first new token comes from the prefill's logits; each later one from a decode step
    on the token before it, so n new tokens take one prefill and n - 1 decode steps.

    Args:
        model: prepared by `prepare_model` for len(prompt) + max_new_tokens positions.
        prompt: token ids, at least one.
        max_new_tokens: the most tokens to generate.
        sampling: greedy (default) or temperature / top-k / top-p.
        seed: seeds the sampling stream, so equal seeds give equal text; default 0.
        eos_id: stop once this token is sampled (it is not returned); default None never stops early.
        cuda_graph: decode by replaying a CUDA graph (graph_decode.py) rather than eagerly;
            default None: on a CUDA model, when more than one token is asked for.
        compile: with cuda_graph, capture the torch.compile'd step (graph_decode.compiled_step:
            one compile per model and batch size in a process); default True.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens = {max_new_tokens!r} is not allowed: an integer >= 1")
    sampling.check()
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)

    start = _now(device)
    logits, caches = prefill(model, tokens, max_len=len(prompt) + max_new_tokens)
    token = sample(logits[:, -1], sampling, generator)
    result = GenerationResult([], prefill_ms=1000.0 * (_now(device) - start))
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and max_new_tokens > 1
    step = decoder(model, caches, cuda_graph, compile)

    def captured() -> float:  # GraphDecoder's running total of compile and capture time
        return step.capture_ms if cuda_graph else 0.0

    while True:
        token_id = int(token)  # waits for the device, as any streaming decoder must
        if eos_id is not None and token_id == eos_id:
            result.stopped_on_eos = True
            break
        result.tokens.append(token_id)
        if len(result.tokens) == max_new_tokens:
            break
        start, before = _now(device), captured()
        logits = step(token)
        token = sample(logits, sampling, generator)
        # A step that reached a new bucket captured its graph first: that time is capture time.
        result.decode_ms.append(1000.0 * (_now(device) - start) - (captured() - before))
    result.capture_ms = captured()
    return result
