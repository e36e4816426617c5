"""lm-evaluation-harness adapter: loglikelihoods equal sums computed by hand from the model's logits (with and
without a soft prompt, batched or not), rolling loglikelihood covers every token once, greedy generation stops
at stop strings, and `lm_eval.simple_evaluate` runs end to end on a local YAML task over a local jsonl file
(no hub). Skipped when lm-eval is not installed."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from ctp_fast.eval.lm_eval_adapter import CTPLM  # noqa: E402
from ctp_fast.prompt import SoftPrompt  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "to", "house", "red", "blue", "big", "small", "."]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def lm_parts():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                                         max_position_embeddings=128, initializer_range=0.2,
                                         bos_token_id=1, eos_token_id=2)).eval()
    prompt = SoftPrompt(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
    return model, tok, prompt


def by_hand(model, prompt, ids: list[int], n_ctx: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= n_ctx, from one plain forward of [prompt embeddings; tokens]."""
    x = torch.tensor([ids])
    emb = model.get_input_embeddings()(x)
    n = 0
    if prompt is not None:
        n = prompt.n_tokens
        emb = torch.cat([prompt.embeddings.detach()[None], emb], 1)
    with torch.no_grad():
        logp = F.log_softmax(model(inputs_embeds=emb, use_cache=False).logits[0].double(), -1)
    return sum(float(logp[n + t - 1, ids[t]]) for t in range(n_ctx, len(ids)))


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


PAIRS = [("the cat sat on the", " mat"), ("a dog ran to the", " red house"), ("the", " big blue cat sat .")]


def mc_task_yaml(name: str, data) -> str:
    """An lm-eval multiple-choice task (accuracy) over a local JSON-lines file of {context, choices, label}."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_hand_sums(lm_parts, with_prompt, batch_size):
    model, tok, prompt = lm_parts
    p = prompt if with_prompt else None
    lm = CTPLM(model=model, tokenizer=tok, prompt=p, batch_size=batch_size)
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in PAIRS], disable_tqdm=True)
    for (ctx, cont), (lp, _) in zip(PAIRS, got):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        w = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        assert math.isclose(lp, by_hand(model, p, w, len(c)), rel_tol=1e-4, abs_tol=1e-4)
    # the prompt changes the scores (so the check above is not vacuous)
    if with_prompt:
        plain = CTPLM(model=model, tokenizer=tok).loglikelihood([req("loglikelihood", *PAIRS[0])], disable_tqdm=True)
        assert abs(plain[0][0] - got[0][0]) > 1e-3


def test_is_greedy_flag(lm_parts):
    model, tok, _ = lm_parts
    lm = CTPLM(model=model, tokenizer=tok)
    ctx = "the cat sat on"
    ids = tok(ctx, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        best = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    word = tok.convert_ids_to_tokens(best)
    other = next(w for w in WORDS if w != word)
    (_, g1), (_, g2) = lm.loglikelihood([req("loglikelihood", ctx, " " + word), req("loglikelihood", ctx, " " + other)],
                                        disable_tqdm=True)
    assert g1 and not g2


def test_loglikelihood_rolling_scores_every_token_once(lm_parts):
    model, tok, prompt = lm_parts
    text = "the cat sat on the mat . a dog ran to the red house . the big blue cat sat"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for p in (None, prompt):
        lm = CTPLM(model=model, tokenizer=tok, prompt=p, max_length=64)
        (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)], disable_tqdm=True)
        # one window: EOS (the prefix token) then the text; every text token predicted
        assert math.isclose(got, by_hand(model, p, [tok.eos_token_id] + ids, 1), rel_tol=1e-4, abs_tol=1e-4)
        # short windows: same tokens predicted, less context, so a different but finite total
        short = CTPLM(model=model, tokenizer=tok, prompt=p, max_length=5)
        (s,) = short.loglikelihood_rolling([req("loglikelihood_rolling", text)], disable_tqdm=True)
        assert math.isfinite(s) and s != pytest.approx(got, abs=1e-6)


def test_generate_until_is_greedy_and_stops(lm_parts):
    model, tok, prompt = lm_parts
    lm = CTPLM(model=model, tokenizer=tok, prompt=prompt)
    ctx = "the dog"
    ids = tok(ctx, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(6):  # greedy by hand through the prompt
        emb = torch.cat([prompt.embeddings.detach()[None], model.get_input_embeddings()(torch.tensor([ids + new]))], 1)
        with torch.no_grad():
            nxt = int(model(inputs_embeds=emb).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    full = tok.decode(new, skip_special_tokens=True)
    (got,) = lm.generate_until([req("generate_until", ctx, {"until": [], "max_gen_toks": 6})], disable_tqdm=True)
    assert got == full and got
    stop = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    (cut,) = lm.generate_until([req("generate_until", ctx, {"until": [stop], "max_gen_toks": 6})], disable_tqdm=True)
    assert cut == full.split(stop)[0]


def test_bad_arguments(lm_parts):
    model, tok, _ = lm_parts
    with pytest.raises(ValueError, match="pretrained: expected"):
        CTPLM()
    with pytest.raises(ValueError, match="tokenizer: required"):
        CTPLM(model=model)
    with pytest.raises(ValueError, match="prompt: expected a SoftPrompt"):
        CTPLM(model=model, tokenizer=tok, prompt=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="batch_size: expected a positive"):
        CTPLM(model=model, tokenizer=tok, batch_size=0)


def test_simple_evaluate_on_a_local_task(lm_parts, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok, prompt = lm_parts
    docs = [{"context": "the cat sat on the", "choices": ["mat", "house", "dog"], "label": 0},
            {"context": "a dog ran to the", "choices": ["red house", "sat", "."], "label": 0},
            {"context": "the big blue", "choices": ["cat", "on", "to"], "label": 0}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "ctp_tiny_mc.yaml").write_text(mc_task_yaml("ctp_tiny_mc", data))
    (tmp_path / "ctp_tiny_ppl.yaml").write_text(f"""task: ctp_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{context}}}}"
metric_list:
  - metric: word_perplexity
""")
    lm = CTPLM(model=model, tokenizer=tok, prompt=prompt)
    out = lm_eval.simple_evaluate(model=lm, tasks=["ctp_tiny_mc", "ctp_tiny_ppl"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    acc = out["results"]["ctp_tiny_mc"]["acc,none"]
    # the accuracy lm-eval reports is the one our own loglikelihoods give
    expect = 0
    for d in docs:
        ll = lm.loglikelihood([req("loglikelihood", d["context"], " " + c) for c in d["choices"]], disable_tqdm=True)
        expect += int(max(range(3), key=lambda i: ll[i][0]) == d["label"])
    assert acc == pytest.approx(expect / 3)
    wp = out["results"]["ctp_tiny_ppl"]["word_perplexity,none"]
    rolled = lm.loglikelihood_rolling([req("loglikelihood_rolling", d["context"]) for d in docs], disable_tqdm=True)
    words = sum(len(d["context"].split()) for d in docs)
    assert wp == pytest.approx(math.exp(-sum(rolled) / words), rel=1e-6)
    print({k: v for k, v in out["results"].items()})


def test_registered_by_name_with_model_args(lm_parts, tmp_path):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from ctp_fast.prompt import save_prompt

    model, tok, prompt = lm_parts
    assert get_model("ctp") is CTPLM
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    save_prompt(tmp_path / "p", prompt, model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": "the cat sat on the", "choices": ["mat", "dog"], "label": 0}) + "\n")
    (tmp_path / "t.yaml").write_text(mc_task_yaml("ctp_tiny_named", data))
    out = lm_eval.simple_evaluate(model="ctp", model_args=f"pretrained={tmp_path / 'm'},prompt={tmp_path / 'p'}",
                                  tasks=["ctp_tiny_named"], task_manager=TaskManager(include_path=str(tmp_path)))
    lm = CTPLM(model=model, tokenizer=tok, prompt=prompt)
    ll = lm.loglikelihood([req("loglikelihood", "the cat sat on the", " " + c) for c in ("mat", "dog")], disable_tqdm=True)
    assert out["results"]["ctp_tiny_named"]["acc,none"] == float(ll[0][0] > ll[1][0])
    assert out["config"]["model"] == "ctp"
