"""The processes of one run: their launch, the process group, rank 0's output, the failure exchange,
a common seed.

    python engine.py --processes 2 --prompt long.txt --question "Who wrote the letter?"
    torchrun --nproc-per-node 2 engine.py --prompt long.txt --question "Who wrote the letter?"

`launch` starts the processes on this host as torchrun --standalone does (the same environment
variables), and waits for them: a user's mistake ends with rank 0's one line and its status, a
crash with one line naming the rank, Ctrl-C with "interrupted"; torchrun adds its own report
after any non-zero exit.
With one process every function here is the plain call. With several each process joins the group
(`init`); rank 0 reads the prompt and makes the downloads, and only it prints.
After each phase the ranks exchange a status, so that an exception on one rank is raised on all,
naming it (RankError), instead of leaving the others waiting. TIMEOUT bounds every wait.
ParallelComp's prefill over the ranks is distributed.py.
"""

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from prefill import OptionError

TIMEOUT = timedelta(minutes=10)  # the longest a collective waits: the other ranks wait out rank 0's gathered decode
GRACE_SECONDS = 30  # after one process fails, how long the others have to learn it and exit before they are stopped


class RankError(RuntimeError):
    """A failure on some rank, raised on every rank (on rank 0, only for another rank's) so that none waits for it."""

    def __init__(self, rank, reason):
        super().__init__(f"rank {rank}: {reason}")
        self.rank = rank


def launch(processes, command):
    """Run `command` (a Python command line) in `processes` processes of ranks 0..processes-1 that
    meet on a free port of 127.0.0.1; returns the exit status: 0, rank 0's when it failed, else the
    first failure's. Processes that outlive a failure by GRACE_SECONDS are stopped (a rank that
    crashed outside a failure exchange leaves the others waiting in a collective).

    Ctrl-C (or SIGTERM) is the launcher's alone: the ranks run in a process group of their own,
    which the terminal does not signal, and are stopped together, "interrupted" said once. A rank
    that caught the interrupt itself could leave the others waiting in a collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(processes),
               LOCAL_WORLD_SIZE=str(processes))
    interrupts = []  # the SIGINTs and SIGTERMs received, kept until every child is started
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: interrupts.append(signum))
    children = []
    for r in range(processes):
        if not interrupts:
            group = 0 if r == 0 else children[0].pid  # every rank in rank 0's new process group
            children.append(subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                             process_group=group))
    statuses = wait_all(children, interrupts)
    if interrupts:
        print("interrupted", file=sys.stderr)
        return 130
    for r, status in enumerate(statuses):
        if status < 0 and status != -signal.SIGTERM:  # SIGTERM: stopped here after another's failure
            print(f"error: rank {r} was killed by {signal.Signals(-status).name}"
                  f"{' (out of memory?)' if status == -signal.SIGKILL else ''}", file=sys.stderr)
    exits = [status for status in statuses if status > 0]
    return statuses[0] if statuses[0] > 0 else exits[0] if exits else 1 if any(statuses) else 0


def wait_all(children, interrupts):
    """The children's exit statuses. They are all terminated once `interrupts` holds one; once
    one has failed, those still running are terminated after GRACE_SECONDS, or at once when it was
    killed by a signal (it will join no exchange again)."""
    deadline = None
    while None in (statuses := [child.poll() for child in children]):
        if deadline is None and any(statuses):
            killed = any(status is not None and status < 0 for status in statuses)
            deadline = time.monotonic() + (0 if killed else GRACE_SECONDS)
        if interrupts or deadline is not None and time.monotonic() >= deadline:
            for child, status in zip(children, statuses):
                if status is None:
                    child.terminate()
        time.sleep(0.05)
    return statuses


def world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's rank: torch.distributed's, or torchrun's before the process joins its group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def init(device):
    """Join the process group, once, where torchrun or --processes started several: NCCL with this
    process's GPU, gloo on the CPU. Returns the device to use: `device`, with cuda naming the GPU
    cuda:LOCAL_RANK (None: cuda when there is one)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    name = str(device) if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if name != "cuda":
            raise OptionError("device", f"{{0}} {name}: with several processes each takes its own GPU; "
                                        f"give {{0}} cuda or cpu")
        per_host, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
        if gpus < per_host:
            raise OptionError("device", f"{{0}} cuda: {per_host} processes on this host, which has {gpus} CUDA "
                                        f"GPUs (NCCL needs one per process): start fewer (--processes, torchrun's "
                                        f"--nproc-per-node) or give {{0}} cpu")
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
