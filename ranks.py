"""The torchrun plumbing: the process group, rank 0's output, the failure exchange, a common seed.

    torchrun --nproc-per-node 2 engine.py --prompt long.txt --question "Who wrote the letter?"

Without torchrun (one process) every function here is the plain call. Under torchrun each process
joins the group (`init`); rank 0 reads the prompt and makes the downloads, and only it prints.
After each phase the ranks exchange a status, so that an exception on one rank is raised on all,
naming it (RankError), instead of leaving the others waiting. TIMEOUT bounds every wait.
ParallelComp's prefill over the ranks is distributed.py.
"""

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from prefill import OptionError

TIMEOUT = timedelta(minutes=10)  # the longest a collective waits: the other ranks wait out rank 0's gathered decode


class RankError(RuntimeError):
    """A failure on some rank, raised on every rank (on rank 0, only for another rank's) so that none waits for it."""

    def __init__(self, rank, reason):
        super().__init__(f"rank {rank}: {reason}")
        self.rank = rank


def world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's rank: torch.distributed's, or torchrun's before the process joins its group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def init(device):
    """Join torchrun's process group, once, when it started several processes: NCCL with this
    process's GPU, gloo on the CPU. Returns the device to use: `device`, with cuda naming the GPU
    cuda:LOCAL_RANK (None: cuda when there is one)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    name = str(device) if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if name != "cuda":
            raise OptionError("device", f"{{0}} {name}: under torchrun every process takes its own GPU; "
                                        f"give {{0}} cuda or cpu")
        per_host, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
        if gpus < per_host:
            raise OptionError("device", f"{{0}} cuda: torchrun started {per_host} processes on this host, which has "
                                        f"{gpus} CUDA GPUs (NCCL needs one per process): lower --nproc-per-node "
                                        f"or give {{0}} cpu")
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(name)
    if not dist.is_initialized():
        cuda = name.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                device_id=torch.device(name) if cuda else None)
        atexit.register(dist.destroy_process_group)  # a group left to the interpreter's exit aborts it
    return name


def describe(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def agree(error):
    """Every rank learns whether any failed since the last exchange (error: this rank's exception
    or None): raises the failure of the lowest failing rank on every rank, rank 0's own as it is."""
    reasons = [None] * world()
    dist.all_gather_object(reasons, None if error is None else describe(error))
    failed = next(((r, reason) for r, reason in enumerate(reasons) if reason is not None), None)
    if error is not None and rank() == 0:
        raise error
    if failed:
        raise RankError(*failed) from error


def checked(fn, *args):
    """fn(*args) on every rank, then agree(): its result, or the first failure raised on all ranks."""
    if world() == 1:
        return fn(*args)
    try:
        result = fn(*args)
    except Exception as e:
        agree(e)  # raises
    agree(None)
    return result


def from_rank0(fn, *args):
    """fn(*args) computed on rank 0 and returned on every rank; its exception is raised on rank 0
    and as a RankError on the others."""
    if world() == 1:
        return fn(*args)
    error, box = None, [None]
    if rank() == 0:
        try:
            box[0] = (fn(*args), None)
        except Exception as e:
            error, box[0] = e, (None, describe(e))
    dist.broadcast_object_list(box, 0)
    if error is not None:
        raise error
    value, reason = box[0]
    if reason is not None:
        raise RankError(0, reason)
    return value


def rank0_first(fn, *args):
    """fn(*args) on rank 0, then on the other ranks (a download that one process should make)."""
    if rank() == 0:
        return checked(fn, *args)
    checked(lambda: None)
    return fn(*args)


def common_seed(seed):
    """`seed`, or with several processes and none given, one drawn on rank 0 for all: ranks that
    decode in lockstep must sample the same tokens."""
    if seed is not None or world() == 1:
        return seed
    return from_rank0(lambda: int.from_bytes(os.urandom(8), "little"))


def decoded(prefilled, decode):
    """decode() where this rank decodes, then rank 0's result on every rank; a failure on any
    rank is raised on all. A prefill without a cache: this rank does not decode (rank 0 does,
    alone, after a gathering prefill). A cache whose `lockstep` is true (distributed.ShardedCache)
    is decoded by every rank in lockstep and keeps its attention's failure in `failure`, exchanged
    after; any other is decoded by each rank on its own."""
    cache = prefilled.cache
    if world() == 1:
        return decode()
    if getattr(cache, "lockstep", False):
        result = decode()
        agree(cache.failure)
    else:
        result = checked(lambda: None if cache is None else decode())
    return from_rank0(lambda: result)
