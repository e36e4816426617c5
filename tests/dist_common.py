"""What test_distributed.py and its worker processes (dist_worker.py) build alike: a tiny random LLaMA,
token windows and cloze examples, all seeded."""
from __future__ import annotations

import torch

from ctp_fast.eval import ClozeExample


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def windows(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cloze_set(model, prompt, n: int = 9) -> list[ClozeExample]:
    """n examples; for two in three the target is the model's own greedy next token (a hit), so the
    accuracy is neither 0 nor 1."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ctx = torch.randint(0, 16, (6 + i % 3,), generator=g)
        logits, n_prefix = prompt.logits(model, ctx[None])
        greedy = logits[0, -1].argmax()
        target = greedy if i % 3 else (greedy + 1) % 64
        out.append(ClozeExample(ctx, target.reshape(1), f"w{i}"))
    return out
