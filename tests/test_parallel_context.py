import copy

import pytest
import torch

from megaocto.config.base import ConfigError
from megaocto.parallel import context as ctx_mod
from megaocto.parallel.context import ParallelContext, parse_slurm_nodelist, rank_layout


def test_rank_layout_world16_tp2_pp2():
    lay = rank_layout(16, tp=2, pp=2)
    assert lay["tp"] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert lay["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert lay["pp"] == [[i, i + 8] for i in range(8)]
    assert lay["embedding"] == lay["pp"]
    # every rank is in exactly one group of each kind
    for kind in ("tp", "dp", "pp"):
        assert sorted(r for g in lay[kind] for r in g) == list(range(16))


def test_rank_layout_pp4_and_errors():
    lay = rank_layout(8, tp=1, pp=4)
    assert lay["pp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay["embedding"] == [[0, 6], [1, 7]]
    assert lay["dp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_layout(1) == {"tp": [[0]], "dp": [[0]], "pp": [[0]], "embedding": [[0]]}
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp = 4\\*2"):
        rank_layout(12, tp=4, pp=2)


@pytest.mark.parametrize("text,hosts", [
    ("n[1-2,5]", ["n1", "n2", "n5"]),
    ("gpu-a[01-03],gpu-b7", ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-b7"]),
    ("node7", ["node7"]),
    ("a1,b2", ["a1", "b2"]),
    ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
    ("x[098-100]", ["x098", "x099", "x100"]),
])
def test_parse_slurm_nodelist(text, hosts):
    assert parse_slurm_nodelist(text) == hosts


def test_parse_slurm_nodelist_errors():
    with pytest.raises(ConfigError, match="unbalanced"):
        parse_slurm_nodelist("n[1-2")
    with pytest.raises(ConfigError, match="bad range"):
        parse_slurm_nodelist("n[5-2]")


def test_dist_env_slurm_and_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[01-03],gpu-b7")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = ctx_mod._dist_env()
    assert env == {"rank": 5, "world_size": 8, "local_rank": 1, "master_addr": "gpu-a01",
                   "master_port": 15000 + 123456 % 20000, "source": "slurm"}
    monkeypatch.setenv("MASTER_PORT", "7777")
    assert ctx_mod._dist_env()["master_port"] == 7777
    # torchrun variables win over SLURM ones (torchrun inside an allocation)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    env = ctx_mod._dist_env()
    assert (env["rank"], env["world_size"], env["local_rank"], env["source"]) == (2, 4, 2, "torchrun")


def test_init_without_distributed(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    pc = ParallelContext.init(sequence_parallel=True)
    assert (pc.tp, pc.pp, pc.dp, pc.world_size, pc.rank) == (1, 1, 1, 1, 0)
    assert pc.sequence_parallel is False and pc.is_tp_src and pc.is_first_stage and pc.is_last_stage
    with pytest.raises(ConfigError, match="no distributed environment"):
        ParallelContext.init(tp=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        ParallelContext.init(tp=2)


def test_single_context_helpers():
    pc = ParallelContext.single()
    assert pc.device == torch.device("cpu") and pc.tp_src_rank == 0
    assert "rank 0/1 tp 0/1" in pc.describe()
    assert copy.deepcopy(pc) is pc
    assert pc.rng.names() == ["model-parallel"]


def _env_init_worker(rank, port, out_dir):
    """Rank 0 finds a torchrun environment, rank 1 a SLURM one; both meet at the same TCP store."""
    import os

    import torch.distributed as dist
    for k in [k for k in os.environ if k.startswith("SLURM_")] + ["RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                  "MASTER_ADDR", "MASTER_PORT"]:
        os.environ.pop(k, None)
    if rank == 0:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    else:
        os.environ.update({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "MASTER_PORT": str(port)})
    pc = ParallelContext.init(tp=2, sequence_parallel=True, timeout_minutes=1)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=pc.tp_group)
    with open(f"{out_dir}/{rank}.txt", "w") as f:
        f.write(f"{pc.tp_rank} {pc.local_rank} {pc.backend} {pc.sequence_parallel} {t.item()}")
    dist.destroy_process_group()


def test_init_from_torchrun_and_slurm_env(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_env_init_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "0.txt").read_text() == "0 0 gloo True 3.0"
    assert (tmp_path / "1.txt").read_text() == "1 1 gloo True 3.0"


def test_cuda_device_honours_per_task_gpu_binding(monkeypatch):
    """srun --gpus-per-task=1: task with SLURM_LOCALID=3 sees one GPU (cuda:0); cuda:3 does not exist there."""
    from megaocto.parallel.context import cuda_device_index
    assert cuda_device_index(3, 8) == 3  # all of the node's GPUs visible: one per local rank
    assert cuda_device_index(3, 1) == 0  # per-task binding
    assert cuda_device_index(5, 2) == 1  # two GPUs per task
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        cuda_device_index(0, 0)
    # the whole init path on a (faked) one-visible-GPU task with local rank 3
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(ParallelContext, "single", classmethod(lambda cls, device="cpu": chosen.append(device)))
    ParallelContext.init()
    assert chosen == ["cuda:0"]
