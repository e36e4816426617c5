"""Perplexity by the protocol of DESIGN.md: non-overlapping windows, NLL summed over real predicted
tokens only (never prompt positions), divided by their count."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class NLL:
    total: float  # summed negative log-likelihood (nats)
    tokens: int   # predicted tokens counted

    @property
    def loss(self) -> float:
        return self.total / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def __add__(self, other: "NLL") -> "NLL":
        return NLL(self.total + other.total, self.tokens + other.tokens)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, prompt=None, progress: bool = False,
               desc: str = "perplexity", shard: bool | None = None) -> NLL:
    """NLL over token windows [n, seqlen]; prompt: an optional SoftPrompt. The loss comes from
    `prompted_forward(..., logits=False)`, which skips the full logits where the model allows.

    Under torch.distributed (shard=None: whenever a process group of several ranks is up; every rank
    must call it with the same windows), batch b runs on rank b % world_size and the per-batch totals
    are summed across ranks and then in batch order, so the result is the one-process result (counts
    exact, the NLL sum in the same order)."""
    from .. import distributed
    from ..prompt.soft_prompt import prompted_forward

    starts = range(0, len(windows), batch_size)
    ranks = distributed.world_size() if shard or shard is None else 1
    mine = [b for b in range(len(starts)) if b % ranks == distributed.rank() % ranks]
    totals = torch.zeros(len(starts), dtype=torch.float64)
    tokens = torch.zeros(len(starts), dtype=torch.long)
    for b in tqdm(mine, desc=desc, disable=not progress):
        ids = windows[starts[b]:starts[b] + batch_size]
        out = prompted_forward(model, prompt, ids, logits=False, reduction="sum")
        totals[b], tokens[b] = float(out.loss), int((out["targets"] != -100).sum())
    if ranks > 1:  # each batch is non-zero on one rank only: the sums are exact
        distributed.all_reduce_sum(totals, f"all_reduce of the {desc} NLL totals")
        distributed.all_reduce_sum(tokens, f"all_reduce of the {desc} token counts")
    total = NLL(0.0, 0)
    for t, k in zip(totals.tolist(), tokens.tolist()):
        total = total + NLL(t, k)
    return total


def gap_recovered(loss_compressed: float, loss_prompted: float, loss_dense: float) -> float | None:
    """Share of the compression gap a prompt recovers, in test loss (log perplexity, which does not flatter
    huge perplexities): (loss_compressed - loss_prompted) / (loss_compressed - loss_dense); None when
    compression cost nothing (no gap to recover)."""
    gap = loss_compressed - loss_dense
    return None if gap <= 0 else (loss_compressed - loss_prompted) / gap
