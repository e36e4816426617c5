"""One rank of the 2-process tests in test_distributed.py (started with torchrun's environment variables:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    python tests/dist_worker.py SPEC.json

SPEC: {"jobs": ["tune", "eval"] (either or both, in order), "prompt": the prompt file evaluation uses, "out": folder for this worker's own results, "run_dir": tune's out_dir,
"config": TuneConfig fields, "crash_at": step after which every rank raises, "stall_at": step after which
this worker writes `stalled.<rank>` and then keeps training (the test kills or stops it)}.
Writes out/rank<r>.pt (the result) and out/writes<r>.json (every path this rank wrote through atomic_path).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from ctp_fast import distributed, fileio  # noqa: E402
from ctp_fast.eval import cloze_accuracy, perplexity  # noqa: E402
from ctp_fast.prompt import SoftPrompt, TuneConfig, tune  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import cloze_set, tiny_llama, windows  # noqa: E402


class Crash(Exception):
    pass


def run_job(job: str, spec: dict, model, out: Path, rank: int) -> dict:
    if job == "tune":
        def callback(step, record):
            if step == spec.get("stall_at"):
                (out / f"stalled.{rank}").write_text("")
            if step == spec.get("crash_at"):
                raise Crash(f"crash after step {step}")

        train, val, test = windows(*spec["train"], seed=1), windows(4, 12, seed=2), windows(5, 12, seed=3)
        res = tune(model, train, val, TuneConfig(**spec["config"]), out_dir=spec.get("run_dir"),
                   resume=spec.get("resume", False), test_windows=test, progress=False, callback=callback)
        return {"prompt": res.prompt.embeddings, "history": res.history, "best_step": res.best_step,
                "test_loss": res.test_loss, "test_tokens": res.test_tokens}
    prompt = SoftPrompt(torch.load(spec["prompt"], weights_only=True))
    nll = perplexity(model, windows(7, 12, seed=4), batch_size=2, prompt=prompt)
    return {"total": nll.total, "tokens": nll.tokens, "cloze": cloze_accuracy(model, cloze_set(model, prompt), prompt=prompt)}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    distributed.init("cpu")
    rank = distributed.rank()
    writes = []
    real_atomic = fileio.atomic_path

    def recording_atomic_path(path, *a, **k):
        writes.append(str(path))
        return real_atomic(path, *a, **k)

    for mod in [fileio] + [m for name, m in sys.modules.items() if name.startswith("ctp_fast")]:
        if getattr(mod, "atomic_path", None) is real_atomic:
            mod.atomic_path = recording_atomic_path

    result = {}
    try:
        for job in spec["jobs"]:
            model = tiny_llama()
            result.update(run_job(job, spec, model, out, rank))
    except Crash:
        pass
    (out / f"writes{rank}.json").write_text(json.dumps(writes))
    torch.save(result, out / f"rank{rank}.pt")
    distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
