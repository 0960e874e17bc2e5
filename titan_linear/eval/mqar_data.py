"""Multi-query associative recall (MQAR) data, after Zoology's recipe (arXiv 2312.04927).

One example of length T with N key-value pairs:

    positions 0 .. 2N-1     k1 v1 k2 v2 ... kN vN      keys from [1, V/2), values from [V/2, V),
                                                         each drawn without replacement
    positions 2N .. T-1     the N keys again, one at each of N distinct even offsets of the rest
                            (offset 2g for a gap g drawn from {0 .. (T-2N)/2 - 1}); every other
                            position holds a filler token

The label at a query key's position is that key's value (the next token a model should
predict); every other label is -100 (ignored by the loss and the accuracy).

Gaps follow Zoology's power law p(g) ~ (g + 1) ** (a - 1): a = 0.01 (the default, Zoology's)
puts most queries close to the pairs, a = 1 spreads them uniformly. Fillers are random tokens
of the whole vocabulary by default (Zoology's `random_non_queries`), or 0.

Each (seed, split) pair seeds its own generator, so a set is the same on every run and the
train and test sets are independent draws (not checked for shared examples: with V = 8192
a repeat is vanishingly rare; with tiny vocabularies it can happen).
"""

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
SPLITS = ("train", "test")


@dataclass(frozen=True)
class MQARSpec:
    """What one MQAR data set is.

    Args:
        seq_len: T, tokens per example.
        kv_pairs: N, key-value pairs per example.
        vocab: V; keys come from [1, V/2), values from [V/2, V).
        gap_power: Zoology's power-law exponent a for the query gaps (1.0 = uniform).
        random_filler: fill the non-query positions after the pairs with random tokens
            (True, Zoology's default) or with token 0.
    """

    seq_len: int
    kv_pairs: int
    vocab: int
    gap_power: float = 0.01
    random_filler: bool = True

    def problems(self) -> list[tuple[str, object, str]]:
        """(field, value, what is allowed) for every setting that makes no valid data set."""
        out = []
        if self.kv_pairs < 1:
            out.append(("kv_pairs", self.kv_pairs, "an integer >= 1"))
        elif self.kv_pairs > self.max_pairs_for_len():
            out.append(("kv_pairs", self.kv_pairs,
                        f"at most {self.max_pairs_for_len()} for seq_len {self.seq_len} (4 * kv_pairs <= seq_len)"))
        elif self.kv_pairs > self.vocab // 2 - 1:
            out.append(("kv_pairs", self.kv_pairs,
                        f"at most {max(self.vocab // 2 - 1, 0)} for vocab {self.vocab} (distinct keys from [1, vocab/2))"))
        if not self.gap_power > 0:
            out.append(("gap_power", self.gap_power, "a number > 0"))
        return out

    def max_pairs_for_len(self) -> int:
        # N pairs take 2N positions; the N queries need N distinct slots among (T - 2N) // 2.
        return self.seq_len // 4

    @property
    def n_slots(self) -> int:
        return (self.seq_len - 2 * self.kv_pairs) // 2


def _generator(seed: int, split: str, spec: MQARSpec) -> torch.Generator:
    # One independent stream per (seed, split, data shape): SeedSequence mixes the parts, so
    # neighbouring seeds or splits never share a stream.
    words = [seed, SPLITS.index(split), spec.seq_len, spec.kv_pairs, spec.vocab]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _distinct_uniform(n: int, rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(rows, k) integers from [0, n), distinct within a row, in random order.

    Floyd's subset sampling, one step for all rows at once (k steps, no n-sized buffer, so a
    vocabulary of any size costs the same), then a random order within each row.
    """
    chosen = torch.empty(rows, k, dtype=torch.long)
    for step, j in enumerate(range(n - k, n)):
        t = (torch.rand(rows, generator=g, dtype=torch.float64) * (j + 1)).long()
        taken = (chosen[:, :step] == t[:, None]).any(dim=1)
        chosen[:, step] = torch.where(taken, torch.full_like(t, j), t)
    order = torch.rand(rows, k, generator=g).argsort(dim=1)
    return chosen.gather(1, order)


def _distinct_weighted(weights: torch.Tensor, rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(rows, k) indices into `weights`, distinct within a row: successive sampling without
    replacement in proportion to `weights` (the k largest of log w + Gumbel noise)."""
    u = torch.rand(rows, weights.numel(), generator=g, dtype=torch.float64).clamp_min(1e-300)
    return (weights.double().log() - torch.log(-torch.log(u))).topk(k, dim=1).indices


def make_mqar(spec: MQARSpec, n_examples: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """`n_examples` MQAR examples: (inputs, labels), both (n_examples, seq_len) int64 on the CPU.

    Raises ValueError naming the field when `spec` makes no valid data set.
    """
    bad = spec.problems()
    if bad:
        field, value, allowed = bad[0]
        raise ValueError(f"{field} = {value!r} is not allowed: {allowed}")
    assert split in SPLITS, split
    g = _generator(seed, split, spec)
    T, N, V = spec.seq_len, spec.kv_pairs, spec.vocab
    half = V // 2

    keys = 1 + _distinct_uniform(half - 1, n_examples, N, g)  # (n, N) in [1, V/2)
    values = half + _distinct_uniform(V - half, n_examples, N, g)  # (n, N) in [V/2, V)
    gap_weights = torch.arange(1, spec.n_slots + 1, dtype=torch.float64) ** (spec.gap_power - 1)
    gaps = _distinct_weighted(gap_weights, n_examples, N, g)  # (n, N) distinct slots

    if spec.random_filler:
        inputs = torch.randint(0, V, (n_examples, T), generator=g)
    else:
        inputs = torch.zeros(n_examples, T, dtype=torch.long)
    inputs[:, 0:2 * N:2] = keys
    inputs[:, 1:2 * N:2] = values
    query_pos = 2 * N + 2 * gaps  # (n, N)
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((n_examples, T), IGNORE, dtype=torch.long)
    labels.scatter_(1, query_pos, values)
    return inputs, labels
