"""Keeping the cyclic GC out of loop-responsiveness checks."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fixtures_frozen() -> Iterator[None]:
    """Take the module fixtures' large pydicom heap out of the cyclic GC for a latency measurement.

    A full collection over it stalls every thread for 50-150 ms on the test VM; that pause is the
    test harness's, not the gateway's, and would drown the thing measured: whether DICOM I/O ever
    runs on the event loop.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
