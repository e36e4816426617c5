"""Data parallelism over torch.distributed: one process per rank, launched by `torchrun`.

    torchrun --nproc_per_node 2 -m ctp_fast tune --model runs/gptq4 --out runs/prompt

Every rank holds the frozen model and a copy of the prompt; each global micro-batch of windows is cut
into contiguous shards, one per rank (`shard`), and the prompt's gradients are summed across ranks
(`all_reduce_sum`). Evaluation splits its batches across ranks and sums exact totals. Only rank 0
(`is_main`) writes files.

Backend by device: NCCL for CUDA, gloo for CPU. Every collective has a bounded timeout (`--dist-timeout`,
else the environment variable CTP_DIST_TIMEOUT, in seconds, default 300): a rank that dies or stops
answering makes the others fail with `DistributedError` instead of waiting forever.

Without an initialised process group (a plain `python -m ctp_fast ...` run) every helper is the
single-process identity: rank 0 of 1, `shard` returns the whole batch, reductions return their input.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT_ENV = "CTP_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


def launched() -> bool:
    """True when this process was started by torchrun (or an equivalent launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds(value: float | str | None = None) -> float:
    """The collective timeout: `value`, else $CTP_DIST_TIMEOUT, else 300 s."""
    name = "timeout (--dist-timeout)" if value is not None else f"${TIMEOUT_ENV}"
    raw = value if value is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise ValueError(f"{name}: expected a positive number of seconds, got {raw!r}")
    return t


def init(device: str | torch.device = "cpu", timeout: float | None = None) -> torch.device:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...)
    with NCCL for a CUDA `device` and gloo otherwise; returns this rank's device (cuda:LOCAL_RANK for
    CUDA). A no-op returning `device` when not launched with several ranks or already initialised."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not launched() or is_initialized():
        return device
    seconds = timeout_seconds(timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds),
                                **({"device_id": device} if device.type == "cuda" else {}))
    except Exception as e:  # the store or a peer did not come up in time
        raise DistributedError(f"rank {os.environ.get('RANK')}: could not join the process group "
                               f"({backend}, timeout {seconds:g} s, ${TIMEOUT_ENV}): {e}") from e
    if is_main():
        log.info("%d ranks (%s, rank 0 on %s), collective timeout %g s", world_size(), backend, device, seconds)
    return device


def close() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # gloo raises RuntimeError, NCCL DistBackendError, both with backend detail
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed: another rank died or did not answer within the "
            f"timeout (--dist-timeout / ${TIMEOUT_ENV}); the job cannot continue. Cause: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def _run_on_backend_device(fn, t: torch.Tensor, what: str, **kwargs) -> torch.Tensor:
    """fn(t) in place; NCCL only takes CUDA tensors, so a CPU tensor goes through this rank's GPU."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        _collective(what, fn, on_gpu, **kwargs)
        t.copy_(on_gpu)
    else:
        _collective(what, fn, t, **kwargs)
    return t


def all_reduce_sum(t: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Sums `t` over ranks in place (and returns it); the identity with one rank."""
    if world_size() > 1:
        _run_on_backend_device(dist.all_reduce, t, what, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
    """Rank 0's `t` on every rank, in place (and returned)."""
    if world_size() > 1:
        _run_on_backend_device(dist.broadcast, t, what, src=0)
    return t


def broadcast_object(obj, what: str = "broadcast"):
    """Rank 0's picklable `obj` on every rank (what the other ranks pass is ignored)."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    _collective(what, dist.broadcast_object_list, box, src=0)
    return box[0]


def barrier(what: str = "barrier") -> None:
    if world_size() > 1:
        _collective(what, dist.barrier)


def shard_bounds(n: int, ranks: int | None = None, r: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous share of n items: sizes differ by at most one, the first
    n % ranks ranks taking one more (as torch.tensor_split)."""
    ranks = world_size() if ranks is None else ranks
    r = rank() if r is None else r
    base, extra = divmod(n, ranks)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def check_batch(n: int, name: str = "batch_size") -> None:
    """Every rank must get at least one window of a global batch of n (`name`: the setting to raise)."""
    if n < world_size():
        raise ValueError(f"{name}: the global batch of {n} windows cannot be split over {world_size()} ranks; "
                         f"use at least {world_size()} (one window per rank)")


def shard(batch: torch.Tensor, name: str = "batch_size") -> torch.Tensor:
    """This rank's contiguous rows of a global batch (see `check_batch` and `shard_bounds`)."""
    check_batch(len(batch), name)
    start, stop = shard_bounds(len(batch))
    return batch[start:stop]


def setup_logging(level: int) -> None:
    """Rank 0 logs at `level`; other ranks at WARNING, prefixed with their rank."""
    root = logging.getLogger()
    if not is_main():
        root.setLevel(logging.WARNING)
        for h in root.handlers:
            h.setFormatter(logging.Formatter(f"[rank {rank()}] %(asctime)s %(name)s: %(message)s"))
        try:  # transformers' own progress bars (loading weights)
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    else:
        root.setLevel(level)
