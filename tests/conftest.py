"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
from _vision_stub import VisionStub, serve


@pytest.fixture()
def vision_stub():
    """(stub, base_url) of a local OpenAI-compatible vision endpoint, shut down after the test."""
    stub = VisionStub()
    server = serve(stub)
    yield stub, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
