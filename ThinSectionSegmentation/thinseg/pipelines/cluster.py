"""Many sections on a Dask cluster: one task per section, the same outputs as a local run.

`segment_on_cluster` pairs and plans the inputs as `segment_files` does, then submits one
task per section to a `dask.distributed` cluster: a LocalCluster of N worker processes on this
machine ("local:N"), or any running scheduler ("tcp://HOST:PORT", or the scheduler file that
dask-jobqueue, dask-mpi or a `dask scheduler` given one writes). A task segments its section
with the same `run_section` the local path calls, with a Segmenter built once per worker process
(`worker_segmenter`), so the labels equal a local run's bit for bit (on the same kind of machine,
with as many torch threads as a worker has). Results come back as sections finish, to the same
callbacks; the modal mineralogy table is written by the client at the end.

Workers need thinseg (and the model folder, and the inputs and output folder under the same
paths): a shared file system, as on any HPC cluster. Dask is an optional extra
(`pip install thinseg[cluster]`): it is imported only here, when a cluster is asked for.

Exactly once. A worker that dies (killed, out of memory, node lost) takes its running task
with it; the scheduler runs the task again on another worker (up to
`distributed.scheduler.allowed-failures` times, then the section is reported failed).
A task that died before its commit left only a temporary (swept at the end of the run, its
process being gone); one that died after committing but before its result reached the client
would, run again, write the section a second time (S_1.nc) or fail. So every output of a run
carries the run's id as the netCDF attribute `thinseg_run`, inside the file, committed with it
in the same rename: a task that finds its section's output already carrying this run's id
reads the result back from that file (`committed_output`) instead of segmenting it again. No
marker beside the file can do this, as a kill could fall between the file and its marker.

One section over many workers. When the batch has fewer sections than the cluster has worker
threads (or `band_rows` is given), each section is shared instead: the client opens its output
as a local run does, and parts of whole tile rows (`band_task`, about `band_rows` rows each, by
default the section split evenly over the worker threads in parts of at least MIN_BAND_ROWS)
run on the workers. Each part also runs the tile row above it, unreported, so the rows two parts
share are blended from the same tiles in the same order as in one process: the labels equal a
local run's bit for bit. The parts come back as they finish and are written in order into the
one netCDF file, while the client copies the input images into it; at most a few parts are in
flight, so the client holds a bounded number of rows. A part is only computation (it writes
nothing), so a part whose worker died simply runs again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.inference.engine import (
    CONFIDENCE_BINS,
    CancelFn,
    Cancelled,
    InferenceOptions,
    ProgressFn,
    RowSink,
    RunStats,
    Segmenter,
    Source,
    tile_row_groups,
)
from thinseg.inference.resample import Factor, GridSink, ResampledSource
from thinseg.io.atomic import MAX_NUMBERED, numbered, sweep_stale_temporaries
from thinseg.io.netcdf import global_attribute, read_labelmap
from thinseg.io.pairing import SectionInput, section_base_name
from thinseg.limits import path_text
from thinseg.model.bundle import load_bundle
from thinseg.pipelines.segment import (
    RUN_ATTRIBUTE,
    CopyingSource,
    ProgressFactory,
    SectionResult,
    SegmentOptions,
    SegmentRun,
    _open_inputs,
    _overlay_name,
    is_single_file,
    output_paths,
    plan_batch,
    prepare_run,
    run_section,
    write_modal_mineralogy,
)
from thinseg.reports.mineralogy import modal_mineralogy

if TYPE_CHECKING:
    from distributed import Client, Future

#: Most worker processes "local:N" starts (a typo such as local:400 must not fork 400 processes).
MAX_LOCAL_WORKERS = 256
#: Seconds to wait for a remote scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 30.0
#: Fewest rows of a part of a shared section by default: each part also runs the tile row above
#: it, so parts of a few tile rows would spend much of their time on it.
MIN_BAND_ROWS = 2048
#: Parts of a shared section in flight beyond one per worker thread (the client holds their rows).
EXTRA_PARTS_IN_FLIGHT = 1
_LOCAL = re.compile(r"local:(\d+)")
_ADDRESS = re.compile(r"(tcp|tls|ucx|ws|wss|inproc)://\S+")


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed --cluster value: `workers` for a LocalCluster, else a scheduler `address` or a
    `scheduler_file`."""

    text: str
    workers: int | None = None
    address: str | None = None
    scheduler_file: Path | None = None


def parse_cluster(spec: str) -> ClusterSpec:
    """`local:N`, a scheduler address (tcp://HOST:PORT, tls://...) or an existing scheduler file
    (.json); anything else is refused in one line before any work."""
    text = spec.strip()
    local = _LOCAL.fullmatch(text)
    if local is not None:
        workers = int(local.group(1))
        if not 1 <= workers <= MAX_LOCAL_WORKERS:
            raise ThinSegError(f"--cluster {text}: give 1 to {MAX_LOCAL_WORKERS} local workers")
        return ClusterSpec(text, workers=workers)
    if _ADDRESS.fullmatch(text):
        return ClusterSpec(text, address=text)
    if text.lower().endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise ThinSegError("--cluster: scheduler file not found", path)
        return ClusterSpec(text, scheduler_file=path)
    raise ThinSegError(f"--cluster {text}: give local:N, tcp://HOST:PORT or a scheduler file")


def _distributed() -> None:
    """One line, saying how to install it, where dask.distributed is missing."""
    try:
        import distributed  # noqa: F401  # deferred: dask is an optional extra (thinseg[cluster])
    except ImportError as error:
        raise ThinSegError(
            f"--cluster needs dask.distributed, which is not installed ({error}): pip install thinseg[cluster]"
        ) from None


@contextlib.contextmanager
def connect(spec: str, timeout_s: float | None = None) -> Iterator[Client]:
    """A Dask client for `spec` (see `parse_cluster`). "local:N" starts a LocalCluster of N
    worker processes of one thread each (no dashboard), closed on the way out; otherwise the
    running scheduler is joined and left running. A scheduler that does not answer within
    `timeout_s` (default CONNECT_TIMEOUT_S) is one line."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    parsed = parse_cluster(spec)
    _distributed()  # the one-line error when dask is missing
    from distributed import Client, LocalCluster  # deferred: optional extra, checked just above

    with contextlib.ExitStack() as stack:
        if parsed.workers is not None:
            cluster = stack.enter_context(
                LocalCluster(n_workers=parsed.workers, threads_per_worker=1, processes=True, dashboard_address=None)
            )
            client = stack.enter_context(Client(cluster))
        else:
            try:
                if parsed.scheduler_file is not None:
                    client = Client(scheduler_file=str(parsed.scheduler_file), timeout=timeout_s)
                else:
                    client = Client(parsed.address, timeout=timeout_s)
            except (OSError, TimeoutError, ValueError) as error:
                where = parsed.scheduler_file
                detail = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ThinSegError(f"--cluster {parsed.text}: no scheduler answers ({detail})", where) from None
            stack.enter_context(client)
        yield client


# -- the worker side ------------------------------------------------------------------------------

_SEGMENTERS: dict[tuple[str, str], Segmenter] = {}


def worker_segmenter(model_dir: Path, inference: InferenceOptions) -> Segmenter:
    """The Segmenter of this worker process for the model and inference options, built on the
    first task that needs it and kept for every later one (a model is loaded once per worker)."""
    key = (str(Path(model_dir).resolve()), repr(inference))
    segmenter = _SEGMENTERS.get(key)
    if segmenter is None:
        if not _SEGMENTERS:
            undo_malloc_trim_threshold()
        segmenter = _SEGMENTERS[key] = Segmenter(load_bundle(model_dir), inference)
    return segmenter


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def undo_malloc_trim_threshold() -> bool:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's
    adaptive mmap threshold: every tensor over 128 kB is then mapped and unmapped anew, and the
    network runs 1.7x slower (16.6 s instead of 9.4 s for 45 tiles of 902 px here). Where that
    variable is set, give glibc the thresholds its adaptation would reach (mmap from 32 MB, trim
    above 128 MB). True when they were set (glibc only; elsewhere nothing is changed)."""
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    trim_set = libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024 * 1024)
    return bool(mmap_set and trim_set)


def loaded_models() -> int:
    """How many Segmenters this process has built (one per model and options)."""
    return len(_SEGMENTERS)


@dataclass
class TaskOutcome:
    """What a section's task sends back: its result, or its failure as (problem, file); the
    worker's Segmenter messages apart, so the client shows them once."""

    result: SectionResult | None = None
    problem: str | None = None
    path: Path | None = None
    segmenter_messages: list[str] = field(default_factory=list)


def segment_task(
    section: SectionInput, options: SegmentOptions, output: Path, model_dir: Path, run_id: str
) -> TaskOutcome:
    """One section on a worker: its output of this run if a lost worker committed it already,
    else `run_section` with the worker's Segmenter. Never raises for a section's own problem."""
    try:
        segmenter = worker_segmenter(model_dir, options.inference)
    except Exception as error:  # the section boundary: a model that does not load here
        refused = ThinSegError.from_exception(error, model_dir)
        return TaskOutcome(problem=refused.problem, path=refused.path)
    shared = list(segmenter.messages)
    result = committed_output(section, segmenter, options, output, run_id)
    if result is None:
        result, failure = run_section(section, segmenter, options, output, run_id=run_id)
        if failure is not None:
            return TaskOutcome(problem=failure.problem, path=failure.path, segmenter_messages=shared)
    assert result is not None
    if result.messages[: len(shared)] == shared:
        result.messages = result.messages[len(shared) :]
    return TaskOutcome(result=result, segmenter_messages=shared)


@dataclass
class PartOutcome:
    """What a part of a shared section sends back: its rows [y0, y0 + len(labels)) on the grid
    the engine ran on, the confidence histogram of those rows, or its failure."""

    y0: int = 0
    labels: npt.NDArray[np.uint8] | None = None
    confidence: npt.NDArray[np.uint8] | None = None
    histogram: npt.NDArray[np.int64] | None = None
    tiles: int = 0
    problem: str | None = None
    path: Path | None = None


class _KeptRows:
    """A row sink that keeps a part's rows, whole (the bands of a wide section come in column
    stripes: each is copied into place, the engine reusing its band buffers)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.y0: int | None = None
        self.labels: list[npt.NDArray[np.uint8]] = []  # one full-width array per band of the first stripe
        self.confidence: list[npt.NDArray[np.uint8]] = []
        self._bands: dict[int, int] = {}  # first row -> index of its band

    def write_rows(
        self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None, x0: int = 0
    ) -> None:
        if self.y0 is None:
            self.y0 = y0
        h, w = labels.shape
        if y0 not in self._bands:
            self._bands[y0] = len(self.labels)
            self.labels.append(np.zeros((h, self.width), np.uint8))
            if confidence is not None:
                self.confidence.append(np.zeros((h, self.width), np.uint8))
        i = self._bands[y0]
        self.labels[i][:, x0 : x0 + w] = labels
        if confidence is not None:
            self.confidence[i][:, x0 : x0 + w] = confidence


def band_task(
    section: SectionInput,
    options: SegmentOptions,
    model_dir: Path,
    factor: Factor | None,
    tile_rows: tuple[int, int],
) -> PartOutcome:
    """Tile rows [a, b) of one section on a worker (see `Segmenter.stream`'s `tile_rows`): the
    inputs opened as the client opened them, on the model's grid when `factor` is given."""
    try:
        segmenter = worker_segmenter(model_dir, options.inference)
        with contextlib.ExitStack() as stack:
            opened = _open_inputs(section, segmenter.bundle, options, stack)
            sources: list[Source] = list(opened.sources)
            if factor is not None:
                sources = [ResampledSource(s, factor) for s in sources]
            kept = _KeptRows(int(sources[0].shape[1]))
            stats = segmenter.stream(sources, kept, tile_rows=tile_rows)
    except Exception as error:  # the part boundary: reported to the client, which fails the section
        refused = ThinSegError.from_exception(error, section.primary)
        return PartOutcome(problem=refused.problem, path=refused.path)
    return PartOutcome(
        y0=kept.y0 or 0,
        labels=np.concatenate(kept.labels) if kept.labels else np.zeros((0, 0), np.uint8),
        confidence=np.concatenate(kept.confidence) if kept.confidence else None,
        histogram=stats.confidence_histogram,
        tiles=stats.tiles,
    )


def committed_output(
    section: SectionInput, segmenter: Segmenter, options: SegmentOptions, output: Path, run_id: str
) -> SectionResult | None:
    """The section's output this run committed already (its `thinseg_run` attribute is
    `run_id`), read back as a result: a task run again after its worker died between the commit
    and the client hearing of it. None when this run has not written the section."""
    start = time.perf_counter()
    target = output_paths(section, output, options.overwrite, is_single_file(output))
    found = None
    for n in range(1 if options.overwrite else MAX_NUMBERED):
        candidate = numbered(target, n)
        if not candidate.exists() and not _overlay_name(candidate).exists():
            break  # commit_unique takes the first number whose names are all free
        with contextlib.suppress(ThinSegError, OSError):
            if candidate.exists() and global_attribute(candidate, RUN_ATTRIBUTE) == run_id:
                found = candidate
                break
    if found is None:
        return None
    base = path_text(section_base_name(section, options.pp_pattern))
    labels, _table, mm_per_pixel, _origin = read_labelmap(found, f"{base}_Segmentation")
    bundle = segmenter.bundle
    assert mm_per_pixel is not None  # our outputs always record their grid
    overlay = _overlay_name(found)
    return SectionResult(
        section=section,
        netcdf=found,
        overlay=overlay if options.overlay and overlay.exists() else None,
        mineralogy=modal_mineralogy(path_text(section.name), labels, bundle.class_table, mm_per_pixel),
        seconds=time.perf_counter() - start,
        tiles=0,
        megapixels=labels.size / 1e6,
        messages=[f"{section.name}: written before its worker was lost; result read back from {found.name}"],
    )


# -- the client side ------------------------------------------------------------------------------


class SharedSectionStreamer:
    """Makes one section's labels from parts run on the cluster and hands them to the section's
    sink in order (a `SectionStreamer` for `segment_section`), copying the input images into the
    output while it waits."""

    def __init__(self, client: Client, section: SectionInput, options: SegmentOptions, model_dir: Path) -> None:
        self.client, self.section, self.options, self.model_dir = client, section, options, model_dir
        self.threads = max(1, sum(client.nthreads().values()))
        self.in_flight = self.threads + EXTRA_PARTS_IN_FLIGHT
        #: how many parts the last section was shared into
        self.parts = 0

    def __call__(
        self,
        segmenter: Segmenter,
        sources: Sequence[Source],
        factor: Factor | None,
        sink: RowSink,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> RunStats:
        start = time.perf_counter()
        shape = (int(sources[0].shape[0]), int(sources[0].shape[1]))
        run_shape = shape if factor is None else ResampledSource(sources[0], factor).shape
        plan = segmenter.plan_for(*run_shape)
        stride = plan.ys[1] - plan.ys[0] if len(plan.ys) > 1 else plan.tile_h
        rows = part_rows(self.options.band_rows, run_shape[0], self.threads)
        parts = tile_row_groups(len(plan.ys), max(1, round(rows / max(stride, 1))))
        self.parts = len(parts)
        target: RowSink = sink if factor is None else GridSink(sink, shape, run_shape)
        copying = [s for s in sources if isinstance(s, CopyingSource)]
        histogram = np.zeros(CONFIDENCE_BINS, np.int64)
        tiles = 0
        futures: list[Future[PartOutcome]] = []
        key = uuid.uuid4().hex

        def submit(i: int) -> None:
            futures.append(
                self.client.submit(
                    band_task,
                    self.section,
                    self.options,
                    self.model_dir,
                    factor,
                    parts[i],
                    key=f"thinseg-part-{i}-{key}",
                    pure=False,
                )
            )

        try:
            for i in range(min(self.in_flight, len(parts))):
                submit(i)
            for i in range(len(parts)):
                future = futures[i]
                while not future.done() and _copy_ahead(copying):
                    if cancel is not None and cancel():
                        raise Cancelled()
                outcome = _part_result(future, self.section)
                if i + self.in_flight < len(parts):
                    submit(i + self.in_flight)
                assert outcome.labels is not None
                target.write_rows(outcome.y0, outcome.labels, outcome.confidence)
                if outcome.histogram is not None:
                    histogram += outcome.histogram
                tiles += outcome.tiles
                if progress is not None:
                    progress(i + 1, len(parts))
                if cancel is not None and cancel():
                    raise Cancelled()
        finally:
            self.client.cancel([f for f in futures if not f.done()])
        return RunStats(
            shape=run_shape,
            tiles=tiles,
            seconds=time.perf_counter() - start,
            device=f"cluster ({len(parts)} parts)",
            messages=list(segmenter.messages),
            confidence_histogram=histogram,
        )


def _copy_ahead(sources: Sequence[CopyingSource]) -> bool:
    """Copy the next rows of every image the output keeps; False once all are copied."""
    copied = [source.copy_ahead() for source in sources]
    return any(copied)


def _part_result(future: Future[PartOutcome], section: SectionInput) -> PartOutcome:
    """A part's outcome; its failure (or its task's loss) fails the section in one line."""
    try:
        outcome: PartOutcome = future.result()
    except Exception as error:  # the task itself was lost (its workers died) or failed to run
        raise ThinSegError(_lost_task(error), section.primary) from None
    if outcome.problem is not None:
        raise ThinSegError(outcome.problem, outcome.path or section.primary)
    return outcome


def shares_sections(options: SegmentOptions, sections: int, worker_threads: int) -> bool:
    """Whether the batch's sections are each shared by several workers: when `band_rows` is given
    (not 0), or by default when there are fewer sections than worker threads."""
    if options.band_rows is not None:
        return options.band_rows > 0
    return sections < worker_threads


def part_rows(band_rows: int | None, height: int, worker_threads: int) -> int:
    """Rows of a section per part: `band_rows` when given, else the section split evenly over
    the worker threads, in parts of at least MIN_BAND_ROWS."""
    if band_rows:
        return band_rows
    return max(MIN_BAND_ROWS, -(-height // max(1, worker_threads)))


def segment_on_cluster(
    inputs: Sequence[str | Path],
    options: SegmentOptions,
    output: Path,
    model_dir: Path | None = None,
    *,
    on_start: Callable[[SegmentRun], None] | None = None,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
    on_result: Callable[[SectionResult], None] | None = None,
    on_failure: Callable[[SectionInput, ThinSegError], None] | None = None,
) -> SegmentRun:
    """`segment_files` with every section one task on the cluster `options.cluster`.

    The client loads the model's description to pair and plan the inputs but builds no
    Segmenter (`run.segmenter` stays None): the workers do. `progress` is called once, for all
    sections, and its callback gets (sections done, sections planned). Results are passed to
    `on_result` as sections finish and listed in input order; a failed section is reported
    and the others finish."""
    spec = options.cluster or "local:1"
    parse_cluster(spec)  # a bad value is refused before the model is read
    _distributed()
    run = prepare_run(inputs, options, output, model_dir)
    if not run.sections:
        return run
    folder = output.parent if is_single_file(output) else output
    notes = sweep_stale_temporaries(folder).notes(folder)
    planned, run.failures = plan_batch(run.sections, options, run.bundle, output, on_failure)
    if on_start is not None:
        on_start(run)
    run_id = uuid.uuid4().hex
    done: dict[int, SectionResult] = {}
    try:
        with connect(spec) as client:
            batch = _Batch(
                client, planned, options, output, run, done, list(notes), progress, cancel, on_result, on_failure
            )
            if shares_sections(options, len(planned), sum(client.nthreads().values())):
                _run_shared(batch)
            else:
                _run_tasks(batch, run_id)
    finally:
        sweep_stale_temporaries(folder)  # what workers killed mid-section left
    run.results = [done[k] for k in sorted(done)]
    if run.results:
        run.mineralogy_csv = write_modal_mineralogy(run.results, output, options.overwrite)
    return run


@dataclass
class _Batch:
    """A batch on the cluster: what the client reports as sections finish, whichever way they run."""

    client: Client
    planned: Sequence[SectionInput]
    options: SegmentOptions
    output: Path
    run: SegmentRun
    done: dict[int, SectionResult]
    pending_notes: list[str]  # the run's notes, told with the first result
    progress: ProgressFactory | None
    cancel: CancelFn | None
    on_result: Callable[[SectionResult], None] | None
    on_failure: Callable[[SectionInput, ThinSegError], None] | None
    finished: int = 0
    _update: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        if self.progress is not None and self.planned:
            self._update = self.progress(f"{len(self.planned)} sections", 0)

    @property
    def model_dir(self) -> Path:
        return Path(os.path.abspath(self.run.model_dir))

    def succeeded(self, k: int, result: SectionResult, messages: Sequence[str] = ()) -> None:
        result.messages = self.pending_notes + list(messages) + result.messages
        self.pending_notes = []
        self.done[k] = result
        if self.on_result is not None:
            self.on_result(result)
        self._tick()

    def failed(self, section: SectionInput, failure: ThinSegError) -> None:
        self.run.failures.append((section, failure))
        if self.on_failure is not None:
            self.on_failure(section, failure)
        self._tick()

    def _tick(self) -> None:
        """One more section finished: the bar moves, and a cancel request stops the batch."""
        self.finished += 1
        if self._update is not None:
            self._update(self.finished, len(self.planned))
        if self.cancel is not None and self.cancel():
            raise Cancelled()


def _run_tasks(batch: _Batch, run_id: str) -> None:
    """Every section one task, results taken as they come."""
    from distributed import as_completed  # deferred: optional extra, present once connected

    futures: dict[Future[TaskOutcome], int] = {}
    for k, section in enumerate(batch.planned):
        key = f"thinseg-segment-{k}-{run_id}"
        args = (section, batch.options, batch.output, batch.model_dir, run_id)
        futures[batch.client.submit(segment_task, *args, key=key, pure=False)] = k
    shown = set(batch.pending_notes)
    try:
        for future in as_completed(list(futures)):
            k = futures[future]
            section = batch.planned[k]
            try:
                outcome: TaskOutcome = future.result()
            except Exception as error:  # the task itself was lost (its workers died) or failed to run
                outcome = TaskOutcome(problem=_lost_task(error), path=section.primary)
            new = [m for m in outcome.segmenter_messages if m not in shown]
            shown.update(new)
            if outcome.result is not None:
                batch.succeeded(k, outcome.result, new)
            else:
                batch.failed(section, ThinSegError(outcome.problem or "failed", outcome.path or section.primary))
    finally:
        batch.client.cancel([f for f in futures if not f.done()])


def _run_shared(batch: _Batch) -> None:
    """The sections one after another, each shared by the cluster's workers (`SharedSectionStreamer`);
    the client, which writes the outputs, builds a Segmenter of its own only for the tile plan."""
    segmenter = Segmenter(batch.run.bundle, batch.options.inference)
    for k, section in enumerate(batch.planned):
        streamer = SharedSectionStreamer(batch.client, section, batch.options, batch.model_dir)
        result, failure = run_section(
            section, segmenter, batch.options, batch.output, cancel=batch.cancel, streamer=streamer
        )
        if result is not None:
            parts = f"{streamer.parts} part" + ("s" if streamer.parts != 1 else "")
            result.messages.append(f"{section.name}: shared by the cluster's workers in {parts}")
            batch.succeeded(k, result)
        else:
            assert failure is not None
            if isinstance(failure.__cause__, Cancelled):
                raise Cancelled()
            batch.failed(section, failure)


def _lost_task(error: Exception) -> str:
    """One line for a task that did not come back (not a section's own problem)."""
    detail = str(error).splitlines()[0] if str(error) else ""
    if type(error).__name__ == "KilledWorker":
        return "the workers running it died (out of memory?); the section was not written"
    return f"its task failed on the cluster: {type(error).__name__}: {detail}".rstrip(": ")
