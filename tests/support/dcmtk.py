"""DCMTK as the independent DICOM peer in tests."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of a DCMTK tool; skip loudly without it, fail under CI where `make test` installs it."""
    path = shutil.which(name)
    if path is None:
        msg = f"DCMTK tool {name!r} not installed (apt-get install dcmtk): interop with a real peer untested"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
