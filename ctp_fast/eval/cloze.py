"""Zero-shot last-word cloze accuracy (LAMBADA-style), built from held-out passages of any corpus:
the model sees a passage up to its last word and must produce that word greedily, every token of it."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

_WORD = re.compile(r"^[A-Za-z]{3,}$")


@dataclass
class ClozeExample:
    context: torch.Tensor  # [c] token ids
    target: torch.Tensor   # [t] token ids of " word"
    word: str


def cloze_examples(tokenizer, docs: list[str], n: int = 100, max_words: int = 80, bos: bool = False) -> list[ClozeExample]:
    """Up to n examples: each passage cut after at most `max_words` words, ending on an alphabetic word."""
    out = []
    for doc in docs:
        words = doc.split()
        if len(words) < 20:
            continue
        cut = min(len(words), max_words)
        while cut > 15 and not _WORD.match(words[cut - 1].strip(".,;:!?\"')(")):
            cut -= 1
        word = words[cut - 1].strip(".,;:!?\"')(")
        if not _WORD.match(word):
            continue
        ctx = tokenizer(" ".join(words[: cut - 1]), add_special_tokens=False)["input_ids"]
        if bos and tokenizer.bos_token_id is not None:
            ctx = [tokenizer.bos_token_id] + ctx
        tgt = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        out.append(ClozeExample(torch.tensor(ctx), torch.tensor(tgt), word))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def cloze_accuracy(model, examples: list[ClozeExample], prompt=None, progress: bool = False,
                   shard: bool | None = None) -> float:
    """Fraction of examples whose target word the model predicts greedily, token by token.

    Under torch.distributed (shard=None: whenever a process group of several ranks is up; every rank
    must call it with the same examples), example i runs on rank i % world_size and the hit counts
    are summed across ranks (exact)."""
    from .. import distributed

    if not examples:
        raise ValueError("examples: no cloze examples (passages too short?)")
    ranks = distributed.world_size() if shard or shard is None else 1
    hits = 0
    for ex in tqdm(examples[distributed.rank() % ranks::ranks], desc="cloze", disable=not progress):
        ids = torch.cat([ex.context, ex.target])[None]
        if prompt is None:
            logits, n_prefix = model(input_ids=ids, use_cache=False).logits, 0
        else:
            logits, n_prefix = prompt.logits(model, ids)
        start = n_prefix + len(ex.context) - 1  # the logit that predicts the first target token
        pred = logits[0, start:start + len(ex.target)].argmax(-1)
        hits += bool(torch.equal(pred, ex.target))
    if ranks > 1:
        hits = int(distributed.all_reduce_sum(torch.tensor([hits], dtype=torch.long), "all_reduce of the cloze hits"))
    return hits / len(examples)
