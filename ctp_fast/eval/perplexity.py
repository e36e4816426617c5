"""Perplexity by the protocol of DESIGN.md: non-overlapping windows, NLL summed over real predicted
tokens only (never prompt positions), divided by their count."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def nll_of_logits(logits: torch.Tensor, input_ids: torch.Tensor, n_prefix: int = 0) -> NLL:
    """Summed NLL of predicting input_ids[:, 1:] from logits whose first `n_prefix` positions belong to
    a prompt (those positions are dropped, never scored)."""
    logits = logits[:, n_prefix:, :]
    if logits.shape[1] != input_ids.shape[1]:
        raise ValueError(f"logits cover {logits.shape[1]} token positions after the prompt, input_ids {input_ids.shape[1]}")
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = input_ids[:, 1:].reshape(-1)
    total = F.cross_entropy(pred, target, reduction="sum", ignore_index=-100)
    return NLL(float(total), int((target != -100).sum()))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, prompt=None, progress: bool = False,
               desc: str = "perplexity") -> NLL:
    """NLL over token windows [n, seqlen]; prompt: an optional SoftPrompt-like object with
    `logits(model, input_ids)` returning (logits, n_prefix)."""
    total = NLL(0.0, 0)
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        ids = windows[i:i + batch_size]
        if prompt is None:
            logits, n_prefix = model(input_ids=ids, use_cache=False).logits, 0
        else:
            logits, n_prefix = prompt.logits(model, ids)
        total = total + nll_of_logits(logits, ids, n_prefix)
    return total
