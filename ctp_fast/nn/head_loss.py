"""Next-token cross entropy from a causal LM's last hidden states, without ever holding all the logits.

The usual loss goes through logits [B, T, vocab] in fp32: 100 MB at 4 x 128 tokens with SmolLM2's 49k
vocabulary, then as much again for their shifted copy, the log-softmax and each gradient. Buffers that
large are mapped fresh on every allocation, and on CPU faulting their pages in costs more than the
lm_head matmul: in profiles of a 4 x 128-token prompt-tuning step on SmolLM2 (2 cores), the copy, fills,
log-softmax and its backward took 0.5 to 0.9 s, and forward + backward went from 2.61 to 2.22 s with
this path. Here the head runs on chunks of rows into one reused buffer, and because the head's weight
is frozen the gradient of the hidden states is formed in the same pass: backward only scales it.

`loss_head(model)` says whether a model's logits are exactly `lm_head(last hidden state)`; the callers
(`ctp_fast.prompt.prompted_forward(..., logits=False)`) fall back to the logits path when it is None.
"""
from __future__ import annotations

import torch
from torch import nn

# model types whose CausalLM forward is `logits = self.lm_head(hidden_states)` with nothing after it
# (Gemma 3 only while final_logit_softcapping is unset, checked below)
HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
CHUNK_ROWS = 128  # rows of logits per pass: 128 x 49k fp32 = 25 MB, reused across chunks


def loss_head(model) -> nn.Linear | None:
    """The model's lm_head when the loss can be computed from the decoder's output with it, else None
    (another architecture, a soft-capped or trainable head, or a head that is not a plain nn.Linear)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in HEAD_MODELS or getattr(config, "final_logit_softcapping", None):
        return None
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    return head


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T + bias` against `targets` (all scored), fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, need_grad: bool):
        n = hidden.shape[0]
        grad = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        buf = torch.empty(min(n, CHUNK_ROWS), weight.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, CHUNK_ROWS):
                h, t = hidden[s:s + CHUNK_ROWS].to(weight.dtype), targets[s:s + CHUNK_ROWS]
                rows = torch.arange(len(t), device=t.device)
                logits = buf[:len(t)]
                if weight.dtype == torch.float32:
                    torch.mm(h, weight.t(), out=logits)
                else:
                    logits.copy_(h @ weight.t())
                if bias is not None:
                    logits += bias.float()
                top = logits.amax(1, keepdim=True)
                picked = logits[rows, t]
                logits.sub_(top).exp_()  # logits now holds exp(logit - max)
                norm = logits.sum(1, keepdim=True)
                total += (top.squeeze(1) + norm.log().squeeze(1) - picked).sum(dtype=torch.float64)
                if need_grad:  # d(sum of losses)/d logits = softmax - onehot
                    logits.div_(norm)
                    logits[rows, t] -= 1
                    grad[s:s + len(t)] = (logits.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad if need_grad else None)
        ctx.hidden_dtype = hidden.dtype
        return total.float()

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.hidden_dtype), None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of head(hidden[:, t]) against targets[:, t] for t < T - 1, as
    F.cross_entropy(head(hidden)[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    (`ctp_fast.prompt.causal_lm_loss`): hidden [B, T, H], targets [B, T - 1] (-100: not scored).
    reduction "mean" (nan when nothing is scored, like F.cross_entropy) or "sum". Gradients flow to
    `hidden` only; the head is frozen."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 3 or targets.shape != (hidden.shape[0], hidden.shape[1] - 1):
        raise ValueError(f"targets: expected shape {(hidden.shape[0], hidden.shape[1] - 1)} for hidden "
                         f"{tuple(hidden.shape)}, got {tuple(targets.shape)}")
    flat = targets.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    scored = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, rows)
    need_grad = torch.is_grad_enabled() and scored.requires_grad
    total = _HeadCrossEntropy.apply(scored, head.weight, head.bias, flat.index_select(0, rows), need_grad)
    return total if reduction == "sum" else total / rows.numel()
