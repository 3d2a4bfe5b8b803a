"""The plugin's metrics, named in Prometheus style, computed from plain values.

Orthanc lists what plugins set with `SetMetricsValue` in `/tools/metrics-prometheus` next to
its own metrics, verbatim: a name may carry labels (`name{label="value"}`). The python plugin
has no callback for "metrics are being read", so `MetricsPublisher` sets them from its own
thread every few seconds, and at once when `wake()` is called after a change. README
"Metrics" lists them; the values are floats (Orthanc keeps them as 32-bit floats).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..forwarding.health import Health, Snapshot, State
from ..state.backend import RuleStoreApi
from ..state.outbox import Outbox
from ..state.rule_store import ShareCounts
from ..state.store_health import StoreHealth
from .stats import TransferSnapshot, TransferStats

log = logging.getLogger(__name__)

QUEUE_STATES = ("pending", "inflight", "failed")
SHARE_STATES = ("shared", "pending", "failed")


@dataclass(frozen=True)
class RuleFigures:
    """What the metrics show of one switching rule."""

    name: str
    shared: int
    pending: int
    failed: int
    failing: bool


def labelled(name: str, **labels: str) -> str:
    """`name{label="value",...}`, with values escaped as the Prometheus text format wants."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metric_values(
    *,
    queue: Mapping[str, int],
    retries: int,
    transfer: TransferSnapshot,
    health: Snapshot,
    rules: Iterable[RuleFigures],
    now: float,
    store_writable: bool = True,
) -> dict[str, float]:
    """Every metric's value; counters count since the plugin started unless said otherwise."""
    values: dict[str, float] = {}
    for state in QUEUE_STATES:
        values[labelled("kheops_queue_instances", state=state)] = queue.get(state, 0)
    values["kheops_instances_sent_total"] = transfer.sent
    values["kheops_instances_failed_total"] = transfer.failed
    values["kheops_instances_retried_total"] = retries  # kept in the outbox: survives restarts
    values["kheops_instances_deleted_unsent_total"] = queue.get("deleted", 0)  # kept, too
    values["kheops_state_writable"] = int(store_writable)
    for code, count in sorted(transfer.stow_requests.items()):
        values[labelled("kheops_stow_requests_total", code=code)] = count
    values["kheops_stow_request_duration_seconds_sum"] = transfer.stow_seconds
    values["kheops_stow_request_duration_seconds_count"] = sum(transfer.stow_requests.values())
    values["kheops_stow_sent_bytes_total"] = transfer.stow_bytes
    # Until a first instance goes through, count from the start: an alert on "nothing sent
    # for 15 minutes" then also fires for a plugin that never managed to send anything.
    last = transfer.last_sent_at if transfer.last_sent_at is not None else transfer.started_at
    values["kheops_last_send_age_seconds"] = max(0.0, now - last)
    values["kheops_token_accepted"] = 0 if health.state is State.PAUSED else 1
    for kind in State:
        values[labelled("kheops_state", state=kind.value)] = int(health.state is kind)
    for rule in rules:
        for state in SHARE_STATES:
            values[labelled("kheops_rule_shares", rule=rule.name, state=state)] = getattr(
                rule, state
            )
        values[labelled("kheops_rule_failing", rule=rule.name)] = int(rule.failing)
    return values


def rule_figures(store: RuleStoreApi, failing: Mapping[str, str]) -> list[RuleFigures]:
    """The share counts of every rule in the store, and whether it is failing."""
    counts = store.counts()
    figures = []
    for stored in store.rules():
        count = counts.get(stored.name, ShareCounts())
        figures.append(
            RuleFigures(
                name=stored.name,
                shared=count.shared,
                pending=count.pending,
                failed=count.failed,
                failing=stored.name in failing,
            )
        )
    return figures


class MetricsCollector:
    """Gathers the values from the live objects; a vanished rule's metrics go to 0 once.

    Orthanc cannot forget a metric, so the series of a deleted rule would otherwise keep
    showing its last counts.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        stats: TransferStats,
        health: Health,
        rules: Callable[[], Iterable[RuleFigures]] = lambda: (),
        clock: Callable[[], float] = time.time,
        store_health: StoreHealth | None = None,
    ) -> None:
        self._outbox = outbox
        self._stats = stats
        self._health = health
        self._rules = rules
        self._clock = clock
        self._store_health = store_health or StoreHealth()
        self._seen: set[str] = set()

    def values(self) -> dict[str, float]:
        retries = self._outbox.get_meta("retries")
        values = metric_values(
            queue=self._outbox.counts(),
            retries=retries if isinstance(retries, int) else 0,
            transfer=self._stats.snapshot(),
            health=self._health.snapshot(),
            rules=self._rules(),
            now=self._clock(),
            store_writable=self._store_health.problem is None,
        )
        current = set(values)
        for gone in self._seen - current:
            values[gone] = 0
        self._seen = current
        return values


class MetricsPublisher:
    """Sets every metric through `publish` every `period` seconds, from its own thread.

    `publish` is the shell's bridge to Orthanc's metrics, given each value as collected (an
    int stays an int). A failing round is logged once per kind of failure and never stops
    the thread.
    """

    def __init__(
        self,
        collect: Callable[[], Mapping[str, float]],
        publish: Callable[[str, float], None],
        *,
        period: float = 5.0,
    ) -> None:
        self._collect = collect
        self._publish = publish
        self._period = period
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_problem: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kheops-metrics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Something changed (a retry, a backfill, a rule): publish now rather than later."""
        self._wake.set()

    def publish_once(self) -> None:
        try:
            for name, value in self._collect().items():
                self._publish(name, value)
        except Exception as exc:  # noqa: BLE001 -- a metrics round must never end the thread
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._last_problem:
                log.warning("cannot publish the metrics now: %s", problem)
            self._last_problem = problem
        else:
            self._last_problem = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.publish_once()
            self._wake.wait(self._period)
            self._wake.clear()
