"""Process-group plumbing for `torchrun`; nothing happens at import.

    with dist.session():      # torchrun's env (WORLD_SIZE > 1): init the group; else a no-op
        dist.rank(), dist.world_size(), dist.is_main()
    # leaving the block: barrier + destroy_process_group (gloo runs abort at exit now and then without)

The stage commands (`caredpo retriever train`, `dpo`, `captioner generate`, `prefs`) open a session,
so `torchrun --nproc_per_node=N caredpo ...` runs them data-parallel with no other change. Without
a group every helper is the identity of a world of one process. Backend: gloo for CPU tensors, plus
nccl for CUDA tensors where CUDA exists ("cpu:gloo,cuda:nccl"); collectives pick by tensor device.
Gradients are all-reduced explicitly after backward (not DDP): the captioner trains through
`.logprob(...)`, not `forward`, and the maths stays visible in the trainers.

    with dist.alone():        # inside: this process is a world of one (rank 0, no collectives)

lets `caredpo run` give independent stages (the two DPO arms, the retrievers) one process each.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch


def _td():
    import torch.distributed as td

    return td


_alone = threading.local()  # set inside `alone()`: this thread acts as a world of one


def is_initialized() -> bool:
    td = _td()
    return td.is_available() and td.is_initialized()


def _grouped() -> bool:
    """In a process group and not inside `alone()`."""
    return is_initialized() and not getattr(_alone, "on", False)


def world_size() -> int:
    return _td().get_world_size() if _grouped() else 1


def rank() -> int:
    return _td().get_rank() if _grouped() else 0


def group_rank() -> int:
    """This process's rank in the torchrun group, inside `alone()` too (who draws progress bars)."""
    return _td().get_rank() if is_initialized() else 0


def deal(items: Sequence) -> list:
    """This process's round-robin share of independent tasks (all of them in a world of one)."""
    return list(items)[rank() :: world_size()]


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process is a world of one: rank 0 of 1, every collective the identity,
    so a stage runs exactly as without torchrun. The group itself stays open."""
    before = getattr(_alone, "on", False)
    _alone.on = True
    try:
        yield
    finally:
        _alone.on = before


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0  # the device, even alone


def is_main() -> bool:
    return rank() == 0


def init_from_env(timeout_s: float = 1800) -> bool:
    """Join the group torchrun describes (WORLD_SIZE > 1); True if this call created it."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    td = _td()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextlib.contextmanager
def session(timeout_s: float = 1800) -> Iterator[None]:
    """Init from env on entry (if needed; `timeout_s`: how long a collective may wait); on a normal
    exit barrier + destroy. After an error only destroy: a barrier would wait for ranks that may be
    stuck in a collective."""
    created = init_from_env(timeout_s)
    try:
        yield
    except BaseException:
        if created:
            _td().destroy_process_group()
        raise
    if created:
        barrier()
        _td().destroy_process_group()


def device(name: str) -> str:
    """A torch device for this process: "cuda" becomes this rank's GPU under torchrun."""
    return f"cuda:{local_rank()}" if name == "cuda" and is_initialized() else name


def barrier() -> None:
    if _grouped():
        _td().barrier()


# ---- collectives (identity at world size 1) ------------------------------------------------


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes; returns t."""
    if world_size() > 1:
        _td().all_reduce(t)
    return t


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values into every process (parameters and buffers start identical)."""
    if world_size() > 1:
        for t in tensors:
            _td().broadcast(t.data, src=0)


def all_reduce_grads(params: Sequence[torch.Tensor], average: bool) -> bool:
    """Sum (or average) .grad over processes in one flat buffer; False if no process has any grad.

    A parameter without a grad on some process counts as zero there; one without a grad on every
    process keeps grad None (an optimizer then skips it, as it would in one process)."""
    if world_size() == 1:
        return any(p.grad is not None for p in params)
    dev = params[0].device
    present = all_reduce_sum(torch.tensor([float(p.grad is not None) for p in params], device=dev))
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    all_reduce_sum(flat)
    if average:
        flat /= world_size()
    offset = 0
    for p, seen in zip(params, present.tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p) if seen else None  # views of one buffer
        offset += n
    return bool(present.sum() > 0)


def shard_sizes(n: int, world: int | None = None) -> list[int]:
    """Contiguous split of n items over the processes (the first n % world get one more)."""
    w = world or world_size()
    return [n // w + (r < n % w) for r in range(w)]


def shard_slice(n: int) -> slice:
    """This process's contiguous share of n items."""
    sizes = shard_sizes(n)
    start = sum(sizes[: rank()])
    return slice(start, start + sizes[rank()])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient of the gathered rows (all-reduce)
    and returns this process's slice: with the same loss on every rank, the rows' gradient is
    world x dL/dx, so averaging parameter grads over ranks gives exactly the one-process gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank()
        width = max(sizes)
        padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]  # equal shapes: all_gather needs them
        _td().all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = all_reduce_sum(grad.contiguous().clone())
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[sizes[rank], ...] on each process -> [sum(sizes), ...] in rank order, differentiable.
    Every process must call it (and backward through it): x must require grad, even when empty."""
    if world_size() == 1:
        return x
    if x.shape[0] != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {x.shape[0]} rows, sizes say {sizes[rank()]}")
    return _GatherWithGrad.apply(x, list(sizes))
