"""Soft prompts: prompted forward (layout, padding, scoring), gradients through packed kernels, the PEFT
layout on disk, and tuning (loss goes down, seed-determined, exact resume, Adafactor, bf16).

Most tests use a tiny randomly initialised LLaMA; one uses the real SmolLM2-135M (skipped when the
shipped model is not installed) for PEFT interoperability.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ctp_fast
from ctp_fast.eval.perplexity import perplexity
from ctp_fast.nn import CompressedLinear, dequantized_copy
from ctp_fast.prompt import (SoftPrompt, TuneConfig, load_prompt, prompted_forward, save_prompt, scored_targets,
                             tune)
from ctp_fast.prompt.io import CONFIG_NAME, META_NAME, WEIGHTS_NAME

PEFT_CONFIG_KEYS = {"auto_mapping", "base_model_name_or_path", "inference_mode", "modules_to_save",
                    "num_attention_heads", "num_layers", "num_transformer_submodules", "num_virtual_tokens",
                    "peft_type", "peft_version", "prompt_tuning_init", "prompt_tuning_init_text", "revision",
                    "task_type", "token_dim", "tokenizer_kwargs", "tokenizer_name_or_path"}


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                      initializer_range=0.1)  # larger than the default 0.02, so a prompt can move the outputs
    return LlamaForCausalLM(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def tiny_family(name: str):
    """Tiny random models of the other supported families (GPT-2, OPT, Gemma 3 text)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, OPTConfig,
                              OPTForCausalLM)

    if name == "llama":
        return tiny_llama()
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    if name == "opt":
        return OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                        vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              vocab_size=128, sliding_window=32, max_position_embeddings=64)).eval()


def windows(n: int, seqlen: int, high: int = 16, seed: int = 0) -> torch.Tensor:
    """Token windows drawn from the first `high` ids: structure a prompt can learn (loss ln 128 -> ln 16)."""
    return torch.randint(0, high, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- forward
def test_constructors_and_fp32(tiny):
    p = SoftPrompt.from_vocab(tiny, 6, seed=1)
    assert p.embeddings.shape == (6, 64) and p.embeddings.dtype == torch.float32
    rows = tiny.get_input_embeddings().weight
    # every row is a row of the embedding matrix among the first 5000 ids (all 128 here)
    assert all(any(torch.equal(r, e) for e in rows) for r in p.embeddings)
    assert torch.equal(p.embeddings, SoftPrompt.from_vocab(tiny, 6, seed=1).embeddings)
    assert not torch.equal(p.embeddings, SoftPrompt.from_vocab(tiny, 6, seed=2).embeddings)
    r = SoftPrompt.random(5, 64, std=0.5, seed=3)
    assert r.embeddings.shape == (5, 64) and 0.3 < float(r.embeddings.detach().std()) < 0.7
    r.to(torch.bfloat16)
    assert r.embeddings.dtype == torch.float32  # stays fp32 whatever the model dtype
    with pytest.raises(ValueError, match="n_tokens"):
        SoftPrompt.random(0, 64)
    with pytest.raises(ValueError, match="2-D"):
        SoftPrompt(torch.zeros(64))
    with pytest.raises(ValueError, match="hidden size"):
        prompted_forward(tiny, SoftPrompt.random(3, 32), windows(1, 5))
    with pytest.raises(ValueError, match="n_tokens"):
        TuneConfig(n_tokens=101)


def test_prompt_labels_and_layout(tiny):
    ids = windows(2, 6)
    p = SoftPrompt.random(3, 64, std=0.1)
    shared = prompted_forward(tiny, p, ids)  # shared-prefix path (llama): logits over the text only
    assert shared["n_prefix"] == 0 and shared.logits.shape == (2, 6, 128)
    assert torch.equal(shared["labels"], ids) and torch.equal(shared["targets"], ids[:, 1:])
    out = prompted_forward(tiny, p, ids, shared_prefix=False)
    assert out["n_prefix"] == 3 and out.logits.shape == (2, 3 + 6, 128)
    torch.testing.assert_close(shared.logits, out.logits[:, 3:], atol=2e-5, rtol=1e-5)
    assert (out["labels"][:, :3] == -100).all() and torch.equal(out["labels"][:, 3:], ids)
    t = out["targets"]  # target of each logit position: none for prompt positions (incl. the last one)
    assert t.shape == (2, 3 + 6 - 1)
    assert (t[:, :3] == -100).all() and torch.equal(t[:, 3:], ids[:, 1:])
    # pads are -100, and the token after a pad is not predicted from it
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    t = scored_targets(3, ids, mask)
    assert (t[0, :3 + 2] == -100).all() and torch.equal(t[0, 5:], ids[0, 3:])
    assert torch.equal(t[1, 3:], ids[1, 1:])


def test_perplexity_never_counts_prompt_positions(tiny):
    ids = windows(3, 9, high=128, seed=1)
    p = SoftPrompt.random(4, 64, std=0.3, seed=1)
    with torch.no_grad():
        logits = prompted_forward(tiny, p, ids, shared_prefix=False).logits.double()
    logp = torch.log_softmax(logits, -1)
    n, length = 4, ids.shape[1]
    # by hand: position n + t predicts ids[:, t + 1], t = 0 .. L-2
    manual = -sum(float(logp.detach()[b, n + t, ids[b, t + 1]]) for b in range(3) for t in range(length - 1))
    count = 3 * (length - 1)
    nll = perplexity(tiny, ids, batch_size=2, prompt=p)
    assert nll.tokens == count
    assert nll.total == pytest.approx(manual, rel=1e-5)
    assert nll.loss == pytest.approx(manual / count, rel=1e-5)
    # the training loss is the same number (mean over real predicted tokens)
    assert float(prompted_forward(tiny, p, ids).loss.detach()) == pytest.approx(manual / count, rel=1e-5)
    # averaging over prompt positions too (last prompt position predicts the first token; earlier prompt
    # positions "predict" the next prompt slot, scored here as token 0) gives another number
    also_first = manual - sum(float(logp[b, n - 1, ids[b, 0]]) for b in range(3))
    assert also_first / (count + 3) != pytest.approx(nll.loss, rel=1e-3)
    with_prompt_slots = also_first - sum(float(logp[b, t, 0]) for b in range(3) for t in range(n - 1))
    assert with_prompt_slots / (count + 3 * n) != pytest.approx(nll.loss, rel=1e-3)
    # and a prompt does change the model's predictions
    assert perplexity(tiny, ids, batch_size=2).loss != pytest.approx(nll.loss, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_left_and_right_padding_match_unpadded(family):
    tiny = tiny_family(family)
    p = SoftPrompt.from_vocab(tiny, 5, seed=2)
    seqs = [windows(1, 9, high=128, seed=3)[0], windows(1, 4, high=128, seed=4)[0]]
    single = [prompted_forward(tiny, p, s[None]) for s in seqs]
    length = 9
    for side in ("left", "right"):
        ids = torch.zeros(2, length, dtype=torch.long)
        mask = torch.zeros(2, length, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        out = prompted_forward(tiny, p, ids, attention_mask=mask)
        assert torch.isfinite(out.logits).all()
        n = out["n_prefix"]  # 0 on the shared-prefix path (llama), 5 when the prompt is concatenated
        for i, s in enumerate(seqs):
            sl = slice(n + length - len(s), n + length) if side == "left" else slice(n, n + len(s))
            torch.testing.assert_close(out.logits[i, sl], single[i].logits[0, n:], atol=2e-5, rtol=1e-5)
        # batch loss = token-weighted mean of the rows' losses
        want = (float(single[0].loss.detach()) * 8 + float(single[1].loss.detach()) * 3) / 11
        assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------- gradients
def test_prompt_grad_through_compressed_linears_matches_dense():
    model = tiny_llama(seed=1)
    report = ctp_fast.swap_linears(model, group_size=32)
    assert len(report.replaced) == 2 * 7
    dense = dequantized_copy(model)
    assert not any(isinstance(m, CompressedLinear) for m in dense.modules())
    for m in (model, dense):
        for prm in m.parameters():
            prm.requires_grad_(False)
    ids = windows(2, 12, high=128, seed=5)
    grads = []
    for m in (model, dense):
        p = SoftPrompt.random(4, 64, std=0.3, seed=4)
        prompted_forward(m, p, ids).loss.backward()
        grads.append(p.embeddings.grad)
        assert all(prm.grad is None for prm in m.parameters())  # only the prompt gets gradients
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- io
def test_save_load_round_trip(tiny, tmp_path):
    p = SoftPrompt.from_vocab(tiny, 7, seed=3)
    out = save_prompt(tmp_path / "p", p, model=tiny, metadata={"model": "tiny", "recipe": {"method": "rtn"}})
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert set(cfg) == PEFT_CONFIG_KEYS
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM" and cfg["inference_mode"] is True
    assert (cfg["num_virtual_tokens"], cfg["token_dim"], cfg["num_layers"], cfg["num_attention_heads"]) == (7, 64, 2, 4)
    assert cfg["prompt_tuning_init"] == "SAMPLE_VOCAB"
    q, meta = load_prompt(out)
    assert torch.equal(q.embeddings, p.embeddings) and q.embeddings.dtype == torch.float32
    assert meta["model"] == "tiny" and meta["recipe"] == {"method": "rtn"} and meta["vocab_size"] == 128
    assert meta["adapter_config"]["num_virtual_tokens"] == 7 and q.init == "vocab"
    # saving again replaces the folder as a whole; a folder with someone else's files is refused
    save_prompt(out, SoftPrompt.random(2, 64))
    assert load_prompt(out)[0].n_tokens == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_prompt(tmp_path / "other", p)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary leftovers


def test_load_bad_files(tiny, tmp_path):
    good = save_prompt(tmp_path / "good", SoftPrompt.random(3, 64), model=tiny)

    def variant(name):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    with pytest.raises(FileNotFoundError, match="no such"):
        load_prompt(tmp_path / "missing")
    d = variant("noweights")
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_prompt(d)
    d = variant("truncated")
    raw = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_prompt(d)
    d = variant("wrongkey")
    save_file({"base_model.model.lora_A": torch.zeros(3, 64)}, str(d / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="prompt_embeddings"):
        load_prompt(d)
    d = variant("wrongshape")
    save_file({"prompt_embeddings": torch.zeros(4, 64)}, str(d / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="num_virtual_tokens=3"):
        load_prompt(d)
    d = variant("one_d")
    save_file({"prompt_embeddings": torch.zeros(64)}, str(d / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="2-D"):
        load_prompt(d)
    d = variant("lora")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    (d / CONFIG_NAME).write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="LORA adapter"):
        load_prompt(d)
    d = variant("badjson")
    (d / CONFIG_NAME).write_text('{"peft_type": "PROMPT_TU')
    with pytest.raises(ValueError, match="truncated"):
        load_prompt(d)
    d = variant("badmeta")
    (d / META_NAME).write_text("[1, 2")
    with pytest.raises(ValueError, match=META_NAME):
        load_prompt(d)


# ---------------------------------------------------------------------------------------------- tuning
def test_tune_lowers_loss_and_freezes_model(tiny, tmp_path):
    train, val, test = windows(16, 16, seed=10), windows(4, 16, seed=11), windows(4, 16, seed=12)
    cfg = TuneConfig(n_tokens=4, steps=12, eval_every=6, batch_size=4, lr=0.05, warmup_steps=1)
    seen = []

    def check(step, record):
        seen.append(record["loss"])
        assert all(not prm.requires_grad and prm.grad is None for prm in tiny.parameters())

    before = [prm.detach().clone() for prm in tiny.parameters()]
    res = tune(tiny, train, val, cfg, out_dir=tmp_path / "run", test_windows=test, progress=False, callback=check,
               metadata={"model": "tiny"})
    assert len(seen) == 12
    assert all(prm.requires_grad for prm in tiny.parameters())  # restored
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
    first, last = sum(seen[:3]) / 3, sum(seen[-3:]) / 3
    assert last < first - 0.1, (first, last)
    assert res.best_val_loss < res.init_val_loss
    assert [r["step"] for r in res.history["val"]] == [0, 6, 12]
    assert res.test_loss is not None and math.isfinite(res.test_ppl)
    # the best prompt is on disk (PEFT layout) with its metadata, and reproduces its val loss
    p, meta = load_prompt(tmp_path / "run" / "best")
    assert torch.equal(p.embeddings, res.prompt.embeddings)
    assert meta["model"] == "tiny" and meta["best_step"] == res.best_step and meta["test_loss"] == res.test_loss
    assert perplexity(tiny, val, prompt=p).loss == pytest.approx(res.best_val_loss, rel=1e-6)
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((tmp_path / "run" / "result.json").read_text())["best_step"] == res.best_step
    # same seed => same prompt
    again = tune(tiny, train, val, cfg, progress=False)
    assert torch.equal(again.prompt.embeddings, res.prompt.embeddings)


def test_seconds_per_step_times_the_tuning_step_and_leaves_the_model_alone(tiny, monkeypatch):
    """seconds_per_step runs tune()'s step loss on grad_accum micro-batches of batch_size windows (one untimed
    step, then `repeats`), restores the model's flags and changes none of its weights."""
    import importlib

    from ctp_fast.prompt import seconds_per_step
    tune_mod = importlib.import_module("ctp_fast.prompt.tune")  # the module (the package's `tune` is the function)

    calls = []
    step_loss = tune_mod._step_loss

    def counting(model, prompt, ids, config):
        calls.append(tuple(ids.shape))
        return step_loss(model, prompt, ids, config)
    monkeypatch.setattr(tune_mod, "_step_loss", counting)
    before = [prm.detach().clone() for prm in tiny.parameters()]
    tiny.train()
    cfg = TuneConfig(n_tokens=4, batch_size=3, grad_accum=2)
    s = seconds_per_step(tiny, windows(5, 16), cfg, repeats=2)
    assert math.isfinite(s) and s > 0
    assert calls == [(3, 16)] * 6
    assert tiny.training and all(prm.requires_grad and prm.grad is None for prm in tiny.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
    tiny.eval()
    with pytest.raises(ValueError, match="train_windows"):
        seconds_per_step(tiny, torch.zeros(4), cfg)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_is_exact(tiny, tmp_path, optimizer):
    train, val = windows(5, 8, seed=20), windows(2, 8, seed=21)  # 5 windows, batch 2: epochs cut mid-batch
    cfg = TuneConfig(n_tokens=3, steps=7, eval_every=2, save_every=2, batch_size=2, optimizer=optimizer,
                     warmup_steps=2, seed=5)
    straight = tune(tiny, train, val, cfg, out_dir=tmp_path / "a", progress=False)

    def crash(step, record):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):  # checkpoint at step 4, crash after step 5
        tune(tiny, train, val, cfg, out_dir=tmp_path / "b", progress=False, callback=crash)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["step"] == 4
    resumed = tune(tiny, train, val, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 7 and a["pos"] == b["pos"] == 14
    assert torch.equal(a["prompt"], b["prompt"])
    assert torch.equal(straight.prompt.embeddings, resumed.prompt.embeddings)
    assert a["history"]["train"] == b["history"]["train"] and a["history"]["val"] == b["history"]["val"]
    assert straight.best_step == resumed.best_step and straight.best_val_loss == resumed.best_val_loss
    # a different config is refused
    with pytest.raises(ValueError, match="different config"):
        tune(tiny, train, val, TuneConfig(**{**cfg.to_dict(), "lr": 0.5}), out_dir=tmp_path / "b", resume=True,
             progress=False)


def test_bf16_on_compressed_model(tmp_path):
    model = tiny_llama(seed=2)
    ctp_fast.swap_linears(model, group_size=32)
    train, val = windows(4, 8, seed=30), windows(2, 8, seed=31)
    cfg = TuneConfig(n_tokens=3, steps=3, eval_every=3, batch_size=2, dtype="bf16", grad_accum=2, init="random")
    res = tune(model, train, val, cfg, progress=False)
    assert res.prompt.embeddings.dtype == torch.float32
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in res.history["train"])
    assert math.isfinite(res.best_val_loss)


# ---------------------------------------------------------------------------------------------- real model, PEFT
def test_smollm2_peft_interop(tmp_path):
    peft = pytest.importorskip("peft")
    from ctp_fast.data import load_model

    try:
        model, tok = load_model("smollm2-135m")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"shipped SmolLM2 not available: {e}")
    ids = tok("The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
              return_tensors="pt")["input_ids"]
    ours = SoftPrompt.from_text(model, tok, "Continue the text:", 6)
    assert ours.embeddings.shape == (6, 576)

    # ours -> PEFT: identical embeddings and identical logits for the real tokens
    save_prompt(tmp_path / "ours", ours, model=model, metadata={"model": "smollm2-135m"})
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "ours"))
    assert torch.equal(pm.get_prompt_embedding_to_save("default").float(), ours.embeddings)
    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits
        our_logits, n = ours.logits(model, ids, shared_prefix=False)
        shared_logits, n_shared = ours.logits(model, ids)
    assert n == 6 and peft_logits.shape == our_logits.shape
    torch.testing.assert_close(our_logits[:, n:], peft_logits[:, n:], atol=1e-4, rtol=1e-4)
    assert n_shared == 0  # the shared-prefix path gives PEFT's logits for the text too
    torch.testing.assert_close(shared_logits, peft_logits[:, n:], atol=1e-4, rtol=1e-4)
    assert perplexity(model, ids, prompt=ours).loss == pytest.approx(
        float(F.cross_entropy(peft_logits[0, n:-1], ids[0, 1:])), rel=1e-4)

    # PEFT -> ours
    torch.manual_seed(0)
    theirs = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                                prompt_tuning_init="SAMPLE_VOCAB"))
    want = theirs.get_prompt_embedding_to_save("default").detach().float()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded, meta = load_prompt(tmp_path / "theirs")
    assert torch.equal(loaded.embeddings, want) and meta["adapter_config"]["token_dim"] == 576
