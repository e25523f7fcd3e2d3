"""Training on several processes (PyTorch DistributedDataParallel), one machine.

`thinseg train --nproc N` starts N copies of itself through PyTorch's elastic launcher (what
`torchrun` runs), in this process: each copy (a rank) draws its own balanced patches, the
gradients are averaged across ranks at every step, and rank 0 alone writes the checkpoint, the
log, the curves and the exported model. Ranks meet in a process group: gloo on the CPU, nccl on
GPUs (one GPU per rank, the rank's local number).

Why rank 0 validates alone while the others wait: validation scores whole sections with the
inference engine, and its results decide what is exported and whether to stop; one process
deciding keeps every rank on the same path. The waiting happens on a second, gloo group with
a long timeout, so a long validation is not taken for a hung peer; a peer that dies is seen at
once (its sockets close) and the launcher stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from thinseg.console import Terminated
from thinseg.errors import ThinSegError

T = TypeVar("T")

#: How long a collective of the training steps waits for a peer before failing.
STEP_TIMEOUT = datetime.timedelta(minutes=30)
#: How long the other ranks wait for rank 0's validation, checkpoint and export.
MAIN_WORK_TIMEOUT = datetime.timedelta(hours=12)
#: Environment variables the elastic launcher (torchrun) sets in every rank it starts.
LAUNCHED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = ""
    wait_group: Any = None  # the gloo group for waiting on rank 0 and for exchanging plain values

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank (the others wait for it): a picklable value."""
        if not self.distributed:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.wait_group)
        return box[0]  # type: ignore[return-value]  # rank 0's value, of T

    def sums(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over the ranks."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(tensor, group=self.wait_group)
        return [float(v) for v in tensor.tolist()]

    def all_true(self, flag: bool) -> bool:
        """True where `flag` is true on every rank (each rank's steps must agree, or one waits forever)."""
        if not self.distributed:
            return flag
        return self.sums([0.0 if flag else 1.0])[0] == 0.0

    def wait(self) -> None:
        """Every rank waits here for all the others."""
        if self.distributed:
            dist.barrier(group=self.wait_group)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it fills the caches and writes the split); the others
        run it after, reading what rank 0 wrote. A rank 0 that fails never lets them in: the
        launcher then stops them."""
        if not self.main:
            self.wait()
        yield
        if self.main:
            self.wait()

    @contextlib.contextmanager
    def main_work(self) -> Iterator[None]:
        """Rank 0's work while the others wait (validation, export): on the CPU rank 0 takes the
        threads of the waiting ranks of this machine for it."""
        if not self.distributed or self.backend != "gloo":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(min(cpu_count(), before * self.local_world))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def wrap(self, network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the training steps run: `network` in DistributedDataParallel across the
        ranks (gradients averaged at each step), or `network` itself when alone. The bare
        network stays what is checkpointed and exported (no `module.` prefix in its keys)."""
        if not self.distributed:
            return network
        # deferred: DistributedDataParallel is needed by multi-process runs only
        from torch.nn.parallel import DistributedDataParallel

        if device.type != "cuda":
            return DistributedDataParallel(network)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(network, device_ids=[index], output_device=index)


_alone = Ranks()
_current: list[Ranks] = [_alone]
_stop_signal: list[int] = []


def current() -> Ranks:
    """The ranks of the process group this process joined (`joined`), or rank 0 of 1."""
    return _current[-1]


def launched_world() -> int:
    """How many ranks the elastic launcher started, as its environment says (1: not launched)."""
    if not all(name in os.environ for name in LAUNCHED):
        return 1
    try:
        return max(1, int(os.environ["WORLD_SIZE"]))
    except ValueError:
        return 1


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: containers and taskset included)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_rank(ranks_here: int) -> int:
    """Compute threads of each of `ranks_here` ranks on one machine: the CPUs shared out, so
    that ranks do not oversubscribe the cores."""
    return max(1, cpu_count() // max(1, ranks_here))


def stop_signal() -> int | None:
    """The signal that is stopping this rank (SIGINT or SIGTERM), if one came."""
    return _stop_signal[0] if _stop_signal else None


def _stop(signum: int, _frame: FrameType | None) -> None:
    """First SIGINT/SIGTERM: raise as the single-process run does; later ones (the launcher
    passes the user's signal on, so a rank may get it twice) are ignored while cleaning up."""
    _stop_signal.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGTERM:
        raise Terminated(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopped_with_launcher(poll_s: float = 0.5) -> Iterator[None]:
    """SIGTERM to this rank as soon as its launcher is gone (killed with SIGKILL, say): recent
    launchers start each rank in a session of its own, so killing the launcher's process group
    would otherwise leave the ranks training on. The watching thread ends with the block."""
    launcher = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != launcher:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="thinseg-launcher-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


@contextlib.contextmanager
def joined(device: str = "auto") -> Iterator[Ranks]:
    """Join the process group of the ranks the launcher started (nothing when not launched) for
    the block; `current()` is then these ranks. GPUs: nccl, each rank on the GPU of its local
    rank; CPU: gloo, each rank with its share of the CPUs (unless OMP_NUM_THREADS says)."""
    world = launched_world()
    if world <= 1:
        yield _alone
        return
    if not dist.is_available():
        raise ThinSegError("this PyTorch has no torch.distributed: train with one process")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads_per_rank(local_world))
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _stopped_with_launcher():
            dist.init_process_group(backend, init_method="env://", timeout=STEP_TIMEOUT)
            try:
                wait_group = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)
                ranks = Ranks(rank, world, local_rank, local_world, backend, wait_group)
                _current.append(ranks)
                try:
                    yield ranks
                finally:
                    _current.remove(ranks)
            finally:
                with contextlib.suppress(Exception):  # a peer already gone: nothing left to close cleanly
                    dist.destroy_process_group()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped_within(seconds: float) -> bool:
    """Whether the launcher stops this rank within `seconds` (it does once another rank failed):
    a rank other than 0 that fails waits so, and stays quiet when rank 0 failed too, as it
    mostly does on the same problem, so that the problem is said once."""
    if stop_signal() is not None:
        return True
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and stop_signal() is None:
            time.sleep(0.05)
    except KeyboardInterrupt:  # the launcher's SIGTERM (or the user's Ctrl-C)
        return True
    return stop_signal() is not None


def peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective broken off because another rank ended (gloo and nccl
    report it as a RuntimeError naming the transport): that rank, or the launcher, says why."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Connection closed"))


def _signal_name(number: int) -> str:
    try:
        return f"signal {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (for the ranks' meeting point)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_arguments(nproc: int, port: int, argv: Sequence[str]) -> list[str]:
    """torchrun's command line for `python -m thinseg ARGV` on `nproc` ranks of this machine."""
    return [
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "--max_restarts",
        "0",
        "--monitor_interval",
        "1",
        "-m",
        "thinseg",
        *argv,
    ]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ (inherited by the ranks) for the block, restored after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m thinseg ARGV` on `nproc` ranks (what `torchrun --nproc_per_node N -m thinseg
    ARGV` does) with the elastic agent in this process; returns the run's exit status.

    The agent passes SIGINT/SIGTERM on to the ranks and stops them all when one fails; its own
    log and failure report stay quiet, since a failing rank says what went wrong in one line
    (a rank killed by a signal cannot: this says it instead). Each rank's compute threads are
    the CPUs shared out unless OMP_NUM_THREADS is set.
    """
    # deferred: the elastic launcher is needed by the launching process only
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    parse: Callable[[list[str]], Any] = parse_args  # torch leaves both unannotated
    run_agent: Callable[[Any], None] = run

    package_root = str(Path(__file__).resolve().parents[2])  # where `import thinseg` finds this copy
    path = os.environ.get("PYTHONPATH")
    values = {"PYTHONPATH": package_root + (os.pathsep + path if path else "")}
    if "OMP_NUM_THREADS" not in os.environ:
        values["OMP_NUM_THREADS"] = str(threads_per_rank(nproc))
    if "LOGLEVEL" not in os.environ:
        values["LOGLEVEL"] = "CRITICAL"
    caught = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    handlers = {sig: signal.getsignal(sig) for sig in caught}  # the agent takes these over
    quiet = {name: logging.getLogger(name) for name in list(logging.root.manager.loggerDict)}
    levels = {name: log.level for name, log in quiet.items() if name.startswith("torch.distributed")}
    try:
        with _environment(values):
            for name in levels:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            run_agent(parse(launcher_arguments(nproc, free_port(), argv)))
        return 0
    except ChildFailedError as failed:
        rank, failure = failure_to_report(failed)
        code = int(failure.exitcode)
        if code > 0:  # the rank said what went wrong itself
            return code
        # killed by a signal (the out-of-memory killer, say): it could not say so, the others were stopped
        print(f"thinseg: error: training process {rank} was killed by {_signal_name(-code)}", file=sys.stderr)
        return 128 - code  # as shells report a death by signal
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except KeyboardInterrupt as interrupt:  # a signal before the agent took the handlers over
        return 128 + int(interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def failure_to_report(failed: Any) -> tuple[int, Any]:
    """(rank, ProcessFailure) of a failed run (a ChildFailedError) that caused it. A rank killed
    by a signal is a cause (the others end with a status of their own), and failures seen in one
    pass of the agent can carry the same time stamp. A rank ended by SIGTERM is more likely one
    the agent stopped after another died (on a busy machine, before its handler ran), so a rank
    killed by any other signal comes first."""
    failures = failed.failures
    killed = sorted(
        (r for r, f in failures.items() if int(f.exitcode) < 0),
        key=lambda r: (int(failures[r].exitcode) == -signal.SIGTERM, r),
    )
    if killed:
        return killed[0], failures[killed[0]]
    rank, failure = failed.get_first_failure()
    return int(rank), failure


def check_processes(nproc: int, device: str) -> None:
    """Refuse, before starting any, more GPU ranks than GPUs (nccl cannot share one GPU between
    ranks); CPU ranks may be as many as asked (each gets its share of the CPUs)."""
    if device == "cpu" or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise ThinSegError(
            f"--nproc {nproc} on the GPU needs {nproc} GPUs and this machine has {gpus}: give --nproc {gpus}, or "
            "--device cpu"
        )
