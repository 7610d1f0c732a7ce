"""Run a function on a few gloo ranks of this machine and collect what each returned.

    results = run_ranks(compute, world=2, out_dir=tmp_path)   # [compute(0, 2), compute(1, 2)]

`compute(rank, world)` must be a module-level function (the ranks are spawned processes that
import it by name); it runs inside an initialized gloo process group and returns anything
torch.save can write. Shared by the distributed test files.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SPAWN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, compute, world: int, port: int, out_dir: str, collective_timeout_s: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        torch.save(compute(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The result is saved and the group destroyed: leave without interpreter teardown, where a
    # worker thread left by gloo / DCP (torch 2.13) can hit std::terminate ("terminate called without
    # an active exception", SIGABRT) and fail a rank that finished. Errors above still propagate.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(compute, world: int, out_dir, collective_timeout_s: int = 120) -> list:
    """[compute(r, world) for each rank r], run in `world` spawned gloo processes; fails the test
    (killing the ranks) when they have not finished in SPAWN_TIMEOUT_S seconds."""
    context = mp.start_processes(
        _rank_main, args=(compute, world, _free_port(), str(out_dir), collective_timeout_s), nprocs=world,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish in {SPAWN_TIMEOUT_S} s (a collective hung?)")
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(world)]
