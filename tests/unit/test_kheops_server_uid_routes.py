"""The KHEOPS test server's share routes take UIDs of digits and dots only, like KHEOPS's."""

from __future__ import annotations

import pytest
import requests

from tests.kheops_server import KheopsTestServer


@pytest.mark.parametrize("series", ["1.2.3%23x", "1.2.3%2F..%2F4", "1.2.a"])
def test_a_share_path_whose_uid_is_not_digits_and_dots_is_not_found(series: str) -> None:
    with KheopsTestServer() as kheops:
        main = kheops.add_album()
        source = kheops.add_token(album_id=main, scope=("read", "write", "send"))
        destination = kheops.add_token(album_id=kheops.add_album(), scope=("write",))

        answer = requests.put(
            f"{kheops.url}/api/studies/1.2/series/{series}",
            headers={
                "Authorization": f"Bearer {destination}",
                "X-Authorization-Source": f"Bearer {source}",
            },
            timeout=10,
        )

    assert answer.status_code == 404
    assert answer.json()["message"] == "Not Found"
