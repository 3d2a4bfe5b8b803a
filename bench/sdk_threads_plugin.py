"""Loaded by Orthanc's Python plugin in `python -m bench.sdk_threads`, never by the product.

Calls the SDK the way the variant named in SDK_THREADS_VARIANT says, while the driver stores
instances, and counts the calls that returned: a count that stops moving while stores hang
is a deadlock.
"""

# ruff: noqa: BLE001

import json
import os
import threading
import time
from typing import Any

import orthanc as _orthanc

# Calls outside the shell's typed stub (typings/orthanc.pyi): this file is an experiment.
orthanc: Any = _orthanc

VARIANT = os.environ.get("SDK_THREADS_VARIANT", "none")
THREADS = 4
counts = {"calls": 0, "errors": 0, "stored": 0}
lock = threading.Lock()
seen: list[str] = []


def count(key: str) -> None:
    with lock:
        counts[key] += 1


def on_stored(dicom: object, instance_id: str) -> None:
    count("stored")
    with lock:
        seen.append(instance_id)
    if VARIANT == "get-in-store-callback":
        orthanc.RestApiGet(f"/instances/{instance_id}")
        count("calls")
    elif VARIANT == "file-in-store-callback":
        orthanc.RestApiGet(f"/instances/{instance_id}/file")
        count("calls")


def one_call(instance_id: str) -> None:
    if VARIANT == "thread-get-file":
        orthanc.RestApiGet(f"/instances/{instance_id}/file")
    elif VARIANT == "thread-get-changes":
        orthanc.RestApiGet("/changes?limit=100")
    elif VARIANT == "thread-dicom-for-instance":
        orthanc.GetDicomForInstance(instance_id)
    elif VARIANT == "thread-put-metadata":
        orthanc.RestApiPut(f"/instances/{instance_id}/metadata/1025", b"x")
    elif VARIANT == "thread-modify":
        body = json.dumps({"Replace": {"PatientName": "COPY"}, "Force": True}).encode()
        orthanc.RestApiPost(f"/instances/{instance_id}/modify", body)
    elif VARIANT == "thread-store":
        body = json.dumps({"Replace": {"PatientName": "COPY"}, "Force": True}).encode()
        orthanc.RestApiPost(
            "/instances", orthanc.RestApiPost(f"/instances/{instance_id}/modify", body)
        )
    elif VARIANT == "thread-delete":
        orthanc.RestApiDelete(f"/instances/{instance_id}")


def work(index: int) -> None:
    position = index
    while True:
        with lock:
            ready = position < len(seen)
            instance_id = seen[position] if ready else None
        if instance_id is None:
            time.sleep(0.005)
            continue
        position += THREADS
        try:
            one_call(instance_id)
            count("calls")
        except Exception:
            count("errors")


def on_change(change_type: int, level: int, resource_id: str) -> None:
    if change_type == orthanc.ChangeType.ORTHANC_STARTED and VARIANT.startswith("thread-"):
        for index in range(THREADS):
            threading.Thread(target=work, args=(index,), daemon=True).start()
    if VARIANT == "get-in-change-callback" and change_type == orthanc.ChangeType.NEW_INSTANCE:
        orthanc.RestApiGet(f"/instances/{resource_id}/file")
        count("calls")


def on_rest(output: Any, uri: str, **request: object) -> None:
    with lock:
        document = json.dumps({**counts, "variant": VARIANT})
    output.AnswerBuffer(document, "application/json")


orthanc.RegisterOnStoredInstanceCallback(on_stored)
orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/sdk-threads/counts", on_rest)
