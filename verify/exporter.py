"""The metrics endpoint: ``shardvault exporter`` serves ``/metrics`` over HTTP.

It needs only the configuration and the state directory (no passphrase, no
peer): the state database holds every fact it reports.  The same server
answers ``/health`` (200, or 503 with one reason a line) and
``/health/detailed`` (JSON, same status) from the same facts (verify/health.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app

from shardvault.config import Config
from shardvault.errors import RepositoryNotFoundError
from shardvault.state import State

from .health import health_app
from .metrics import StateCollector


def find_state(config: Config) -> State:
    """The state of this configuration's repository (the one under its state_dir)."""
    root = config.repository.state_dir
    found = sorted(p.parent for p in root.glob("*/state.db")) if root.is_dir() else []
    if not found:
        raise RepositoryNotFoundError(f"no shardvault state under {root} (run a backup or check first)")
    # Several repositories may share a state_dir; the newest database is the one in use.
    newest = max(found, key=lambda p: (p / "state.db").stat().st_mtime)
    return State(newest.parent, newest.name)


def registry_for(config: Config, state: State, clock: Callable[[], float] = time.time) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(config, state, clock=clock))
    return registry


def render(config: Config, state: State) -> bytes:
    """The exposition text, as a scrape would get it."""
    return generate_latest(registry_for(config, state))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


_REASONS = {200: "200 OK", 503: "503 Service Unavailable"}


def make_app(config: Config, state: State, clock: Callable[[], float] = time.time) -> Callable[..., Iterable[bytes]]:
    """The WSGI application: /health and /health/detailed, and the metrics on every other path."""
    metrics = make_wsgi_app(registry_for(config, state, clock))
    health = health_app(config, state, clock)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO") or "/")
        if path.rstrip("/") not in ("/health", "/health/detailed"):
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        status, content_type, body = health(path)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        start_response(_REASONS[status], headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


def make_exporter(
    config: Config, state: State, host: str, port: int, clock: Callable[[], float] = time.time
) -> WSGIServer:
    """A bound HTTP server for /metrics and /health (port 0 picks a free one); call serve_forever()."""
    return make_server(host, port, make_app(config, state, clock), handler_class=_QuietHandler)
