"""The chunked lm_head cross entropy (ctp_fast.nn.head_loss) against the logits path it replaces."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctp_fast.nn import head_loss
from ctp_fast.nn.head_loss import head_cross_entropy, loss_head
from ctp_fast.prompt import SoftPrompt, prompted_forward

from test_prompt import tiny_family, tiny_llama, windows

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def reference(hidden, head, targets, reduction="mean"):
    logits = head(hidden)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def frozen_head(vocab, width, bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(width, vocab, bias=bias).to(dtype)
    head.requires_grad_(False)
    return head


@pytest.mark.parametrize("batch,seqlen,vocab,width", [(1, 2, 7, 3), (2, 9, 130, 16), (3, 100, 257, 24),
                                                      (1, 300, 64, 8)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_loss_and_grad_match_logits_path(batch, seqlen, vocab, width, bias, reduction, ignored, monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 64)  # several chunks, and a partial last one
    gen = torch.Generator().manual_seed(batch * seqlen + vocab)
    head = frozen_head(vocab, width, bias)
    targets = torch.randint(0, vocab, (batch, seqlen - 1), generator=gen)
    targets[torch.rand(targets.shape, generator=gen) < ignored] = -100
    base = torch.randn(batch, seqlen, width, generator=gen) * 3  # logits well spread: tests the max shift
    got_h, want_h = base.clone().requires_grad_(), base.clone().requires_grad_()
    got = head_cross_entropy(got_h, head, targets, reduction)
    want = reference(want_h, head, targets, reduction)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (got * 1.7).backward()
    (want * 1.7).backward()
    torch.testing.assert_close(got_h.grad, want_h.grad, atol=1e-6, rtol=1e-4)
    assert got_h.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_bf16_weight_and_hidden():
    head = frozen_head(300, 32, dtype=torch.bfloat16)
    hidden = torch.randn(2, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (2, 39))
    got = head_cross_entropy(hidden, head, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference(hidden, head, targets), atol=2e-3, rtol=2e-3)
    got.backward()
    assert hidden.grad.dtype == torch.bfloat16 and hidden.grad.abs().max() > 0


def test_nothing_scored_is_nan_like_cross_entropy():
    head = frozen_head(10, 4)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    targets = torch.full((2, 4), -100)
    assert math.isnan(float(head_cross_entropy(hidden, head, targets).detach()))
    assert math.isnan(float(reference(hidden, head, targets)))
    assert float(head_cross_entropy(hidden, head, targets, "sum")) == 0.0


def test_no_grad_skips_gradient():
    head = frozen_head(50, 8)
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    targets = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        loss = head_cross_entropy(hidden, head, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, head, targets).detach())


def test_bad_arguments():
    head = frozen_head(10, 4)
    with pytest.raises(ValueError, match="targets: expected shape"):
        head_cross_entropy(torch.randn(2, 5, 4), head, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        head_cross_entropy(torch.randn(2, 5, 4), head, torch.zeros(2, 4, dtype=torch.long), "none")


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_loss_head_only_where_logits_are_the_plain_head(family):
    model = tiny_family(family)
    assert loss_head(model) is None  # trainable head: the logits path
    frozen(model)
    assert (loss_head(model) is not None) == (family in ("llama", "gemma3"))
    if family == "gemma3":
        model.config.final_logit_softcapping = 30.0
        assert loss_head(model) is None


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("shared_prefix", [None, False])
def test_prompted_forward_loss_only_matches_logits(family, shared_prefix):
    model = frozen(tiny_family(family))
    ids = windows(3, 11, high=128, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: those positions are not scored
    outs, grads = [], []
    for logits in (True, False):
        p = SoftPrompt.from_vocab(model, 5, seed=1)
        out = prompted_forward(model, p, ids, attention_mask=mask, shared_prefix=shared_prefix, logits=logits)
        out.loss.backward()
        outs.append(out)
        grads.append(p.embeddings.grad)
    fused = loss_head(model) is not None
    assert (outs[1].logits is None) == fused
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    assert grads[1].abs().max() > 0
    assert torch.equal(outs[1]["targets"], outs[0]["targets"])


def test_tune_step_uses_the_head_loss(monkeypatch):
    """tune() asks for the loss only, so it never builds the full logits of a supported model."""
    from ctp_fast.prompt import TuneConfig, tune

    model = frozen(tiny_llama())
    calls = []
    real = head_loss._HeadCrossEntropy.apply
    monkeypatch.setattr(head_loss._HeadCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    tune(model, windows(8, 16), None, TuneConfig(n_tokens=4, steps=2, batch_size=4), progress=False)
    assert len(calls) == 2
