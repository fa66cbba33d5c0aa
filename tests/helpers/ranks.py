"""torch.distributed ranks for tests: gloo processes on the loopback that fail instead of hanging."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

from helpers.server import free_port

__all__ = ["collectives_so_far", "spawn_ranks"]


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a small box: no oversubscription
    # A collective one rank skips fails after timeout_s instead of waiting 30 minutes.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(
    fn: Callable[..., None],
    *args: Any,
    world: int = 2,
    timeout: float = 240.0,
    collective_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group on
    a free loopback port. Raises what a rank raised; kills them all after ``timeout`` seconds
    (a hang fails the test instead of CI). ``fn`` must be a module-level function."""
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # spawned children inherit the environment
    try:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world, free_port(), args, collective_timeout),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def collectives_so_far() -> int:
    """Collectives the default process group has run in this process (its sequence number:
    every collective, from torch.distributed, DTensor or FSDP, counts one)."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_group()._get_sequence_number_for_group()
