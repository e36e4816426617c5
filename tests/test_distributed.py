"""Data parallelism over torch.distributed (gloo, 2 processes on this machine, 1 thread each): 2 ranks
give the 1-rank prompt and the 1-rank evaluation totals, only rank 0 writes, a run resumes on another
number of ranks, and a dead or stalled rank makes the job fail with a clear error within the timeout.

The ranks run tests/dist_worker.py with torchrun's environment variables; the 1-rank references run
in this process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ctp_fast
from ctp_fast import cli, distributed
from ctp_fast.eval import cloze_accuracy, perplexity
from ctp_fast.prompt import SoftPrompt, TuneConfig, tune

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import cloze_set, tiny_llama, windows  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"
SOURCE = str(Path(ctp_fast.__file__).resolve().parent.parent)  # the workers import this ctp_fast
# batch 3 over 2 ranks: shards of 2 and 1 windows (different scored-token counts); 2 micro-batches per step
CONFIG = dict(n_tokens=3, steps=4, eval_every=2, save_every=2, batch_size=3, grad_accum=2, lr=0.05, warmup_steps=1,
              seed=3)
TRAIN = (10, 12)  # windows, seqlen: epochs end mid-batch


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, spec: dict, ranks: int = 2, timeout_s: float = 60) -> list[subprocess.Popen]:
    """Starts `ranks` worker processes as torchrun would (stdout/stderr to files in tmp_path)."""
    spec = {"out": str(tmp_path), **spec}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: str(timeout_s),
               "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "spec.json")], env=env,
                                      stdout=open(tmp_path / f"out{r}.txt", "w"), stderr=open(tmp_path / f"err{r}.txt", "w")))
    return procs


def wait_all(procs, tmp_path: Path, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"err{r}.txt").read_text()[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(len(procs))]


def test_helpers_without_a_process_group():
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    batch = torch.arange(5)
    assert distributed.shard(batch) is not None and torch.equal(distributed.shard(batch), batch)
    assert [distributed.shard_bounds(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [distributed.shard_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [distributed.shard_bounds(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]
    assert distributed.init("cpu") == torch.device("cpu") and not distributed.is_initialized()  # not launched
    with pytest.raises(ValueError, match="device: expected a torch device"):
        distributed.init("gpu")


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5
    assert distributed.timeout_seconds(3) == 3.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_seconds()
    with pytest.raises(ValueError, match=r"timeout \(--dist-timeout\): expected a positive number"):
        distributed.timeout_seconds(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks tune (CONFIG) and then evaluate a fixed prompt, started now and collected when a test asks."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    torch.save(SoftPrompt.random(3, 32, std=0.3, seed=1).embeddings.detach(), tmp / "prompt.pt")
    procs = launch(tmp, {"jobs": ["tune", "eval"], "config": CONFIG, "train": TRAIN, "run_dir": str(tmp / "run2"),
                         "prompt": str(tmp / "prompt.pt")})
    done = {}

    def results():
        if not done:
            done["ranks"] = wait_all(procs, tmp)
        return tmp, done["ranks"]
    yield results
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_ranks_tune_like_one_and_only_rank0_writes(two_ranks, tmp_path):
    train, val, test = windows(*TRAIN, seed=1), windows(4, 12, seed=2), windows(5, 12, seed=3)
    one = tune(tiny_llama(), train, val, TuneConfig(**CONFIG), out_dir=tmp_path / "run1", test_windows=test,
               progress=False)
    tmp, ranks = two_ranks()
    for r in ranks:  # every rank ends with the 1-rank prompt (and so with each other's)
        torch.testing.assert_close(r["prompt"], one.prompt.embeddings, rtol=1e-4, atol=1e-5)
        assert [h["loss"] for h in r["history"]["train"]] == pytest.approx(
            [h["loss"] for h in one.history["train"]], rel=1e-5)
        assert [h["loss"] for h in r["history"]["val"]] == pytest.approx(
            [h["loss"] for h in one.history["val"]], rel=1e-5)
        assert r["best_step"] == one.best_step and r["test_tokens"] == one.test_tokens
    assert torch.equal(ranks[0]["prompt"], ranks[1]["prompt"])
    # only rank 0 wrote, and it wrote what a 1-rank run writes
    writes = [json.loads((tmp / f"writes{r}.json").read_text()) for r in range(2)]
    assert writes[1] == [] and any(w.endswith("state.pt") for w in writes[0])
    assert sorted(p.name for p in (tmp / "run2").iterdir()) == sorted(p.name for p in (tmp_path / "run1").iterdir())
    state = torch.load(tmp / "run2" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["pos"] == CONFIG["steps"] * CONFIG["batch_size"] * CONFIG["grad_accum"]


def test_two_ranks_evaluate_like_one(two_ranks):
    model = tiny_llama()
    prompt = SoftPrompt.random(3, 32, std=0.3, seed=1)
    nll = perplexity(model, windows(7, 12, seed=4), batch_size=2, prompt=prompt)  # 4 batches, the last of 1
    acc = cloze_accuracy(model, cloze_set(model, prompt), prompt=prompt)
    assert 0 < acc < 1
    for r in two_ranks()[1]:
        assert r["tokens"] == nll.tokens == 7 * 11  # exact counts
        assert r["total"] == nll.total  # per-batch sums added in the same order: the same float
        assert r["cloze"] == acc


class _Crash(Exception):
    pass


def _crash_at(at: int):
    def callback(step, record):
        if step == at:
            raise _Crash
    return callback


def test_resume_on_another_number_of_ranks(tmp_path):
    """1 rank checkpoints at step 2 -> 2 ranks resume, checkpoint at step 4 -> 1 rank finishes at step 6:
    the prompt of the uninterrupted 1-rank run (the checkpoint holds the global data position)."""
    train, val, test = windows(*TRAIN, seed=1), windows(4, 12, seed=2), windows(5, 12, seed=3)
    config = dict(CONFIG, steps=6)
    cfg, run = TuneConfig(**config), tmp_path / "run"
    straight = tune(tiny_llama(), train, val, cfg, out_dir=tmp_path / "straight", test_windows=test, progress=False)
    with pytest.raises(_Crash):
        tune(tiny_llama(), train, val, cfg, out_dir=run, test_windows=test, progress=False, callback=_crash_at(3))
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2
    wait_all(launch(tmp_path, {"jobs": ["tune"], "config": config, "train": TRAIN, "run_dir": str(run), "resume": True,
                               "crash_at": 5}), tmp_path)
    saved = torch.load(run / "state.pt", weights_only=True)
    assert saved["step"] == 4 and saved["world_size"] == 2 and saved["pos"] == 4 * 3 * 2
    resumed = tune(tiny_llama(), train, val, cfg, out_dir=run, resume=True, test_windows=test, progress=False)
    assert [h["step"] for h in resumed.history["train"]] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in resumed.history["val"]] == [0, 2, 4, 6]
    final = {k: torch.load(d / "state.pt", weights_only=True) for k, d in (("a", tmp_path / "straight"), ("b", run))}
    assert final["b"]["world_size"] == 1 and final["a"]["pos"] == final["b"]["pos"]
    torch.testing.assert_close(final["b"]["prompt"], final["a"]["prompt"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed.prompt.embeddings, straight.prompt.embeddings, rtol=1e-4, atol=1e-5)
    assert resumed.best_step == straight.best_step


def _until_stalled(tmp_path: Path, procs, rank: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (tmp_path / f"stalled.{rank}").exists():
        assert all(p.poll() is None for p in procs), "a rank exited early: " + (tmp_path / "err0.txt").read_text()[-2000:]
        assert time.monotonic() < deadline, "the ranks did not reach the stall step"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_stalled_rank_fails_the_job_within_the_timeout(tmp_path, how):
    """Rank 1 is killed (SIGKILL: its sockets close) or stopped (SIGSTOP: it never answers); rank 0
    must exit non-zero with the DistributedError message within the 4 s collective timeout (+ slack)."""
    timeout_s = 4.0
    cfg = dict(CONFIG, steps=100_000, eval_every=100_000, save_every=100_000)
    procs = launch(tmp_path, {"jobs": ["tune"], "config": cfg, "train": TRAIN, "stall_at": 2}, timeout_s=timeout_s)
    try:
        _until_stalled(tmp_path, procs, 1)
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=timeout_s + 30)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = (tmp_path / "err0.txt").read_text()
    assert rc != 0
    assert "DistributedError: rank 0 of 2: all_reduce" in err and "another rank died or did not answer" in err, err[-3000:]
    assert took < timeout_s + 25, took
    if how == "stopped":  # no socket error: only the timeout can end the wait
        assert took >= timeout_s * 0.5, took


def test_batch_smaller_than_the_ranks_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ValueError, match=r"batch_size: the global batch of 3 windows cannot be split over 4 ranks"):
        distributed.shard(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"batch_size: the global batch of 2 windows cannot be split over 4 ranks"):
        tune(tiny_llama(), windows(4, 8), None, TuneConfig(batch_size=2, steps=1), progress=False)


SMOL = Path(os.environ.get("CTP_FAST_CACHE", Path.home() / ".cache" / "ctp_fast")) / "smollm2-135m"


@pytest.mark.skipif(not (SMOL / "tokenizer.json").exists(), reason="the SmolLM2 tokenizer is not in the cache")
def test_cli_under_torchrun(tmp_path, capsys):
    """`torchrun -m ctp_fast tune / eval` end to end (a tiny model with SmolLM2's tokenizer, a text-file
    corpus): rank 0 alone prints and writes, and 2-rank evaluation prints the 1-rank table."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(SMOL)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = "the a cat dog sat on mat and ran far away while birds sang".split()
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g)) for _ in range(30)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")])}

    def ctp(*argv):  # 2 ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ctp_fast", "--dist-timeout", "60", *argv]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    data = ["--model", str(tmp_path / "model"), "--seqlen", "16"]
    out = ctp("tune", *data, "--corpus", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "run"),
              "--steps", "2", "--batch-size", "3", "--val-windows", "2", "--eval-every", "1", "--n-tokens", "2")
    assert out.count("best val ppl") == 1  # rank 0 only
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").exists()
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["world_size"] == 2
    ev = ["eval", *data, "--corpora", str(tmp_path / "corpus.txt"), "--windows", "5", "--batch-size", "2",
          "--prompt", str(tmp_path / "run" / "best")]
    two = ctp(*ev)
    assert cli.main(ev) == 0  # one process, in this one
    one = capsys.readouterr().out
    assert two == one and len(one.splitlines()) == 2, (one, two)
