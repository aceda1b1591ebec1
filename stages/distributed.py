"""Many processes with torch.distributed, as launched by ``torchrun``: nothing home-made.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs in one process.
Backend: nccl for CUDA tensors and gloo for CPU ones (a loss mean is reduced on the CPU).
"""
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size), initialising the process group on first use under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

