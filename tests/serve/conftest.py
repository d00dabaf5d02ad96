"""The `stack` fixture: an API server over the real controller with scripted workers (`serve_fakes.api_stack`)."""
from __future__ import annotations

import pytest

from tests.support.serve_fakes import api_stack


@pytest.fixture
def stack():
    """build(workers, **APIConfig fields) -> (API test client, FakeHTTP); the controller and API share a secret."""
    return api_stack()
