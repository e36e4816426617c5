"""A soft prompt: `n_tokens` learned input embeddings placed before every sequence.

Layout. The prompt always occupies the first `n_tokens` positions, with position ids 0..n-1, whatever the
padding of the batch; the sequence follows it:

    unpadded / right-padded:  [prompt][text][pads]
    left-padded:              [prompt][pads][text]

The attention mask is extended with ones for the prompt, pads are masked, and explicit position ids
(cumsum of the extended mask - 1, clamped at 0) give the real tokens positions n, n+1, ... whatever the
padding, so a left-padded row gives the same logits for its real tokens as the unpadded sequence. The
prompt's keys and values never depend on the input (fixed content, fixed positions, causal attention),
which is what lets a shared-prefix attention op compute them once per batch; and no attention row is
ever fully masked (every position sees the prompt), so pad rows stay finite.

Scoring follows `ctp_fast.eval.perplexity`: prompt positions are never scored, and a token is scored
when it and the token before it are both real tokens (label != -100). The first real token of a row has
no real context and is not scored, so the training loss over a window equals the perplexity protocol's
loss over it (PEFT's own forward differs only there: it also scores the first token, predicted from the
last prompt position).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.head_loss import head_cross_entropy, loss_head

VOCAB_INIT_RANGE = 5000  # prompt-tuning paper (Lester et al. 2021): sample from the 5,000 most common tokens
MAX_TOKENS = 100  # what tune() accepts (prompt tuning gains little past ~100 tokens)


def _check_n_tokens(n_tokens: int, max_tokens: int | None = None) -> int:
    ok = isinstance(n_tokens, int) and not isinstance(n_tokens, bool) and n_tokens >= 1
    if not ok or (max_tokens is not None and n_tokens > max_tokens):
        raise ValueError(f"n_tokens: expected an integer in 1..{max_tokens or 'any'}, got {n_tokens!r}")
    return n_tokens


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own input embeddings of token ids (through the embedding module, so a scaled
    embedding such as Gemma 3's gives the vectors the model actually sees)."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(ids.to(emb.weight.device)).detach().float().cpu()


def embedding_dim(model) -> int:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[1])


class SoftPrompt(nn.Module):
    """Parameter `embeddings` [n_tokens, hidden], kept in fp32 whatever the model dtype (`.to(bfloat16)`
    moves it between devices but keeps fp32); it is cast to the model's embedding dtype when used."""

    def __init__(self, embeddings: torch.Tensor, init: str = "random", init_text: str | None = None):
        super().__init__()
        if not isinstance(embeddings, torch.Tensor):
            raise ValueError(f"embeddings: expected a 2-D tensor [n_tokens, hidden], got {type(embeddings).__name__}")
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings: expected a 2-D tensor [n_tokens, hidden], got shape "
                             f"{tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise ValueError(f"embeddings: expected a floating tensor, got {embeddings.dtype}")
        _check_n_tokens(int(embeddings.shape[0]))
        if embeddings.shape[1] < 1:
            raise ValueError("embeddings: hidden size must be at least 1")
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings: holds NaN or infinite values")
        self.embeddings = nn.Parameter(embeddings.detach().to(torch.float32).clone())
        self.init = init
        self.init_text = init_text

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_vocab(cls, model, n_tokens: int = 20, seed: int = 0,
                   vocab_range: int = VOCAB_INIT_RANGE) -> "SoftPrompt":
        """Rows of the input embedding of distinct token ids sampled (seeded) from the first
        `vocab_range` ids, as the prompt-tuning paper does (the default initialisation)."""
        _check_n_tokens(n_tokens)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        high = min(vocab_range, vocab)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(high, generator=gen)[:n_tokens] if n_tokens <= high else \
            torch.randint(0, high, (n_tokens,), generator=gen)
        return cls(_embed(model, ids), init="vocab")

    @classmethod
    def from_text(cls, model, tokenizer, text: str, n_tokens: int = 20) -> "SoftPrompt":
        """The token embeddings of `text` (no special tokens), repeated or truncated to n_tokens."""
        _check_n_tokens(n_tokens)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            raise ValueError(f"text: {text!r} gives no tokens to initialise the prompt from")
        ids = (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]
        return cls(_embed(model, torch.tensor(ids, dtype=torch.long)), init="text", init_text=text)

    @classmethod
    def random(cls, n_tokens: int = 20, hidden: int = 576, std: float = 0.02, seed: int = 0) -> "SoftPrompt":
        """Seeded N(0, std^2) rows (see TuneConfig.init_std: tune() matches the embedding's scale)."""
        _check_n_tokens(n_tokens)
        if not std > 0:
            raise ValueError(f"std: expected a positive number, got {std!r}")
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randn(n_tokens, hidden, generator=gen) * std, init="random")

    # ------------------------------------------------------------------ properties
    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.embeddings.shape[1])

    def _apply(self, fn, recurse=True):
        # Device moves apply; dtype casts do not (the prompt stays fp32).
        def keep_fp32(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)
        return super()._apply(keep_fp32, recurse)

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, hidden={self.hidden}, init={self.init}"

    # ------------------------------------------------------------------ use
    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        return prompted_forward(model, self, input_ids, attention_mask, labels, **kwargs)

    def logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               shared_prefix: bool | None = None):
        """(logits [B, n + L, vocab], n): logits[:, n + j] predicts input_ids[:, j + 1]; n is n_tokens on the
        concatenated path and 0 on the shared-prefix path (whose logits cover the text only)."""
        out = prompted_forward(model, self, input_ids, attention_mask, shared_prefix=shared_prefix)
        return out.logits, out["n_prefix"]


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_hidden(model, prompt: SoftPrompt) -> None:
    hidden = embedding_dim(model)
    if prompt.hidden != hidden:
        raise ValueError(f"prompt: hidden size {prompt.hidden} does not match the model's embedding size {hidden} "
                         f"(a prompt learned on another model needs a bridge)")


def prompted_inputs(model, prompt: SoftPrompt, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> dict:
    """The keyword arguments of a prompted forward: inputs_embeds [B, n+L, H] (prompt cast to the
    embedding dtype), attention_mask [B, n+L] and position_ids [B, n+L] (see the module docstring)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, seqlen], got shape {tuple(input_ids.shape)}")
    _check_hidden(model, prompt)
    b, length = input_ids.shape
    tok = model.get_input_embeddings()(input_ids)
    n = prompt.n_tokens
    p = prompt.embeddings.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(b, n, -1)
    if attention_mask is None:
        attention_mask = torch.ones(b, length, dtype=torch.long, device=input_ids.device)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    mask = torch.cat([torch.ones(b, n, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], 1)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"inputs_embeds": torch.cat([p, tok], 1), "attention_mask": mask, "position_ids": position_ids}


def scored_targets(prompt_len: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Shifted targets [B, n+L-1]: targets[:, t] is what position t is scored on, or -100. A position is
    scored only when it holds a real token (not prompt, not pad) and so does the next one, whose label
    (default: its input id; -100 leaves it out) is the target. So prompt positions are never scored, nor
    the first real token of a row (it has no real context), as in `ctp_fast.eval.perplexity`."""
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    target = labels[:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
    b = input_ids.shape[0]
    # position n-1 (last prompt position) and prompt positions before it predict nothing
    pad = torch.full((b, prompt_len), -100, dtype=target.dtype, device=target.device)
    return torch.cat([pad, target], 1)


def extended_labels(prompt_len: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """HF-style labels [B, n+L] aligned with the prompted inputs: -100 on prompt and pad positions."""
    labels = input_ids if labels is None else labels
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    pad = torch.full((labels.shape[0], prompt_len), -100, dtype=labels.dtype, device=labels.device)
    return torch.cat([pad, labels], 1)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """fp32 cross entropy of logits[:, :-1] against `scored_targets` (ignore_index -100)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def prompted_forward(model, prompt: SoftPrompt | None, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                     shared_prefix: bool | None = None, logits: bool = True, reduction: str = "mean", **kwargs):
    """Run an HF causal LM (anything taking inputs_embeds) with `prompt` before every row.

    Two paths, same loss and gradients (up to float rounding):
    - shared prefix (`ctp_fast.nn.prefix_attention`): the prompt runs once, alone, and every row attends
      to its keys/values; the logits cover the text only (`out["n_prefix"]` = 0).
    - concatenated: [prompt][sequence] per row; the logits cover both (`out["n_prefix"]` = n_tokens).
    shared_prefix=None takes the shared prefix when the model supports it, True insists on it, False
    concatenates.

    The loss is always computed (labels default to input_ids; -100 in labels leaves a token out):
    `out.loss` is the mean next-token cross entropy over real predicted tokens, `out["targets"]` the
    target of each logit position but the last (-100 on prompt and pad positions, see `scored_targets`),
    `out["labels"]` the HF-style labels aligned with the logits (`extended_labels`). prompt=None runs the
    plain model with the same scoring.

    logits=False asks for the loss only: where `ctp_fast.nn.head_loss.loss_head` allows, the decoder runs
    without the lm_head and the loss comes from its hidden states in chunks (`out.logits` is then None);
    otherwise the logits are computed as usual. reduction="sum" makes `out.loss` the summed NLL.
    """
    from ..nn.prefix_attention import prefix_forward, supports_prefix
    head = None if logits else loss_head(model)
    if prompt is not None and (shared_prefix or (shared_prefix is None and supports_prefix(model))):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, seqlen], got shape {tuple(input_ids.shape)}")
        _check_hidden(model, prompt)
        out = prefix_forward(model, prompt, input_ids, attention_mask, hidden_only=head is not None, **kwargs)
        return _scored(out, 0, input_ids, attention_mask, labels, head, reduction)
    if prompt is None:
        prompt = _EmptyPrompt()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if attention_mask is not None:
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        inputs = prompted_inputs(model, prompt, input_ids, attention_mask)
    if not _accepts(model, "position_ids"):
        inputs.pop("position_ids", None)  # e.g. BLOOM (ALiBi); OPT derives positions from the mask
    out = (model if head is None else model.get_decoder())(**inputs, use_cache=False, **kwargs)
    return _scored(out, prompt.n_tokens, input_ids, attention_mask, labels, head, reduction)


def _scored(out, n_prefix: int, input_ids, attention_mask, labels, head=None, reduction="mean"):
    """Adds loss, targets, labels and n_prefix (logit positions before the text) to a model output: from
    its logits, or with `head` from a decoder output's last hidden state (out.logits set to None)."""
    device = (out.logits if head is None else out.last_hidden_state).device
    targets = scored_targets(n_prefix, input_ids, attention_mask, labels).to(device)
    if head is None:
        out["loss"] = causal_lm_loss(out.logits, targets, reduction)
    else:
        out["loss"] = head_cross_entropy(out.last_hidden_state, head, targets, reduction)
        out["logits"] = None
    out["targets"] = targets
    out["labels"] = extended_labels(n_prefix, input_ids, attention_mask, labels).to(device)
    out["n_prefix"] = n_prefix
    return out


class _EmptyPrompt:
    n_tokens = 0
