"""Process-group setup (torchrun, SLURM, OpenMPI) and small collective helpers.

Everything degrades to single-process behaviour when torch.distributed is not initialised, so the
rest of the code can call these helpers unconditionally.
"""

from __future__ import annotations

import builtins
import datetime
import os
import re
import subprocess
import sys

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = "22110"


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[003-005,009],cpu1``.

    ``scontrol show hostnames`` is the authoritative expander; it is used when available, and a small
    parser covers the common ``prefix[range,...]`` form when it is not (e.g. inside containers).
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # split on commas outside brackets
    match = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def detect_launch_env(dist_on_itp: bool = False, environ=None) -> dict | None:
    """Return {'rank', 'world_size', 'local_rank'} from the launcher's environment, or None.

    Priority: torchrun-style RANK/WORLD_SIZE, then OpenMPI (only with --dist_on_itp), then SLURM.
    A world size of 1 is treated as single-process (e.g. an interactive SLURM shell).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        info = dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", 0)))
    elif dist_on_itp and "OMPI_COMM_WORLD_RANK" in env:
        info = dict(rank=int(env["OMPI_COMM_WORLD_RANK"]), world_size=int(env["OMPI_COMM_WORLD_SIZE"]),
                    local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank = int(env["SLURM_PROCID"])
        if "SLURM_LOCALID" in env:
            local_rank = int(env["SLURM_LOCALID"])
        else:
            per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
            local_rank = rank % max(per_node, 1)
        info = dict(rank=rank, world_size=int(env["SLURM_NTASKS"]), local_rank=local_rank,
                    master_addr=first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")))
    else:
        return None
    return info if info["world_size"] > 1 else None


def _silence_print_on_workers(is_master: bool) -> None:
    """Only rank 0 prints to stdout; stderr (warnings, errors) and print(force=True) still show."""
    builtin_print = builtins.print
    if getattr(builtin_print, "_stm_wrapped", False):
        builtin_print = builtin_print._stm_original

    def wrapped(*args, **kwargs):
        force = kwargs.pop("force", False)
        to_stdout = kwargs.get("file") in (None, sys.stdout)
        if is_master or force or not to_stdout:
            builtin_print(*args, **kwargs)

    wrapped._stm_wrapped = True
    wrapped._stm_original = builtin_print
    builtins.print = wrapped


def init_distributed(args) -> None:
    """Initialise torch.distributed from the environment and fill args.rank/world_size/gpu/distributed."""
    info = detect_launch_env(getattr(args, "dist_on_itp", False))
    if info is None:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        print("Not using distributed mode")
        return
    args.distributed = True
    args.rank, args.world_size, args.gpu = info["rank"], info["world_size"], info["local_rank"]
    # SLURM/OpenMPI do not export the rendezvous address that env:// needs.
    os.environ.setdefault("MASTER_ADDR", info.get("master_addr", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(args.rank), str(args.world_size)
    os.environ["LOCAL_RANK"] = str(args.gpu)
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    print(f"| distributed init (rank {args.rank}/{args.world_size}, local {args.gpu}, "
          f"{args.dist_backend}): {args.dist_url}", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    _silence_print_on_workers(args.rank == 0)


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()
    if getattr(builtins.print, "_stm_wrapped", False):
        builtins.print = builtins.print._stm_original


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of numbers over all ranks (float64 so integer counts stay exact)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank_true(flag: bool, device) -> bool:
    """True when the flag is set on any rank (used so all ranks stop together on a NaN loss)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)
