"""lm-evaluation-harness end to end on the shipped SmolLM2-135M, offline: a local last-word task built from
held-out Wikipedia lead sections (context = a passage up to its last word, continuation = " word"; acc = the
word is the greedy continuation, plus its log-likelihood), run through the `ctp` model for dense,
compressed (int4 RTN per channel) and compressed + a soft prompt (a saved one, or a few tuning steps here).

    python benchmarks/lm_eval_local.py [--examples 40 --prompt runs/bridge_transfer/source_prompt]

Writes benchmarks/results/lm_eval_local.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ctp_fast

import torch  # noqa: E402

from ctp_fast.compress.pipeline import Recipe, compress  # noqa: E402
from ctp_fast.data import corpus_split, load_model, token_windows  # noqa: E402
from ctp_fast.fileio import write_json, write_text  # noqa: E402
from ctp_fast.prompt import TuneConfig, load_prompt, tune  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
TASK = """task: ctp_wiki_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{word}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: perplexity
"""


def main(argv=None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ctp_fast.eval.cloze import cloze_examples
    from ctp_fast.eval.lm_eval_adapter import CTPLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--prompt", default=None, help="a saved prompt for the compressed model (else tune one)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense, tok = load_model(args.model)
    comp = copy.deepcopy(dense)
    compress(comp, Recipe(method="rtn", bits=4, group_size=-1))
    if args.prompt:
        prompt = load_prompt(args.prompt)[0]
    else:
        win = lambda split, n: token_windows(tok, corpus_split("wiki", split), 128, n)  # noqa: E731
        prompt = tune(comp, win("train", args.steps * 2), win("val", 4),
                      TuneConfig(n_tokens=16, steps=args.steps, batch_size=2, eval_every=args.steps)).prompt
    # the same passages as ctp_fast's own cloze evaluation (held-out wiki test split)
    examples = cloze_examples(tok, corpus_split("wiki", "test"), n=args.examples)
    docs = [{"context": tok.decode(e.context), "word": e.word} for e in examples]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (Path(tmp) / "task.yaml").write_text(TASK.format(data=Path(tmp) / "data.jsonl"))
        tm = TaskManager(include_path=tmp)
        for name, (model, p) in {"dense": (dense, None), "int4 RTN per-channel": (comp, None),
                                 "int4 RTN per-channel + prompt": (comp, prompt)}.items():
            out = lm_eval.simple_evaluate(model=CTPLM(model=model, tokenizer=tok, prompt=p, batch_size=4),
                                          tasks=["ctp_wiki_lastword"], task_manager=tm, log_samples=False)
            r = out["results"]["ctp_wiki_lastword"]
            results[name] = {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"),
                             "perplexity": r["perplexity,none"]}
            print(name, results[name], flush=True)
    report = {"model": args.model, "examples": len(docs), "prompt": args.prompt or f"tuned here ({args.steps} steps)",
              "lm_eval_version": lm_eval.__version__, "results": results}
    lines = [f"# lm-evaluation-harness on {args.model}: local last-word task ({len(docs)} wiki test passages)", "",
             f"lm-eval {lm_eval.__version__}, model `ctp` (ctp_fast.eval.lm_eval_adapter); prompt: {report['prompt']}.",
             "", "| model | acc | perplexity (of the last word) |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['acc']:.3f} | {v['perplexity']:.2f} |" for k, v in results.items()]
    write_json(OUT / "lm_eval_local.json", report)
    write_text(OUT / "lm_eval_local.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
