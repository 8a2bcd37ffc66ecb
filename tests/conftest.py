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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never read or write the user's cache ($CFT_CACHE: generated benchmarks, the demo's starting
    models): a cache of their own, shared by the session."""
    import os

    saved = os.environ.get("CFT_CACHE")
    os.environ["CFT_CACHE"] = str(tmp_path_factory.mktemp("cft_cache"))
    yield
    if saved is None:
        os.environ.pop("CFT_CACHE", None)
    else:
        os.environ["CFT_CACHE"] = saved
