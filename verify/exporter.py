"""The metrics endpoint: ``shardvault exporter`` serves ``/metrics`` over HTTP.

It needs only the configuration and the state directory (no passphrase, no
peer): the state database holds every fact it reports.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app

from shardvault.config import Config
from shardvault.errors import RepositoryNotFoundError
from shardvault.state import State

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


def registry_for(config: Config, state: State) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(config, state))
    return registry


def render(config: Config, state: State) -> bytes:
    """The exposition text, as a scrape would get it."""
    return generate_latest(registry_for(config, state))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def make_exporter(config: Config, state: State, host: str, port: int) -> WSGIServer:
    """A bound HTTP server for /metrics (port 0 picks a free one); call serve_forever()."""
    return make_server(host, port, make_wsgi_app(registry_for(config, state)), handler_class=_QuietHandler)
