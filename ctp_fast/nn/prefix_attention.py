"""Prompt-prefixed attention inside Hugging Face causal LMs: the prompt's keys and values computed once.

With causal attention and the prompt at fixed positions 0..P-1, a soft prompt's keys and values in every
layer do not depend on the input. So:

    cache = build_prompt_cache(model, prompt)        # the prompt alone, batch 1: K/V [Hkv, P, D] per layer
    with attend(model, cache):                        # every forward / generate inside sees the prompt
        model.generate(ids, attention_mask=mask)      # text positions start at P; any padding on the left

Inside `attend`, the model's attention function is `ctp_prefix` (registered with transformers' attention
and mask registries): queries attend to the shared prompt K/V and then to their own (cached) K/V through
the `prefix_attention` op, and the rotary position ids are shifted by P. Nothing is copied per sequence.
Training (`prefix_forward`) builds the cache with gradients: the prompt's layers run once per step, and
the op's backward sums the prompt K/V gradients over the batch.

Supported: decoders with full (not sliding-window) causal attention and a model-level rotary embedding
(LLaMA, Mistral without sliding window, Qwen2, Qwen3; SmolLM2 is LLaMA). `supports_prefix(model)` says
whether a model is one; `prompted_forward` falls back to concatenating the prompt for the others.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..ops import prefix_attention

ATTN_NAME = "ctp_prefix"
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class PromptCache:
    """The prompt's keys and values per decoder layer, each [kv_heads, n_tokens, head_dim] (post-RoPE)."""
    keys: list
    values: list
    n_tokens: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


# ("capture", {layer: (k, v)}) while the prompt runs alone; ("attend", PromptCache) while text attends to it.
_state: ContextVar = ContextVar("ctp_prefix_state", default=None)


def prefix_attention_reference(q, k, v, k_prefix, v_prefix, causal: bool = True, scale: float | None = None,
                               kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: concatenate [prompt; own] keys per sequence and run a masked softmax (the oracle of
    the op's tests, in the inputs' dtype; rows that see no key give 0)."""
    b, h, length, d = q.shape
    hkv, p, _ = k_prefix.shape
    s = k.shape[2]
    groups = h // hkv
    scale = d ** -0.5 if scale is None else scale
    keys = torch.cat([k_prefix.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(groups, 1)
    values = torch.cat([v_prefix.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(groups, 1)
    scores = (q @ keys.transpose(-1, -2)) * scale
    own = torch.arange(s, device=q.device)
    allow = torch.ones(b, 1, length, s, dtype=torch.bool, device=q.device)
    if causal:
        allow = allow & (own[None, :] <= torch.arange(length, device=q.device)[:, None] + s - length)
    if kv_start is not None:
        allow = allow & (own >= kv_start.to(q.device)[:, None, None, None])
    allow = torch.cat([torch.ones(b, 1, length, p, dtype=torch.bool, device=q.device), allow], -1)
    weights = torch.softmax(scores.masked_fill(~allow, float("-inf")), -1).nan_to_num(0.0)
    return weights @ values


def supports_prefix(model) -> bool:
    """Whether `model` can attend to a shared prompt cache (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in ARCHITECTURES:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder is not None and hasattr(decoder, "rotary_emb")


def _check_supported(model) -> None:
    if not supports_prefix(model):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"model: shared-prefix attention supports {', '.join(ARCHITECTURES)} decoders with full "
                         f"causal attention, not {kind!r}; use the concatenated prompt path (shared_prefix=False)")


def _kv_start(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Left padding of a 2-D key mask [B, S] as the index of each row's first real key. Pads may also sit
    at the end of a row (right padding: causal real queries never see them); a pad between real tokens
    cannot be expressed and is refused."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"attention_mask: expected a 2-D padding mask with shared-prefix attention, got "
                         f"{mask.dim()}-D")
    mask = mask.bool()
    real = mask.long()
    start = real.argmax(-1)  # first real key (0 for an all-pad row)
    count = real.sum(-1)
    pos = torch.arange(mask.shape[1], device=mask.device)
    expected = (pos >= start[:, None]) & (pos < (start + count)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError("attention_mask: shared-prefix attention needs each row's real tokens in one run "
                         "(left or right padding), not pads between them")
    return start


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function `ctp_prefix`: q [B, H, L, D], k/v [B, Hkv, S, D] (own + cache);
    `attention_mask` is what `_mask` made of the padding: each row's first real key, or None."""
    state = _state.get()
    if state is None:
        raise RuntimeError("the ctp_prefix attention runs only inside ctp_fast.nn.prefix_attention.attend(...)")
    mode, payload = state
    layer = module.layer_idx
    if not query.dtype == key.dtype == value.dtype:
        # under autocast q and k leave the rotary embedding in fp32 while v is its projection's bf16:
        # attention (fp32 inside the kernel anyway) takes them in their common, wider type
        dt = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if mode == "capture":  # the prompt alone, batch 1: plain causal attention, keep its K/V
        payload[layer] = (key[0], value[0])
        empty = key.new_zeros(key.shape[1], 0, key.shape[3])
        out = prefix_attention(query, key, value, empty, empty, causal=True, scale=scaling)
    else:
        cache: PromptCache = payload
        kp, vp = cache.keys[layer], cache.values[layer]
        out = prefix_attention(query, key, value, kp.to(query.dtype), vp.to(query.dtype), causal=True,
                               scale=scaling, kv_start=attention_mask)  # from _mask, once per forward
    return out.transpose(1, 2), None


def _mask(*args, **kwargs):
    """transformers mask function `ctp_prefix`: the padding-only 2-D mask flash attention gets (None when
    nothing is padded), turned into each row's first real key; built once per forward, used by every layer."""
    from transformers.masking_utils import flash_attention_mask
    return _kv_start(flash_attention_mask(*args, **kwargs))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register(ATTN_NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _mask)


@contextmanager
def _prefix_mode(model, state):
    """Inside: the model's attention is `ctp_prefix` in the given mode; in attend mode the rotary
    position ids are shifted by the prompt length."""
    _check_supported(model)
    _register()
    config = model.config
    saved = config._attn_implementation
    token = _state.set(state)
    hook = None
    if state[0] == "attend":
        shift = state[1].n_tokens

        def add_offset(module, args, kwargs):
            if "position_ids" in kwargs:
                kwargs["position_ids"] = kwargs["position_ids"] + shift
            else:
                args = (args[0], args[1] + shift, *args[2:])
            return args, kwargs
        hook = model.get_decoder().rotary_emb.register_forward_pre_hook(add_offset, with_kwargs=True)
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved
        if hook is not None:
            hook.remove()
        _state.reset(token)


def build_prompt_cache(model, prompt) -> PromptCache:
    """Run the prompt alone (batch 1, positions 0..n-1) and keep every layer's keys and values. Under
    torch.no_grad() it is a constant for inference; with grad enabled (training) the cache stays attached
    to the prompt's graph, so gradients reaching it flow back to the prompt embeddings."""
    _check_supported(model)
    emb = model.get_input_embeddings().weight
    x = prompt.embeddings.to(device=emb.device, dtype=emb.dtype).unsqueeze(0)
    captured: dict = {}
    positions = torch.arange(prompt.n_tokens, device=emb.device).unsqueeze(0)
    with _prefix_mode(model, ("capture", captured)):
        model.get_decoder()(inputs_embeds=x, position_ids=positions, use_cache=False)
    layers = sorted(captured)
    if layers != list(range(len(layers))) or not layers:
        raise RuntimeError(f"prompt cache: captured layers {layers}, expected 0..n-1")
    return PromptCache([captured[i][0] for i in layers], [captured[i][1] for i in layers], prompt.n_tokens)


@contextmanager
def attend(model, cache: PromptCache):
    """Every forward and generate of `model` inside attends to `cache` (the prompt before every
    sequence, its positions 0..n-1, the text's from n on)."""
    if not isinstance(cache, PromptCache):
        raise ValueError(f"cache: expected a PromptCache from build_prompt_cache, got {type(cache).__name__}")
    with _prefix_mode(model, ("attend", cache)):
        yield


def prefix_forward(model, prompt, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   cache: PromptCache | None = None, hidden_only: bool = False, **kwargs):
    """The model's output on `input_ids` with the prompt before every row, through a shared prompt cache
    (built here, with gradients if enabled, unless given). Logits cover the text positions only;
    hidden_only=True runs the decoder without the lm_head (its output has last_hidden_state)."""
    cache = build_prompt_cache(model, prompt) if cache is None else cache
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if attention_mask is not None:
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with attend(model, cache):
        return (model.get_decoder() if hidden_only else model)(**inputs, use_cache=False, **kwargs)
