"""Prompt-prefixed attention: the op against the concatenate-everything reference (forward, backward,
every ISA path, fp32/bf16, GQA, padding, decode), its argument checks, and the Hugging Face integration
(training loss/gradients, prefill, decode with a KV cache, generate, padded batches)."""
import pytest
import torch
import torch.nn.functional as F

import ctp_fast
from ctp_fast.nn.prefix_attention import (PromptCache, attend, build_prompt_cache, prefix_attention_reference,
                                          prefix_forward, supports_prefix)
from ctp_fast.ops import prefix_attention
from ctp_fast.prompt.soft_prompt import SoftPrompt, prompted_forward
from test_prompt import tiny_family, tiny_llama, windows

# (B, H, Hkv, L, S, P, D): GQA groups 1..3, decode (L=1 < S), P = 0 / 1 / > one key block, odd D, D = 256
SHAPES = [
    (1, 1, 1, 1, 1, 1, 4),
    (2, 6, 2, 5, 5, 7, 16),
    (1, 9, 3, 1, 40, 100, 64),
    (3, 4, 4, 70, 90, 3, 33),
    (2, 2, 1, 130, 130, 0, 8),
    (2, 3, 3, 3, 3, 65, 256),
    (8, 9, 3, 17, 17, 100, 64),
]


def make(shape, dtype=torch.float32, seed=0, grad=False):
    b, h, hkv, length, s, p, d = shape
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*sz, generator=g).to(dtype).requires_grad_(grad)
         for sz in ((b, h, length, d), (b, hkv, s, d), (b, hkv, s, d), (hkv, p, d), (hkv, p, d))]
    start = torch.randint(0, min(s, 4), (b,), generator=g)
    return t, start


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_reference(isa, shape, causal, padded):
    (q, k, v, kp, vp), start = make(shape)
    start = start if padded else None
    out, lse = prefix_attention(q, k, v, kp, vp, causal=causal, kv_start=start, return_lse=True)
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, kp, vp)), causal=causal, kv_start=start)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)
    # lse: log of the softmax denominator, by hand on one row
    b, h, i = shape[0] - 1, shape[1] - 1, shape[3] - 1
    keys = torch.cat([kp[h // (shape[1] // shape[2])], k[b, h // (shape[1] // shape[2])]], 0).double()
    scores = keys @ q[b, h, i].double() * shape[-1] ** -0.5
    lo = 0 if start is None else int(start[b])
    visible = torch.cat([torch.ones(shape[5], dtype=torch.bool), torch.arange(shape[4]) >= lo])
    assert float(lse[b, h, i]) == pytest.approx(float(torch.logsumexp(scores[visible], 0)), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_backward_matches_reference(isa, shape, causal, padded):
    tensors, start = make(shape, grad=True)
    start = start if padded else None
    go = torch.randn(shape[0], shape[1], shape[3], shape[6], generator=torch.Generator().manual_seed(9))
    ours = torch.autograd.grad((prefix_attention(*tensors, causal=causal, kv_start=start) * go).sum(), tensors)
    ref = prefix_attention_reference(*(t.double() for t in tensors), causal=causal, kv_start=start)
    want = torch.autograd.grad((ref * go.double()).sum(), tensors)
    for name, a, w in zip(("dq", "dk", "dv", "dk_prefix", "dv_prefix"), ours, want):
        assert a.shape == w.shape, name
        torch.testing.assert_close(a.double(), w.double(), atol=5e-6, rtol=5e-5, msg=name)


def test_prefix_grads_are_summed_over_the_batch():
    (q, k, v, kp, vp), _ = make((3, 4, 2, 6, 6, 5, 8), grad=True)
    (prefix_attention(q, k, v, kp, vp) ** 2).sum().backward()
    total = kp.grad.clone()
    parts = torch.zeros_like(total)
    for b in range(3):
        kp.grad = None
        (prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], kp, vp) ** 2).sum().backward()
        parts += kp.grad
    torch.testing.assert_close(total, parts, atol=1e-5, rtol=1e-5)


def test_bf16_and_strided_inputs():
    shape = (2, 6, 2, 9, 12, 10, 32)
    (q, k, v, kp, vp), start = make(shape)
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, kp, vp)), kv_start=start)
    out = prefix_attention(*(t.bfloat16() for t in (q, k, v, kp, vp)), kv_start=start)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().mean() < 2e-2
    # q as Hugging Face makes it: a transposed view of [B, L, H, D]
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    torch.testing.assert_close(prefix_attention(qt, k, v, kp, vp, kv_start=start),
                               prefix_attention(q, k, v, kp, vp, kv_start=start))


def test_row_that_sees_nothing_is_zero_with_finite_grads():
    # no prompt, left padding of 3: causal queries 0..2 see no key at all
    (q, k, v, kp, vp), _ = make((1, 2, 1, 5, 5, 0, 8), grad=True)
    start = torch.tensor([3])
    out, lse = prefix_attention(q, k, v, kp, vp, kv_start=start, return_lse=True)
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    assert torch.isinf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[0, :, :3], torch.zeros_like(q.grad[0, :, :3]))


def test_bad_input_is_refused_clearly():
    (q, k, v, kp, vp), _ = make((2, 4, 2, 3, 5, 2, 8))
    cases = [
        (dict(q=q.double()), "q: expected float32 or bfloat16"),
        (dict(k=k.bfloat16()), "k: expected the dtype of q"),
        (dict(q=q[0]), r"q: expected \[batch, heads, L, head_dim\]"),
        (dict(k=k[:, :, :2]), "k: expected"),  # S < L
        (dict(v=v[:, :1]), "v: expected the shape of k"),
        (dict(k=k[:, :1].expand(2, 3, 5, 8).contiguous(), v=v[:, :1].expand(2, 3, 5, 8).contiguous()),
         "must divide the query heads"),
        (dict(k_prefix=kp[:1]), "k_prefix: expected"),
        (dict(v_prefix=vp[:, :1]), "v_prefix: expected the shape of k_prefix"),
        (dict(q=torch.zeros(2, 4, 3, 300), k=torch.zeros(2, 2, 5, 300), v=torch.zeros(2, 2, 5, 300),
              k_prefix=torch.zeros(2, 2, 300), v_prefix=torch.zeros(2, 2, 300)), "head_dim must be in 1..256"),
        (dict(kv_start=torch.zeros(3, dtype=torch.long)), r"kv_start: expected shape \[2\]"),
        (dict(kv_start=torch.zeros(2)), "kv_start: expected int32 or int64"),
        (dict(k_prefix=kp.to("meta"), v_prefix=vp.to("meta")), "k_prefix: expected a tensor on cpu"),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, k_prefix=kp, v_prefix=vp)
        args.update(change)
        with pytest.raises((RuntimeError, ValueError), match=message):
            prefix_attention(**args)


def test_opcheck():
    (q, k, v, kp, vp), start = make((2, 4, 2, 3, 5, 2, 8), grad=True)
    torch.library.opcheck(torch.ops.ctp_fast.prefix_attention, (q, k, v, kp, vp, start, True, 0.3))


def test_fake_impl_and_compile():
    (q, k, v, kp, vp), _ = make((2, 4, 2, 3, 5, 2, 8))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv, fkp, fvp = (mode.from_tensor(t) for t in (q, k, v, kp, vp))
        out = prefix_attention(fq, fk, fv, fkp, fvp)
        assert out.shape == q.shape
    compiled = torch.compile(lambda *t: prefix_attention(*t), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, kp, vp), prefix_attention(q, k, v, kp, vp))


# ---------------------------------------------------------------------------------------------- HF models
def test_training_loss_and_grads_match_concatenated_path():
    model = tiny_llama(seed=3)
    ctp_fast.swap_linears(model, group_size=32)  # through the compressed kernels
    p = SoftPrompt.from_vocab(model, 6, seed=1)
    ids = windows(3, 12, high=128, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    grads, losses = [], []
    for shared in (True, False):
        p.embeddings.grad = None
        out = prompted_forward(model, p, ids, attention_mask=mask, shared_prefix=shared)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads.append(p.embeddings.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # The two paths run the packed kernels at different M: on amx the concatenated one (M >= 16) takes the
    # AMX tiles (about 2^-17 relative per product), the shared prompt (M = 6) the fp32 kernels.
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_bf16_autocast_training_matches_concatenated_path():
    """Under bf16 autocast (tune(dtype="bf16")) the compressed linears take bf16 activations while q and k
    leave the rotary embedding in fp32: both paths still run, and agree to bf16 precision."""
    model = tiny_llama(seed=3)
    ctp_fast.swap_linears(model, group_size=32)
    p = SoftPrompt.from_vocab(model, 6, seed=1)
    ids = windows(3, 12, high=128, seed=2)
    grads, losses = [], []
    for shared in (True, False):
        p.embeddings.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prompted_forward(model, p, ids, shared_prefix=shared)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads.append(p.embeddings.grad.clone())
    with torch.no_grad():
        fp32 = float(prompted_forward(model, p, ids, shared_prefix=True).loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-2) and losses[0] == pytest.approx(fp32, rel=2e-2)
    assert F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.99


def test_prefill_decode_and_generate_match_concatenated_path():
    model = tiny_llama(seed=4)
    p = SoftPrompt.from_vocab(model, 5, seed=1)
    ids = windows(2, 7, high=128, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        cache = build_prompt_cache(model, p)
        assert isinstance(cache, PromptCache) and len(cache.keys) == model.config.num_hidden_layers
        assert cache.keys[0].shape == (model.config.num_key_value_heads, 5, 64 // model.config.num_attention_heads)
        with attend(model, cache):
            # positions as generate() makes them from the padding mask (the cache shifts them by 5)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            prefill = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            nxt = prefill.logits[:, -1].argmax(-1, keepdim=True)
            step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                         position_ids=pos[:, -1:] + 1, cache=prefill.cache, use_cache=True)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
        full = prompted_forward(model, p, torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1),
                                shared_prefix=False)
        real = mask.bool()
        torch.testing.assert_close(prefill.logits[real], full.logits[:, 5:-1][real], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=2e-5, rtol=1e-5)
        # greedy decoding on the concatenated path, token by token
        cur, m = ids, mask
        for _ in range(6):
            logits = prompted_forward(model, p, cur, m, shared_prefix=False).logits[:, -1]
            t = logits.argmax(-1, keepdim=True)
            cur, m = torch.cat([cur, t], 1), torch.cat([m, torch.ones_like(t)], 1)
    assert torch.equal(gen, cur)
    assert model.config._attn_implementation != "ctp_prefix"  # restored on exit


def test_prompt_cache_is_reused_across_batches():
    model = tiny_llama(seed=5)
    p = SoftPrompt.from_vocab(model, 4, seed=2)
    with torch.no_grad():
        cache = build_prompt_cache(model, p)
        for seed, batch in ((1, 1), (2, 3)):
            ids = windows(batch, 6, high=128, seed=seed)
            a = prefix_forward(model, p, ids, cache=cache).logits
            b = prompted_forward(model, p, ids, shared_prefix=False).logits[:, 4:]
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_unsupported_models_and_masks_are_refused():
    gpt2 = tiny_family("gpt2")
    assert not supports_prefix(gpt2) and supports_prefix(tiny_llama())
    p = SoftPrompt.from_vocab(gpt2, 3)
    with pytest.raises(ValueError, match="shared-prefix attention supports"):
        prompted_forward(gpt2, p, windows(1, 5, high=128), shared_prefix=True)
    prompted_forward(gpt2, p, windows(1, 5, high=128))  # auto: falls back to the concatenated path
    model = tiny_llama()
    ids = windows(1, 6, high=128)
    holes = torch.tensor([[1, 1, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask: shared-prefix attention needs"):
        prefix_forward(model, SoftPrompt.from_vocab(model, 2), ids, holes)
    with pytest.raises(ValueError, match="cache: expected a PromptCache"):
        with attend(model, "not a cache"):
            pass


def test_tune_same_prompt_on_both_paths():
    from ctp_fast.prompt import TuneConfig, tune
    model = tiny_llama(seed=6)
    train, val = windows(8, 10, seed=1), windows(2, 10, seed=2)
    prompts = []
    for shared in (True, False):
        cfg = TuneConfig(n_tokens=4, steps=4, batch_size=4, eval_every=4, lr=1e-2, shared_prefix=shared)
        prompts.append(tune(model, train, val, cfg, progress=False).prompt.embeddings)
    torch.testing.assert_close(prompts[0], prompts[1], atol=1e-5, rtol=1e-4)
