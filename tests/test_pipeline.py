"""Whole-model compression on tiny random models of each supported family, compressed checkpoints
(save, from_pretrained reload, truncated / foreign files), resume after an interruption, and the
evaluation protocol's window cutting."""
from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ctp_fast  # noqa: E402,F401  (registers the transformers quantizer)
from ctp_fast import CompressedLinear  # noqa: E402
from ctp_fast.nn import dequantized_copy  # noqa: E402
from ctp_fast.checkpoint import check_checkpoint, load_compressed, save_compressed  # noqa: E402
from ctp_fast.compress import pipeline  # noqa: E402
from ctp_fast.compress.pipeline import Recipe, compress, decoder_layers  # noqa: E402
from ctp_fast.data import token_windows  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_decoder(config_cls, model_cls, seed=0, **extra):
    """A random 2-layer Llama-shaped model (GQA 4:2) of a transformers family."""
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return model_cls(cfg).eval()


def tiny_llama(seed=0):
    return tiny_decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    return transformers.OPTForCausalLM(cfg).eval()


CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("recipe", [
    Recipe(method="rtn", bits=4, group_size=32),
    Recipe(method="gptq", bits=4, group_size=32, act_order=True),
    Recipe(method="gptq", bits=3, group_size=-1, symmetric=False, true_sequential=False),
    Recipe(method="sparsegpt", bits=4, group_size=32, sparsity=0.5),
    Recipe(method="sparsegpt", bits=4, group_size=32, sparsity="2:4"),
    Recipe(method="wanda+gptq", bits=4, group_size=32, sparsity="2:4"),
    Recipe(method="magnitude", bits=4, group_size=32, sparsity="4:8"),
], ids=lambda r: r.describe())
def test_llama_compresses_to_packed_modules_and_matches_dequantized(recipe):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(IDS).logits
    report = compress(model, recipe, CALIB if recipe.needs_calibration else None, batch_size=4, progress=False)
    linears = [m for m in decoder_layers(model).modules() if isinstance(m, CompressedLinear)]
    assert len(linears) == 2 * 7 and report.layers == 14
    assert not isinstance(model.lm_head, CompressedLinear)  # skipped by default
    assert report.bytes_compressed < report.bytes_dense / 3
    with torch.no_grad():
        out = model(IDS).logits
        dense = dequantized_copy(model)(IDS).logits
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)  # kernels compute what the weights say
    assert (out - ref).abs().mean() < ref.abs().mean()  # compressed, not destroyed
    if recipe.sparsity == "2:4":
        w = linears[0].weight_format.unpack()
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_gptq_beats_rtn_on_the_model_output():
    errs = {}
    model = tiny_llama()
    with torch.no_grad():
        ref = model(CALIB).logits
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        compress(m, Recipe(method=method, bits=3, group_size=32), CALIB, progress=False)
        with torch.no_grad():
            errs[method] = (m(CALIB).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_prune_only_recipe_keeps_dense_linears_with_exact_sparsity():
    model = tiny_llama()
    compress(model, Recipe(method="sparsegpt", bits=None, sparsity=0.5), CALIB, progress=False)
    lin = decoder_layers(model)[0].mlp.up_proj
    assert isinstance(lin, torch.nn.Linear) and not isinstance(lin, CompressedLinear)
    assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_stage_calibration_has_the_full_pass_statistics(monkeypatch, true_sequential):
    """A stage's calibration pass stops early, yet its statistics are those of a full pass of the block
    as it stands (earlier stages already compressed); the linears of a q/k/v-like stage share one."""
    from ctp_fast.compress.layer import HessianAccumulator

    calibrate, checked = pipeline._calibrate, []

    def checking(block, stage, linears, inputs, shared, device):
        stats = calibrate(block, stage, linears, inputs, shared, device)
        full = {n: HessianAccumulator(linears[n].in_features) for n in stage}
        hooks = [block.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: full[n].add(args[0].float())) for n in stage]
        pipeline._run_block(block, inputs)
        for h in hooks:
            h.remove()
        for n in stage:
            torch.testing.assert_close(stats[n].hessian(), full[n].hessian(), rtol=0, atol=0)
        checked.append((stage, len({id(stats[n]) for n in stage})))
        return stats

    monkeypatch.setattr(pipeline, "_calibrate", checking)
    compress(tiny_llama(), Recipe(method="gptq", bits=4, group_size=32, true_sequential=true_sequential), CALIB,
             batch_size=4, progress=False)
    if true_sequential:
        assert checked[:4] == [(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], 1),
                               (["self_attn.o_proj"], 1), (["mlp.gate_proj", "mlp.up_proj"], 1), (["mlp.down_proj"], 1)]
    else:
        assert len(checked) == 2 and checked[0][1] == 7


def test_true_sequential_stages_run_the_block_only_up_to_their_linears():
    model = tiny_llama()
    calls = {}
    for name, mod in decoder_layers(model)[0].named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    compress(model, Recipe(method="gptq", bits=4, group_size=32), CALIB, batch_size=4, progress=False)
    batches = len(CALIB) // 4
    # the dense o_proj and down_proj see one probe batch (grouping the stages) and their own stage's
    # pass: the q/k/v stage stops at q_proj's input, o's stage at o_proj's (then both are compressed)
    assert calls["self_attn.o_proj"] == calls["mlp.down_proj"] == 1 + batches


def tiny_qwen2(seed=0):
    return tiny_decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, seed)


def tiny_qwen3(seed=0):
    return tiny_decoder(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, seed, head_dim=16)


def tiny_mistral(seed=0):
    return tiny_decoder(transformers.MistralConfig, transformers.MistralForCausalLM, seed)


def tiny_gemma3(seed=0):
    return tiny_decoder(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, seed, head_dim=16,
                        sliding_window=16)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_opt, tiny_qwen2, tiny_qwen3, tiny_mistral, tiny_gemma3],
                         ids=["gpt2", "opt", "qwen2", "qwen3", "mistral", "gemma3"])
def test_other_families(make):
    model = make()
    compress(model, Recipe(method="gptq", bits=4, group_size=32), CALIB, batch_size=4, progress=False)
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) >= 8
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, dequantized_copy(model)(IDS).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="unsupported architecture"):
        compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), Recipe(method="rtn"), None, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(method="gptq", sparsity=0.5), "does not prune"),
    (dict(method="wanda"), "prunes"),
    (dict(method="gptq", bits=None), "quantizes"),
    (dict(method="sparsegpt", bits=8, sparsity="2:4"), "4-bit codes"),
    (dict(method="foo"), "method"),
    (dict(method="gptq", group_size=100), "group_size"),
    (dict(method="sparsegpt", bits=4, group_size=0, sparsity=0.5), "group_size"),
])
def test_bad_recipes(kw, match):
    with pytest.raises(ValueError, match=match):
        Recipe(**kw)


def test_calibration_required():
    with pytest.raises(ValueError, match="calibration"):
        compress(tiny_llama(), Recipe(method="gptq"), None, progress=False)


def test_save_reload_with_from_pretrained(tmp_path):
    model = tiny_llama()
    compress(model, Recipe(method="sparsegpt", bits=4, group_size=32, sparsity=0.5), CALIB, progress=False)
    save_compressed(model, tmp_path / "ck")
    qcfg = check_checkpoint(tmp_path / "ck")
    assert qcfg["quant_method"] == "ctp_fast" and len(qcfg["modules"]) == 14
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert isinstance(decoder_layers(loaded)[1].self_attn.q_proj, CompressedLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    st = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert st < sum(p.numel() * 4 for p in tiny_llama().parameters())  # smaller on disk than fp32


def test_truncated_and_foreign_checkpoints_fail_clearly(tmp_path):
    model = tiny_llama()
    compress(model, Recipe(method="rtn", bits=4, group_size=32), None, progress=False)
    save_compressed(model, tmp_path / "ck")
    data = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|corrupted|unreadable"):
        load_compressed(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a ctp_fast compressed checkpoint"):
        check_checkpoint(tmp_path / "ck")
    with pytest.raises(FileNotFoundError):
        check_checkpoint(tmp_path / "missing")


def test_save_refuses_an_uncompressed_model(tmp_path):
    with pytest.raises(ValueError, match="no CompressedLinear"):
        save_compressed(tiny_llama(), tmp_path / "x")


def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch):
    recipe = Recipe(method="gptq", bits=4, group_size=32)
    straight = tiny_llama()
    compress(straight, recipe, CALIB, progress=False)

    interrupted = tiny_llama()
    real = pipeline._save_resume
    calls = []

    def crash_after_first_block(block, i, *args):
        real(block, i, *args)
        calls.append(i)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_save_resume", crash_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        compress(interrupted, recipe, CALIB, resume_dir=tmp_path / "r", progress=False)
    monkeypatch.setattr(pipeline, "_save_resume", real)
    resumed = tiny_llama()
    compress(resumed, recipe, CALIB, resume_dir=tmp_path / "r", progress=False)
    assert calls == [0]
    for (ka, a), (kb, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb
        if not isinstance(a, torch.Tensor):
            continue
        assert torch.equal(a, b), ka  # deterministic: the resumed run equals the uninterrupted one
    with pytest.raises(ValueError, match="another recipe"):
        compress(tiny_llama(), Recipe(method="rtn"), None, resume_dir=tmp_path / "r", progress=False)


class _Tok:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 120 + 2 for c in text]}


def test_token_windows_are_non_overlapping_and_drop_the_remainder():
    docs = ["abcdefghij", "klmnop"]  # 10 + 2 + 6 + 2 = 20 tokens with the blank-line separators
    w = token_windows(_Tok(), docs, 6)
    assert w.shape == (3, 6)
    flat = [t for d in docs for t in _Tok()(d + "\n\n")["input_ids"]]
    assert w.flatten().tolist() == flat[:18]
    wb = token_windows(_Tok(), docs, 6, bos=True)
    assert (wb[:, 0] == 1).all() and wb[:, 1:].flatten().tolist() == flat[:20]
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(_Tok(), ["ab"], 64)


def test_compressed_tensors_export_round_trips(tmp_path):
    from safetensors.torch import load_file

    from ctp_fast.export import export_compressed_tensors, unpack_int32

    model = tiny_llama()
    compress(model, Recipe(method="gptq", bits=4, group_size=32, act_order=True), CALIB, progress=False)
    export_compressed_tensors(model, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert "lm_head" in cfg["ignore"]
    st = load_file(str(tmp_path / "ct" / "model.safetensors"))
    mod = decoder_layers(model)[0].mlp.down_proj
    name = "model.layers.0.mlp.down_proj"
    n, k = st[f"{name}.weight_shape"].tolist()
    codes = unpack_int32(st[f"{name}.weight_packed"], k).float()
    g_idx = st[f"{name}.weight_g_idx"].long()
    w = (codes - 8) * st[f"{name}.weight_scale"].float()[:, g_idx]  # compressed-tensors' meaning
    torch.testing.assert_close(w, mod.weight_format.unpack(), rtol=0, atol=0)
    assert st[f"{name}.weight_packed"].dtype == torch.int32 and st[f"{name}.weight_packed"].shape == (n, k // 8)
    asym = tiny_llama()
    compress(asym, Recipe(method="rtn", bits=4, group_size=32, symmetric=False), None, progress=False)
    with pytest.raises(ValueError, match="asymmetric"):
        export_compressed_tensors(asym, tmp_path / "x")


def test_calibration_text_needs_and_uses_a_tokenizer():
    model = tiny_llama()
    with pytest.raises(ValueError, match="tokenizer"):
        ctp_fast.compress_model(model, Recipe(method="gptq", group_size=32), ["some text"])
    docs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(200)) for i in range(4)]
    report = ctp_fast.compress_model(model, Recipe(method="gptq", group_size=32), docs, tokenizer=_Tok(), seqlen=16,
                                     n_windows=8, progress=False)
    assert report.calibration_windows == 8 and report.layers == 14


def _mapped_files(t: torch.Tensor) -> set[str]:
    """The files whose memory mapping holds `t`'s data (Linux /proc/self/maps)."""
    addr, found = t.data_ptr(), set()
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi and len(parts) > 5:
            found.add(parts[5])
    return found


def test_block_by_block_on_a_device_with_the_model_memory_mapped(tmp_path):
    """compress(device=...) moves one block at a time to the device and back; the rest of the model stays
    where it was loaded (here: memory-mapped from its safetensors file, on disk until read); the result
    equals the plain run. (On CPU the moves are no-ops: the hooks check their order.)"""
    tiny_llama().save_pretrained(tmp_path / "dense")
    recipe = Recipe(method="gptq", bits=4, group_size=32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    compress(plain, recipe, CALIB, progress=False)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    layers = decoder_layers(model)
    st = str((tmp_path / "dense" / "model.safetensors").resolve())
    assert st in _mapped_files(layers[1].mlp.up_proj.weight)  # on disk, not copied into memory
    events = []
    for i, block in enumerate(layers):
        block.register_forward_hook(lambda m, a, out, i=i: events.append(("run", i)))  # ran to the end
        real_to = block.to
        block.to = lambda *a, i=i, real_to=real_to, **k: (events.append(("to", i, str(a[0]))), real_to(*a, **k))[1]
    compress(model, recipe, CALIB, progress=False, device="cpu")
    # block i moves in, runs, moves back, before block i + 1 moves: one block on the device at a time
    moves = [e for e in events if e[0] == "to"]
    assert moves == [("to", 0, "cpu"), ("to", 0, "cpu"), ("to", 1, "cpu"), ("to", 1, "cpu")]
    resident = None
    for e in events:
        if e[0] == "to":
            resident = e[1] if resident is None else None
        else:
            assert e[1] == resident, events
    # untouched parts of the model are still the file mapping; the result is the plain run's
    assert st in _mapped_files(model.lm_head.weight)
    for (ka, a), (kb, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    with pytest.raises(ValueError, match="device: expected a torch device"):
        compress(tiny_llama(), recipe, CALIB, progress=False, device="gpu0")
