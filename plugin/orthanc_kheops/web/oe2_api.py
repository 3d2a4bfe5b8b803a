"""The route Orthanc Explorer 2's custom buttons post to: POST /kheops/oe2/send.

OE2 fills a button's `Payload` template and posts it as JSON: `"{UUID}"` becomes the Orthanc
id of the study or series shown (a string), `"{JsonArrayUUIDs}"` the list of the studies
selected in the study list, `"{CommaSeparatedUUIDs}"` the same list as one string, and a
placeholder an OE2 version does not know becomes the string "undefined". This route takes
each of these shapes for `Resources` and sends what it names, like POST /kheops/send.

OE2 shows the button's `StartMessage` when it posts and does not show the answer, so the
answer is the plugin's usual JSON, with a `Message` in words for whoever reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .forwarding_api import ForwardingApi
from .routing import HttpError, Request, Response, Router, json_object


def resources_of(payload: object) -> list[str]:
    """The Orthanc ids of an OE2 payload's `Resources`: a list, one id, or ids joined by commas."""
    if isinstance(payload, str):
        ids = [part.strip() for part in payload.split(",")]
    elif isinstance(payload, list) and all(isinstance(item, str) for item in payload):
        ids = [item.strip() for item in payload]
    else:
        raise HttpError(
            400,
            'Resources: must be an Orthanc id, ids separated by commas, or a list of ids (OE2\'s "{UUID}" or "{JsonArrayUUIDs}")',
            field="Resources",
        )
    ids = [i for i in ids if i]
    if not ids:
        raise HttpError(400, "Resources: no study is selected", field="Resources")
    if "undefined" in ids:
        raise HttpError(
            400,
            "Resources: OE2 sent 'undefined': this OE2 version does not know the placeholder"
            ' of the button\'s Payload; use "{UUID}" on a study or series, "{JsonArrayUUIDs}"'
            " on bulk-studies",
            field="Resources",
        )
    return ids


class Oe2Api:
    def __init__(self, forwarding: ForwardingApi) -> None:
        self._forwarding = forwarding

    def register(self, router: Router) -> None:
        router.add("POST", "oe2/send", self.send)

    def send(self, request: Request, _: Sequence[str]) -> Response:
        ids = resources_of(json_object(request).get("Resources"))
        body = json.dumps({"Resources": ids}).encode()
        answer = self._forwarding.send(Request("POST", "send", body=body), ())
        queued = answer.body["Queued"] if isinstance(answer.body, dict) else 0
        return Response(
            200,
            {
                "Queued": queued,
                "Resources": len(ids),
                "Message": f"{queued} instance{'' if queued == 1 else 's'} queued for KHEOPS",
            },
        )
