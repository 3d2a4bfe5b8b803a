"""The /kheops/... REST routes for forwarding: status, queue, retry and backfill."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from ..config import KheopsConfig
from ..forwarding.forwarder import Forwarder
from ..observability.masking import excerpt
from ..orthanc_rest import OrthancNotFound, OrthancRest, OrthancUnavailable, StoredInstance
from ..state.outbox import Outbox
from .routing import HttpError, Request, Response, Router, json_object, orthanc_ids

_QUEUE_STATES = ("pending", "failed", "sent")
_DEFAULT_PAGE = 100
_MAXIMUM_PAGE = 1000
_MAXIMUM_OFFSET = 1_000_000_000  # far above any queue, far below SQLite's 64-bit integers


_NODE_TIMES = frozenset({"StartedAt", "LastSeen", "LastSentAt"})


def _node_view(node: Mapping[str, object]) -> dict[str, object]:
    return {
        key: iso(value) if key in _NODE_TIMES and isinstance(value, float) else value
        for key, value in node.items()
    }


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


class ForwardingApi:
    def __init__(
        self,
        config: KheopsConfig,
        *,
        outbox: Outbox,
        forwarder: Forwarder,
        orthanc: OrthancRest,
        rules_summary: Callable[[], object] | None = None,
        nodes: Callable[[], list[dict[str, object]]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._rules_summary = rules_summary
        self._nodes = nodes
        self._outbox = outbox
        self._forwarder = forwarder
        self._orthanc = orthanc
        self._clock = clock

    def register(self, router: Router) -> None:
        router.add("GET", "status", self.status)
        router.add("GET", "queue", self.queue)
        router.add("POST", "queue/retry", self.retry)
        router.add("POST", "send", self.send)

    def status(self, request: Request, _: Sequence[str]) -> Response:
        return Response(200, self.status_document())

    def status_document(self) -> dict[str, object]:
        health = self._forwarder.health.snapshot()
        counts = self._outbox.counts()
        introspection = self._forwarder.introspection
        per_second, bytes_per_second = self._forwarder.throughput()
        store_problem = self._forwarder.store_health.problem
        document: dict[str, object] = {
            "Url": self._config.url,
            "Token": self._config.token.masked,
            "Enabled": self._config.enabled,
            "AlbumId": introspection.album_id if introspection else None,
            "Permissions": sorted(introspection.scopes) if introspection else None,
            "TokenActive": introspection.active if introspection else None,
            "State": health.state.value,
            "StateDetail": health.detail,
            "Since": iso(health.since),
            "Counts": {
                "Queued": counts["pending"],
                "InFlight": counts["inflight"],
                "Sent": counts["sent"],
                "Failed": counts["failed"],
                "DeletedBeforeSent": counts["deleted"],
                "Retries": self._outbox.get_meta("retries") or 0,
            },
            # A write to the queue failing (a full disk): nothing is lost, the write is retried.
            "StoreError": None
            if store_problem is None
            else {"Error": store_problem.error, "Since": iso(store_problem.since)},
            "LastError": health.last_error,
            "LastErrorAt": iso(health.last_error_at),
            "LastSuccessAt": iso(health.last_success_at),
            "Throughput": {
                "InstancesPerSecond": round(per_second, 2),
                "MegabytesPerSecond": round(bytes_per_second / 1e6, 2),
                "WindowSeconds": 60,
            },
        }
        if self._rules_summary is not None:
            document["SwitchingAlbums"] = self._rules_summary()
        if self._nodes is not None:
            document["Nodes"] = [_node_view(node) for node in self._nodes()]
        return document

    def queue(self, request: Request, _: Sequence[str]) -> Response:
        state = request.query.get("state", "pending")
        if state not in _QUEUE_STATES:
            raise HttpError(
                400,
                f"state: {excerpt(state)} is not one of {', '.join(_QUEUE_STATES)}",
                field="state",
            )
        limit = _integer(request, "limit", _DEFAULT_PAGE, maximum=_MAXIMUM_PAGE)
        offset = _integer(request, "offset", 0, maximum=_MAXIMUM_OFFSET)
        entries = self._outbox.entries(state, limit=limit, offset=offset)
        total = self._outbox.counts()[state]
        return Response(
            200,
            {
                "State": state,
                "Total": total,
                "Offset": offset,
                "Instances": [_entry_json(e.as_json()) for e in entries],
            },
        )

    def retry(self, request: Request, _: Sequence[str]) -> Response:
        ids = orthanc_ids(json_object(request), "Instances", required=False)
        moved = self._outbox.retry_failed(ids, now=self._clock())
        self._forwarder.check_token_now()
        self._forwarder.wake()
        return Response(200, {"Retried": moved})

    def send(self, request: Request, _: Sequence[str]) -> Response:
        resources = orthanc_ids(json_object(request), "Resources", required=True) or []
        if not resources:
            raise HttpError(400, "Resources: must list at least one Orthanc id", field="Resources")
        instances: dict[str, StoredInstance] = {}
        for orthanc_id in resources:
            try:
                level = self._orthanc.resource_level(orthanc_id)
                found = self._orthanc.instances_of(level, orthanc_id)
            except OrthancNotFound:
                raise HttpError(
                    404, f"unknown Orthanc id {orthanc_id!r}", field="Resources"
                ) from None
            except OrthancUnavailable as exc:
                raise HttpError(503, f"Orthanc did not answer: {exc}") from None
            instances.update({i.orthanc_id: i for i in found})
        self._outbox.enqueue(
            [(i.orthanc_id, i.size) for i in instances.values()],
            now=self._clock(),
            requeue=True,
            files=self._orthanc.locate(instances),
        )
        self._forwarder.wake()
        return Response(200, {"Queued": len(instances)})


def _integer(request: Request, name: str, default: int, *, maximum: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    # isdigit() takes other scripts' digits too ('٣', '²'); only ASCII digits are a number here.
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) > maximum:
        raise HttpError(
            400, f"{name}: {excerpt(text)} is not a whole number from 0 to {maximum}", field=name
        )
    return int(text)


def _entry_json(entry: dict[str, object]) -> dict[str, object]:
    for key in ("QueuedAt", "NextAttempt", "DoneAt"):
        value = entry.get(key)
        entry[key] = iso(value) if isinstance(value, float | int) else None
    return entry
