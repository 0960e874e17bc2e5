"""Choosing the next token from logits: greedy, or temperature with top-k / top-p filtering."""

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """How the next token is chosen.

    Args:
        temperature: 0 picks the most likely token (greedy); > 0 samples from
            softmax(logits / temperature). Default 0.
        top_k: sample only among the k most likely tokens; 0 (default) keeps all.
        top_p: sample only among the most likely tokens whose probabilities add up to at
            least top_p (nucleus sampling); 1.0 (default) keeps all.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> "SamplingConfig":
        """Raise ValueError naming the setting when a value is out of range."""
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"--temperature = {t!r} is not allowed: a number >= 0 (0 is greedy)")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"--top-k = {k!r} is not allowed: an integer >= 0 (0 keeps all tokens)")
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"--top-p = {p!r} is not allowed: a number in (0, 1]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the top-p nucleus.

    Args:
        logits: (bs, vocab), already divided by the temperature.
        top_k: keep the k largest; 0 keeps all.
        top_p: keep the smallest set of largest logits whose probabilities reach top_p; 1.0 keeps all.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens before it already reach top_p; the first never is.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each sequence.

    Args:
        logits: (bs, vocab).
        config: greedy or sampling settings.
        generator: the random stream for sampling (on the device of logits); default None uses
            torch's global one.

    Returns:
        (bs,) token ids.
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
