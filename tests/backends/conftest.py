"""Each module here names its backend (a ``backend_name`` fixture); the plugin's fixtures do the rest.

``server`` is the session's server of that kind (module scope, for module fixtures built on it), ``url`` a
fresh namespace on it and ``open_`` an opener on ``url`` (the plugin's); ``url`` and ``open_`` start the server
again first if an earlier test killed it.
"""

from __future__ import annotations

import pytest

from shardpreempt.testing.fixtures import Servers
from shardpreempt.testing.servers import EphemeralServer


@pytest.fixture(scope="module")
def server(backend_name: str, shardpreempt_servers: Servers) -> EphemeralServer:
    """The session's running server for this module's backend."""
    return shardpreempt_servers.started(backend_name)


@pytest.fixture
def url(backend_url: str) -> str:
    """A URL naming a fresh namespace on the (running) server."""
    return backend_url
