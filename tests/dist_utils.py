"""Run a test body on N gloo ranks in fresh processes (no torchrun needed).

    def _body(rank, world_size, arg):       # module-level, so it pickles
        pc = ParallelContext.init(tp=2)      # torch.distributed is already initialised
        ...assert...

    def test_x(tmp_path):
        run_distributed(_body, 2, arg)

An assertion failing on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, fn, world_size, init_file, args):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    fd, init_file = tempfile.mkstemp(prefix="megaocto_dist_")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    try:
        mp.start_processes(_worker, args=(fn, world_size, init_file, args), nprocs=world_size,
                           join=True, start_method="spawn")
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
