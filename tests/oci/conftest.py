"""Fixtures of the OCI store tests."""

from __future__ import annotations

import pytest

from tests.oci import blob_reading


@pytest.fixture(params=blob_reading.READ_WAYS)
def via(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test reading blobs one way, then the other (see :mod:`tests.oci.blob_reading`)."""
    monkeypatch.setattr(blob_reading, "VIA", request.param)
