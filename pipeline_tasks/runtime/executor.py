"""The local shard executor: one lifecycle and one failure contract for every stage.

A stage is a :class:`ShardStage`: ``setup`` once per worker (load a model, open a KB),
``process`` one shard (publish its outputs, fill its stats), ``teardown``. :func:`run_shards`

1. skips the shards whose done marker exists, so every run is also a resume;
2. runs the rest inline (one worker) or in spawned worker processes, dealing shards
   dynamically (the next shard to the next free worker) or, for a stage that streams
   across its shards (one scoring worker per device), statically (``todo[rank::workers]``);
3. writes the running, done and failed markers around each shard;
4. turns a worker that dies into failed markers for the shards it had not finished;
5. returns a :class:`StageResult` listing the failed shards. It never raises for a failed
   shard: the caller decides (the CLI exits 1, ``build-i2e`` stops, an Airflow task fails
   and is retried). A worker whose ``setup`` fails on configuration (a missing checkpoint,
   an unknown model) raises that error here instead: no shard was attempted.

Spark stages (ner, vocab) run their shards in Spark executors instead (``runtime.spark``)
and report through the same markers and the same :class:`StageResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

from training.core.config import ConfigError
from training.core.lease import Lease
from training.core.process import die_with_parent

from .markers import MarkerStore, ShardBusy, ShardRun, ShardStats, verify_done

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """Some shards of a stage failed; their failed markers hold the errors."""


@dataclasses.dataclass
class StageResult:
    """What one call of a stage did. ``failed`` lists every planned shard left failed."""

    stage: str
    out: str
    shards: int = 0  # planned
    processed: int = 0  # attempted by this call
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    # shards another live run is processing right now (not failed, not done either)
    busy: dict[str, str] = dataclasses.field(default_factory=dict)
    redone: dict[str, str] = dataclasses.field(default_factory=dict)  # done markers that lied
    skipped_shards: dict[str, str] = dataclasses.field(default_factory=dict)  # bad input
    # shards whose outputs were copied from an earlier build (runtime.reuse) -> its label
    reused: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.busy

    def raise_if_failed(self) -> None:
        if self.failed:
            first = dict(list(self.failed.items())[:3])
            raise StageFailed(
                f"{self.stage} failed on {len(self.failed)} shard(s): {first}; "
                f"see `mofi status {self.out}`, fix the cause and re-run (done shards are kept)"
            )
        if self.busy:
            first = dict(list(self.busy.items())[:3])
            raise StageFailed(
                f"{self.stage}: {len(self.busy)} shard(s) are being processed by another run "
                f"({first}); wait for it and re-run"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        # a count, not a list: a rebuild of 100,000 shards reuses most of them
        d["reused"] = len(self.reused)
        return d

    def __getitem__(self, key: str) -> Any:
        """The JSON view's keys (``result["images"]``), as the CLI prints them."""
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclasses.dataclass
class ShardTask:
    """One shard to process: its id, its size for the progress bar, its inputs (URIs)."""

    shard: str
    units: int = 0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ShardOutcome:
    shard: str
    units: int = 0
    error: str | None = None
    busy: str | None = None  # another live process holds the shard


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class ShardStage:
    """A stage's per-worker lifecycle. Subclasses are picklable (configs and URIs only)."""

    name = "stage"
    unit = "shard"
    # True: a worker gets its whole share at once and streams across shards (process_all is
    # overridden); the shards are then dealt statically.
    streams_shards = False
    # True: always run in a fresh spawned process, even for one worker (keeps the worker's
    # memory its own, and a parent with threads can never deadlock a fork).
    isolated = False

    def setup(self, worker: int, workers: int) -> None:
        """Once per worker, before its first shard."""

    def process(self, task: ShardTask, stats: ShardStats) -> None:
        """Publish ``task``'s outputs and fill ``stats``; raise to fail the shard alone."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Once per worker, after its last shard."""

    def report(self) -> dict[str, Any]:
        """This worker's summary (timings, memory), merged by :meth:`summarize`."""
        return {}

    def summarize(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def process_all(self, tasks: Iterable[ShardTask], store: MarkerStore) -> Iterator[ShardOutcome]:
        for task in tasks:
            run = ShardRun(store, task.shard, claim=True)
            try:
                with run:
                    self.process(task, run.stats)
            except ShardBusy as exc:  # another run has it: not ours to do, not a failure
                yield ShardOutcome(task.shard, 0, busy=str(exc))
                continue
            except Exception as exc:  # the failed marker holds it; the other shards go on
                log.error("%s shard %s failed: %s", self.name, task.shard, exc)
                yield ShardOutcome(task.shard, task.units, error_text(exc))
                continue
            yield ShardOutcome(task.shard, task.units or run.stats.n_in)


def _queue_tasks(q) -> Iterator[ShardTask]:
    while True:
        task = q.get()
        if task is None:
            return
        yield task


def _worker_main(stage: ShardStage, rank: int, world: int, store_args, tasks, task_q, out_q):
    die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    store = MarkerStore(*store_args)
    try:
        stage.setup(rank, world)
    except BaseException as exc:
        config = isinstance(exc, (ConfigError, FileNotFoundError))
        out_q.put(("setup_error", rank, "config" if config else "error", error_text(exc)))
        raise
    try:
        for outcome in stage.process_all(
            tasks if tasks is not None else _queue_tasks(task_q), store
        ):
            out_q.put(("outcome", outcome))
        out_q.put(("report", rank, stage.report()))
    except BaseException as exc:
        out_q.put(("crash", rank, error_text(exc)))
        raise
    finally:
        stage.teardown()


def run_shards(
    stage: ShardStage,
    store: MarkerStore,
    tasks: list[ShardTask],
    workers: int,
    *,
    only: Iterable[str] | None = None,
    progress: bool = True,
    result: StageResult | None = None,
) -> StageResult:
    """Process the tasks that are not complete (restricted to ``only`` when given): no done
    marker, or one whose outputs no longer match it."""
    from tqdm import tqdm

    t0 = time.time()
    res = result or StageResult(stage=stage.name, out=store.root, shards=len(tasks))
    wanted = set(only) if only is not None else None
    mine = [t for t in tasks if wanted is None or t.shard in wanted]
    todo = pending_tasks(store, mine, res)
    res.processed = len(todo)
    outcomes: dict[str, ShardOutcome] = {}
    reports: list[dict[str, Any]] = []
    if todo:
        bar = tqdm(
            total=sum(t.units for t in todo) or len(todo),
            unit=stage.unit if any(t.units for t in todo) else "shard",
            desc=stage.name,
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            world = max(1, min(workers, len(todo)))
            if world == 1 and not stage.isolated:
                stage.setup(0, 1)
                try:
                    for o in stage.process_all(todo, store):
                        outcomes[o.shard] = o
                        bar.update(o.units or 1)
                    reports.append(stage.report())
                finally:
                    stage.teardown()
            else:
                _run_spawned(stage, store, todo, world, outcomes, reports, bar)
        finally:
            bar.close()
    for t in mine:
        o = outcomes.get(t.shard)
        if o is not None and o.busy:
            res.busy[t.shard] = o.busy
        elif o is not None and o.error:
            res.failed[t.shard] = o.error
    collect_failures(store, [t.shard for t in mine if t.shard not in res.busy], res)
    res.extra.update(stage.summarize(reports) if reports else {})
    res.seconds = round(time.time() - t0, 2)
    return res


def collect_failures(store: MarkerStore, shards: Iterable[str], res: StageResult) -> None:
    """Every planned shard still not done is failed (by this call, an earlier one, or a death),
    with the error its failed marker holds; the one failure contract of every stage."""
    recs = None
    for shard in shards:
        if shard in res.failed or store.is_done(shard):
            continue
        recs = recs if recs is not None else store.read_all()
        res.failed[shard] = recs.get(shard, {}).get("error") or "not finished"


def pending_tasks(store: MarkerStore, tasks: list[ShardTask], res: StageResult) -> list[ShardTask]:
    """The tasks to (re)do: no done marker, or one whose outputs no longer match it (that
    marker is withdrawn and the reason noted in ``res.redone``)."""
    problems = verify_done(store, [t.shard for t in tasks])
    todo = []
    for t in tasks:
        problem = problems.get(t.shard, "no done marker")
        if problem is None:
            continue
        if problem != "no done marker":
            log.warning("%s shard %s is redone: %s", store.stage, t.shard, problem)
            res.redone[t.shard] = problem
            store.unmark_done(t.shard)
        todo.append(t)
    return todo


@contextlib.contextmanager
def stage_lease(store: MarkerStore, only: Iterable[str] | None = None) -> Iterator[None]:
    """One whole-stage run per output root and stage at a time (a second one is refused,
    naming the holder). A run limited to some shards (``only``: an Airflow mapped task) shares
    the stage with its siblings: the per-shard claims keep them apart."""
    if only is not None:
        yield
        return
    lease = Lease(store.lease_uri, what=f"{store.stage} of {store.root}")
    lease.acquire()
    try:
        yield
    finally:
        lease.release()


def _run_spawned(stage, store, todo, world, outcomes, reports, bar) -> None:
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    task_q = None
    if stage.streams_shards:
        shares = [todo[r::world] for r in range(world)]
    else:
        shares = [None] * world
        task_q = ctx.Queue()
        for t in todo:
            task_q.put(t)
        for _ in range(world):
            task_q.put(None)
    store_args = (store.root, store.stage, store.keys)
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(stage, r, world, store_args, shares[r], task_q, out_q),
            name=f"mofi-{stage.name}-{r}",
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    setup_errors: list[tuple[str, str]] = []
    crashes: dict[int, str] = {}
    finished = 0
    try:
        while finished < world:
            try:
                msg = out_q.get(timeout=2.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    # drain what the dead left behind, then stop waiting
                    try:
                        while True:
                            msg = out_q.get(timeout=0.5)
                            _take(msg, outcomes, reports, setup_errors, crashes, bar)
                    except queue.Empty:
                        break
                continue
            if _take(msg, outcomes, reports, setup_errors, crashes, bar):
                finished += 1
    finally:
        for p in procs:
            p.join(timeout=30 if p.is_alive() else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    config_errors = [e for kind, e in setup_errors if kind == "config"]
    if config_errors and not outcomes:  # nothing was attempted: a configuration error
        raise ConfigError(f"{stage.name} workers could not start: {config_errors[0]}")
    # shards of a worker that died: failed, with the reason
    exit_codes = {r: p.exitcode for r, p in enumerate(procs)}
    why = "; ".join(e for _, e in setup_errors) or "; ".join(crashes.values())
    for t in todo:
        if t.shard in outcomes or store.is_done(t.shard):
            continue
        reason = why or f"worker exited with code {sorted(set(exit_codes.values()))}"
        store.mark_failed(t.shard, f"worker died: {reason}", ShardStats())
        outcomes[t.shard] = ShardOutcome(t.shard, 0, f"worker died: {reason}")


def _take(msg, outcomes, reports, setup_errors, crashes, bar) -> bool:
    """Record one worker message; True when it ends that worker's run."""
    kind = msg[0]
    if kind == "outcome":
        o = msg[1]
        outcomes[o.shard] = o
        bar.update(o.units or 1)
        return False
    if kind == "report":
        reports.append(msg[2])
        return True
    if kind == "setup_error":
        setup_errors.append((msg[2], msg[3]))
        return True
    crashes[msg[1]] = msg[2]
    return True
