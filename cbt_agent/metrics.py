"""What `/metrics` tells Prometheus, with prometheus-client. One `Metrics` per app (its own
registry: two agents in one process, as in tests, never mix their figures).

Everything is kept current as it happens; a scrape reads numbers, never every task:
- tasks by status: counted at startup from one aggregate query, then moved by each committed
  transition, creation and deletion (the store calls `task_moved`);
- counters: status transitions (from, to), api jobs (api, outcome), Enable's disks (mode,
  full-reason class), inconsistent bitmaps found, bytes of changes handed out, QMP errors
  (error class), webhook deliveries (outcome);
- histograms: how long each operation took (Enable, Disable, Delete, Create, Export, ...);
- gauges read at scrape: api jobs running, exports open (few rows, indexed);
- the standard `process_*` metrics of this process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from cbt_agent.model import TaskStatus
from cbt_agent.reasons import full_reason_class

# the text format every Prometheus (2.x and 3.x) scrapes; our names need none of 1.0's escapes
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# seconds: a Create takes milliseconds, an Enable of many disks with a frozen guest seconds
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# ZStack API name -> the operation label
OPERATIONS: Mapping[str, str] = {
    "CreateCbtTask": "create",
    "EnableCbtTask": "enable",
    "DisableCbtTask": "disable",
    "DeleteCbtTask": "delete",
    "ExportNbdVolumes": "export",
    "UnexportNbdVolumes": "unexport",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self._lock = threading.Lock()
        self._by_status: dict[str, int] = {s.value: 0 for s in TaskStatus}
        self.tasks = Gauge("cbt_agent_tasks", "CBT tasks by status.", ["status"], registry=r)
        for status in self._by_status:
            self.tasks.labels(status).set(0)
        self.transitions = Counter(
            "cbt_agent_status_transitions",
            "Task status transitions (from is empty for a new task).",
            ["from_status", "to_status"],
            registry=r,
        )
        self.jobs = Counter(
            "cbt_agent_api_jobs", "API jobs finished, by API and outcome.", ["api", "outcome"],
            registry=r,
        )  # fmt: skip
        self.jobs_running = Gauge(
            "cbt_agent_jobs_running", "API jobs not finished yet.", registry=r
        )
        self.operation_seconds = Histogram(
            "cbt_agent_operation_seconds",
            "How long each operation took, from its api job's start to its end.",
            ["operation"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.enable_disks = Counter(
            "cbt_agent_enable_disks",
            "Disks exported by Enable, by mode and by the class of the reason for a full "
            "(first, base, missing, inconsistent, new_disk, resized, chain_changed, other).",
            ["mode", "reason"],
            registry=r,
        )
        self.inconsistent_bitmaps = Counter(
            "cbt_agent_inconsistent_bitmaps_found",
            "Bitmaps QEMU reported inconsistent (left by an unclean shutdown).",
            registry=r,
        )
        self.changed_bytes = Counter(
            "cbt_agent_changed_bytes_handed_out",
            "Bytes of changes handed out by incremental Enables.",
            registry=r,
        )
        self.exports_open = Gauge(
            "cbt_agent_exports_open", "Tasks with exports open (Running).", registry=r
        )
        self.qmp_errors = Counter(
            "cbt_agent_qmp_errors",
            "QMP commands that failed, by QMP error class (Interrupted: no reply came).",
            ["error_class"],
            registry=r,
        )
        self.export_breaks = Counter(
            "cbt_agent_export_breaks",
            "Exports broken to spare the guest and the host: cause budget (a disk's scratch "
            "past checkpoints.scratch_budget) or filesystem (down to checkpoints.scratch_reserve).",
            ["cause"],
            registry=r,
        )
        self.scratch_bytes = Gauge(
            "cbt_agent_scratch_bytes", "Bytes the open exports' scratch files take.", registry=r
        )
        self.scratch_budget_bytes = Gauge(
            "cbt_agent_scratch_budget_bytes",
            "Bytes of scratch the open exports may take (their disks' budgets).",
            registry=r,
        )
        self.cut_pause_seconds = Histogram(
            "cbt_agent_cut_pause_seconds",
            "How long a running VM was paused for a checkpoint's cut.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.webhooks = Counter(
            "cbt_agent_webhook_deliveries", "Webhook deliveries, by outcome.", ["outcome"],
            registry=r,
        )  # fmt: skip

    # -- tasks by status: kept current -----------------------------------------------------------

    def tasks_counted(self, by_status: Mapping[str, int]) -> None:
        """The starting point: one aggregate query at startup."""
        with self._lock:
            for status in self._by_status:
                self._by_status[status] = int(by_status.get(status, 0))
                self.tasks.labels(status).set(self._by_status[status])

    def task_moved(self, old: str | None, new: str) -> None:
        """A committed transition: `old` None for a new task, `new` "Deleted" for a deleted
        one (the history's words)."""
        with self._lock:
            for status, delta in ((old, -1), (new, +1)):
                if status in self._by_status:
                    self._by_status[status] += delta
                    self.tasks.labels(status).set(self._by_status[status])
        self.transitions.labels(old or "", new).inc()

    # -- what operations report -----------------------------------------------------------------

    def job_done(self, api: str, outcome: str, seconds: float) -> None:
        self.jobs.labels(api, outcome).inc()
        self.operation_seconds.labels(OPERATIONS.get(api, api)).observe(seconds)

    def enabled(self, disks: Iterable[tuple[str, str | None, int]]) -> None:
        """Enable's disks as (mode, reason for a full, changed bytes)."""
        for mode, reason, changed in disks:
            self.enable_disks.labels(mode, full_reason_class(reason) if reason else "").inc()
            if mode == "incremental":
                self.changed_bytes.inc(changed)

    def qmp_failed(self, error_class: str) -> None:
        self.qmp_errors.labels(error_class).inc()

    def webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def render(
        self, *, jobs_running: int, exports_open: int, scratch: tuple[int, int] = (0, 0)
    ) -> bytes:
        self.jobs_running.set(jobs_running)
        self.exports_open.set(exports_open)
        self.scratch_bytes.set(scratch[0])
        self.scratch_budget_bytes.set(scratch[1])
        return generate_latest(self.registry)
