"""Several processes, one run: who is main, barriers, and the collective figures our own PPO loop needs.

Why a module of its own: the stages on transformers' `Trainer` (SFT, reward, DPO) get data sharding and
gradient all-reduce from accelerate, but what they do around the trainer (the run folder, the evaluation
hook, registration) and all of PPO, our own loop, must know which process they are and agree on global
figures. Everything that talks between processes lives here, so the stages read as single-process code
with a few explicit synchronization points. Statistics pooled over processes (whitening, explained variance)
are `align.objectives.stats`' own formulas, given `reducer()`.

The process group is accelerate's (`PartialState`: NCCL on GPUs, gloo on CPUs, set up from the variables
`accelerate launch` or `torchrun` export). With one process (WORLD_SIZE unset or 1) every helper returns its
input or does nothing, and neither accelerate's state nor `torch.distributed` is touched: the
single-process path costs nothing.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def world_size() -> int:
    """Processes in this run (WORLD_SIZE from `accelerate launch` / `torchrun`; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group (once), through accelerate, so the backend matches the hardware."""
    if is_distributed() and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines (accelerate's default: none)


def device() -> torch.device:
    """This process's device: its own GPU under several processes, else the GPU if any, else the CPU."""
    if is_distributed():
        from accelerate import PartialState

        init()
        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    if is_distributed():
        init()
        torch.distributed.barrier()


def broadcast_object(value: T) -> T:
    """Main's `value` on every process (any picklable object)."""
    if not is_distributed():
        return value
    init()
    box = [value if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


_alone = False  # True while main runs an `on_main` section (the others are waiting for it)


def on_main(work: Callable[[], T]) -> T:
    """Run `work` on the main process only while the others wait; every process gets its result. An error on
    main is re-raised everywhere (the others would otherwise wait until the timeout). Nested sections (a
    stage's main-only tail that registers through `register_entry`, itself main-only) simply run."""
    global _alone
    if not is_distributed() or _alone:
        return work()
    result, error, own = None, None, None
    if is_main():
        _alone = True
        try:
            result = work()
        except Exception as err:  # handed to the others, then raised here too
            own = err
            error = err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}")
        finally:
            _alone = False
    result, error = broadcast_object((result, error))
    if own is not None:
        raise own
    if error is not None:
        raise error
    return result


def _picklable(value) -> bool:
    import pickle

    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - any failure means: send a plain description instead
        return False


def gather_objects(value) -> list:
    """Every process's `value`, in rank order (small objects: statistics, dicts)."""
    if not is_distributed():
        return [value]
    init()
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------------------------------ tensors


def _comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over processes (a new tensor, on `tensor`'s device)."""
    if not is_distributed():
        return tensor
    init()
    buffer = tensor.detach().to(_comm_device(), torch.float64 if tensor.is_floating_point() else tensor.dtype,
                                copy=True)
    torch.distributed.all_reduce(buffer)
    return buffer.to(tensor.device, tensor.dtype)


def all_max(value: int) -> int:
    if not is_distributed():
        return value
    init()
    buffer = torch.tensor([value], dtype=torch.long, device=_comm_device())
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.MAX)
    return int(buffer.item())


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `tensor` concatenated in rank order (row counts may differ)."""
    if not is_distributed():
        return tensor
    init()
    parts = gather_objects(tensor.detach().cpu())
    return torch.cat(parts).to(tensor.device)


def reducer() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What `align.objectives.stats` takes to pool its statistics over every process's rows: `all_sum` under
    several processes, None alone (the plain single-process formulas)."""
    return all_sum if is_distributed() else None


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over processes, in one flat all-reduce. A parameter
    without a gradient here (a process with no rows in this minibatch) contributes zeros."""
    if not is_distributed():
        return
    init()
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(_comm_device())
    torch.distributed.all_reduce(flat)
    flat = flat.to(grads[0].device)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Main's values of `params` everywhere, so every process starts its updates from the same weights."""
    if not is_distributed():
        return
    init()
    with torch.no_grad():
        for p in params:
            buffer = p.detach().to(_comm_device(), copy=True)
            torch.distributed.broadcast(buffer, src=0)
            p.copy_(buffer.to(p.device))


def combine_weighted(sums: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Weighted means of named figures over every process (`sums[k] / weights[k]` on the pooled data)."""
    pooled_sums: dict[str, float] = {}
    pooled_weights: dict[str, float] = {}
    for part_sums, part_weights in gather_objects((sums, weights)):
        for key, value in part_sums.items():
            pooled_sums[key] = pooled_sums.get(key, 0.0) + value
            pooled_weights[key] = pooled_weights.get(key, 0.0) + part_weights[key]
    return {key: pooled_sums[key] / max(pooled_weights[key], 1e-12) for key in pooled_sums}


def shard(items: list[T], groups: int = 1) -> list[T]:
    """This process's contiguous share of `items`, cut at multiples of `groups` (a prompt's k samples stay
    together). The caller checks that the split is even."""
    n = world_size()
    if n == 1:
        return items
    per = len(items) // groups // n * groups
    return items[rank() * per:(rank() + 1) * per]


def main_only(function: Callable[..., T]) -> Callable[..., T]:
    """Decorator: `function` runs on the main process only (see `on_main`); every process gets its result."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return on_main(lambda: function(*args, **kwargs))

    return wrapper


def call_through(model, function: Callable[..., T], *args) -> T:
    """`function(module, *args)`, entered through `model`'s own forward call when `model` is a wrapper (DDP,
    FSDP, DeepSpeed: `model.module` is the real model) or may carry FSDP hooks.

    Our log-prob and score passes call a model's trunk and head directly (no full-vocabulary projection);
    done on a wrapper's inner module, that skips the wrapper's forward, so DDP would not arm its gradient
    all-reduce and FSDP would not gather the sharded parameters. So the function stands in for the
    forward for one call. One process and an unwrapped model: a plain call."""
    inner = getattr(model, "module", None)
    target = inner if isinstance(inner, torch.nn.Module) else (model if is_distributed() else None)
    if target is None:
        return function(model, *args)
    had_own = "forward" in target.__dict__  # accelerate puts an autocast wrapper here; keep it
    own = target.__dict__.get("forward")
    target.forward = lambda *call_args: function(target, *call_args)
    try:
        return model(*args)
    finally:
        if had_own:
            target.forward = own
        else:
            del target.forward
