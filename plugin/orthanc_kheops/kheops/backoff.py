"""The one retry policy: exponential backoff with jitter.

Attempt 1 waits about `initial`, each further attempt doubles it up to
`maximum`; the jitter spreads the retries of many instances that failed
together, so a KHEOPS coming back is not hit by all of them at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def next_delay(
    attempt: int,
    *,
    initial: float,
    maximum: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the `attempt`-th failure (1-based): between half and all of the cap."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    ceiling = min(maximum, initial * 2.0 ** min(attempt - 1, 62))
    return ceiling / 2 + rand() * ceiling / 2
