"""Issue 7, the configuration's part: peers that cannot pretend to be separate,
bad inputs refused by name, a write quorum that survives one dead peer, and a
peer that never answers costing one bounded timeout per run."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import PASSWORD, SMALL, make_tree, toml_value, write_config

from shardvault.cli import main
from shardvault.config import PeerKind, default_write_quorum, load_config
from shardvault.errors import AliasedPeersError, ConfigValueError, PeerUnavailableError
from shardvault.shards.peers import Peer, PeerSet
from shardvault.shards.stores import LocalStore, open_peer_store, open_store

# --- helpers ------------------------------------------------------------------------


def _cli(config: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(config), *args], env={"SHARDVAULT_PASSWORD": PASSWORD})


def _peers_toml(peers: list[dict[str, Any]]) -> str:
    out = []
    for peer in peers:
        out.append("[[peers]]")
        out += [f"{key} = {value if isinstance(value, float) else toml_value(value)}" for key, value in peer.items()]
    return "\n".join(out) + "\n"


def _config(tmp_path: Path, peers: list[dict[str, Any]], repository: str = "k = 2\nn = 3\n") -> Path:
    path = tmp_path / "conf" / "sv.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[repository]\n{repository}state_dir = "{tmp_path / "state"}"\n' + _peers_toml(peers))
    return path


def _local(tmp_path: Path, *names: str) -> list[dict[str, Any]]:
    """Independent local peers (directories that exist, under tmp_path/disks)."""
    (tmp_path / "disks").mkdir(parents=True, exist_ok=True)
    return [{"name": name, "url": str(tmp_path / "disks" / name)} for name in names]


def _assert_aliased(config: Path, first: str, second: str) -> None:
    with pytest.raises(AliasedPeersError) as info:
        load_config(config)
    message = str(info.value)
    assert f"Peers {first} and {second}" in message, message
    result = _cli(config, "snapshots")
    assert result.exit_code == 3, result.output
    assert first in result.stderr and second in result.stderr and "Traceback" not in result.output


# --- finding 3: aliased peers ---------------------------------------------------------


def _local_alias_forms(tmp_path: Path) -> dict[str, str]:
    real = tmp_path / "disks" / "a"
    real.mkdir(parents=True)
    (tmp_path / "disks" / "x").mkdir()
    (tmp_path / "link").symlink_to(real)
    return {
        "dotdot": str(tmp_path / "disks" / "x" / ".." / "a"),
        "relative-dotdot": "../disks/x/../a",  # relative to the config file's directory (tmp_path/conf)
        "symlink": str(tmp_path / "link"),
        "percent": f"file://{real.parent}/%61",
        "localhost": f"file://localhost{real}",
        "LOCALHOST": f"file://LOCALHOST{real}",
        "file-url": f"file://{real}",
        "trailing-slash": str(real) + "/",
        "double-slash": str(real).replace("/disks/", "//disks//"),
    }


@pytest.mark.parametrize(
    "form",
    [
        "dotdot",
        "relative-dotdot",
        "symlink",
        "percent",
        "localhost",
        "LOCALHOST",
        "file-url",
        "trailing-slash",
        "double-slash",
    ],
)
def test_two_local_peers_on_one_directory_are_refused(tmp_path: Path, form: str) -> None:
    alias = _local_alias_forms(tmp_path)[form]
    peers = [{"name": "a", "url": str(tmp_path / "disks" / "a")}, *_local(tmp_path, "b", "c")]
    peers.append({"name": "d", "url": alias})
    _assert_aliased(_config(tmp_path, peers), "a", "d")


def test_local_peer_inside_another_is_refused(tmp_path: Path) -> None:
    peers = [*_local(tmp_path, "a", "b"), {"name": "inner", "url": str(tmp_path / "disks" / "a" / "sub")}]
    _assert_aliased(_config(tmp_path, peers), "a", "inner")
    # Also the other way round (the outer one configured second), and through a symlink.
    (tmp_path / "disks" / "a").mkdir()
    (tmp_path / "to-a").symlink_to(tmp_path / "disks" / "a")
    peers = [{"name": "inner", "url": str(tmp_path / "to-a" / "sub")}, *_local(tmp_path, "b")]
    peers.append({"name": "outer", "url": str(tmp_path / "disks")})
    _assert_aliased(_config(tmp_path, peers), "inner", "outer")


def test_local_peers_with_a_common_name_prefix_are_independent(tmp_path: Path) -> None:
    peers = _local(tmp_path, "a", "ab", "a-b")
    config = load_config(_config(tmp_path, peers))
    assert [p.location.path for p in config.peers if p.location] == [
        os.path.realpath(tmp_path / "disks" / n) for n in ("a", "ab", "a-b")
    ]


S3 = "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"url": "s3://bkt/pre"}, {"url": "s3://bkt/pre/"}),  # trailing slash
        ({"url": "s3://bkt/pre"}, {"url": "s3://bkt//pre"}),  # leading slashes
        ({"url": "s3://bkt/pre"}, {"url": "s3://bkt/%70re"}),  # percent escape
        ({"url": "s3://bkt/pre"}, {"url": "s3://bkt/pre", "endpoint": "HTTP://127.0.0.1:9000/"}),  # case, slash
        ({"url": "s3://bkt/pre", "endpoint": "http://host"}, {"url": "s3://bkt/pre", "endpoint": "http://HOST:80"}),
        ({"url": "s3://bkt/pre", "endpoint": "https://h"}, {"url": "s3://bkt/pre", "endpoint": "https://h:443/"}),
        ({"url": "s3://bkt/pre"}, {"url": "s3://bkt/pre/inner"}),  # nested prefix
        ({"url": "s3://bkt"}, {"url": "s3://bkt/anything"}),  # the whole bucket holds every prefix
        ({"url": "s3://bkt/"}, {"url": "s3://bkt"}),
    ],
)
def test_two_s3_peers_on_one_prefix_are_refused(tmp_path: Path, first: dict[str, str], second: dict[str, str]) -> None:
    peers = [
        {"name": "s1", "endpoint": S3} | first,
        *_local(tmp_path, "b"),
        {"name": "s2", "endpoint": S3} | second,
    ]
    _assert_aliased(_config(tmp_path, peers), "s1", "s2")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # The same bucket and prefix on two servers are two storages (two MinIO sites).
        (
            {"url": "s3://bkt/pre", "endpoint": "http://site-a:9000"},
            {"url": "s3://bkt/pre", "endpoint": "http://site-b:9000"},
        ),
        (
            {"url": "s3://bkt/pre", "endpoint": "http://site-a:9000"},
            {"url": "s3://bkt/pre", "endpoint": "http://site-a:9001"},
        ),
        ({"url": "s3://bkt/pre", "endpoint": "http://h"}, {"url": "s3://bkt/pre", "endpoint": "https://h"}),
        ({"url": "s3://bkt/pre"}, {"url": "s3://bkt/pre", "endpoint": "http://minio:9000"}),  # AWS vs MinIO
        ({"url": "s3://bkt/pre1", "endpoint": S3}, {"url": "s3://bkt/pre10", "endpoint": S3}),  # not nested
        ({"url": "s3://bkt1/pre", "endpoint": S3}, {"url": "s3://bkt2/pre", "endpoint": S3}),
    ],
)
def test_s3_peers_that_are_different_storages_are_accepted(
    tmp_path: Path, first: dict[str, str], second: dict[str, str]
) -> None:
    peers = [{"name": "s1"} | first, *_local(tmp_path, "b"), {"name": "s2"} | second]
    config = load_config(_config(tmp_path, peers))
    s1, s2 = config.peer("s1").location, config.peer("s2").location
    assert s1 is not None and s2 is not None and s1.kind is s2.kind is PeerKind.S3
    assert s1 != s2


def test_canonical_s3_url_reaches_the_store(tmp_path: Path) -> None:
    peers = [{"name": "s1", "url": "s3://bkt//pre/%70/", "endpoint": "HTTP://Host:80/"}, *_local(tmp_path, "b", "c")]
    config = load_config(_config(tmp_path, peers))
    peer = config.peer("s1")
    assert peer.url == "s3://bkt/pre/p"
    assert peer.location is not None and peer.location.endpoint == "http://host"
    store = open_peer_store(peer)
    assert (getattr(store, "bucket", None), getattr(store, "prefix", None)) == ("bkt", "pre/p/")
    store.close()


def test_bad_s3_endpoint_names_the_key(tmp_path: Path) -> None:
    peers = [{"name": "s1", "url": "s3://bkt/pre", "endpoint": "127.0.0.1:9000"}, *_local(tmp_path, "b", "c")]
    with pytest.raises(ConfigValueError, match=r"peers\[0\]\.endpoint: must be an http"):
        load_config(_config(tmp_path, peers))


def test_s3_keys_on_a_local_peer_are_refused(tmp_path: Path) -> None:
    peers = [*_local(tmp_path, "a", "b"), {"name": "c", "url": str(tmp_path / "disks" / "c"), "endpoint": S3}]
    with pytest.raises(ConfigValueError, match=r"peers\[2\]\.endpoint: applies to S3 peers only"):
        load_config(_config(tmp_path, peers))


# --- finding 16: bad inputs -----------------------------------------------------------


def test_file_localhost_url_is_the_absolute_path_not_under_the_config_dir(tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    peers = [{"name": n, "url": f"file://localhost{disks / n}"} for n in ("a", "b", "c")]
    config = _config(tmp_path, peers)
    assert [p.url for p in load_config(config).peers] == [f"file://{disks / n}" for n in ("a", "b", "c")]
    result = _cli(config, "init")
    assert result.exit_code == 0, result.output
    for n in ("a", "b", "c"):
        assert (disks / n / "config").is_file()
    assert sorted(p.name for p in config.parent.iterdir()) == ["sv.toml"]  # nothing written beside the config


def test_relative_peer_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    peers = [{"name": "a", "url": "../disks/a"}, {"name": "b", "url": "file:../disks/b"}, *_local(tmp_path, "c")]
    config = load_config(_config(tmp_path, peers))
    assert [p.url for p in config.peers] == [f"file://{tmp_path / 'disks' / n}" for n in ("a", "b", "c")]


def test_k_equal_n_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    peers = _local(tmp_path, "a", "b", "c")
    config = _config(tmp_path, peers, "k = 3\nn = 3\n")
    with pytest.raises(ConfigValueError, match=r"repository\.n: n = k = 3 leaves no redundancy.*allow_no_redundancy"):
        load_config(config)
    result = _cli(config, "snapshots")
    assert result.exit_code == 3 and "allow_no_redundancy" in result.stderr
    allowed = load_config(_config(tmp_path, peers, "k = 3\nn = 3\nallow_no_redundancy = true\n"))
    assert (allowed.repository.k, allowed.repository.n, allowed.repository.write_quorum) == (3, 3, 3)
    assert allowed.repository.allow_no_redundancy


@pytest.mark.parametrize("layout", ["file", "under-file"])
def test_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path, layout: str) -> None:
    (tmp_path / "afile").write_text("not a directory")
    state = tmp_path / "afile" if layout == "file" else tmp_path / "afile" / "state"
    config = _config(tmp_path, _local(tmp_path, "a", "b", "c"))
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(state)))
    with pytest.raises(ConfigValueError, match=r"repository\.state_dir: .*not a directory"):
        load_config(config)
    result = _cli(config, "snapshots")
    assert result.exit_code == 3, result.output
    assert "state_dir" in result.stderr and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("kind", "body", "key"),
    [
        ("files", 'path = "/srv"\ndsn = "dbname=x"\n', "dsn"),
        ("files", 'path = "/srv"\nbucket = "b"\n', "bucket"),
        ("bucket", 'bucket = "b"\npath = "/srv"\n', "path"),
        ("bucket", 'bucket = "b"\nmode = "logical"\n', "mode"),
        ("postgres", 'dsn = "dbname=x"\nexclude = ["*.tmp"]\n', "exclude"),
        ("postgres", 'dsn = "dbname=x"\nendpoint = "http://h"\n', "endpoint"),
    ],
)
def test_source_keys_of_another_kind_are_refused(tmp_path: Path, kind: str, body: str, key: str) -> None:
    config = _config(tmp_path, _local(tmp_path, "a", "b", "c"))
    with open(config, "a") as f:
        f.write(f'[[sources]]\nname = "s"\ntype = "{kind}"\n{body}')
    with pytest.raises(ConfigValueError) as info:
        load_config(config)
    message = str(info.value)
    assert f"sources[0].{key}: is not a key of a {kind} source" in message, message
    result = _cli(config, "snapshots")
    assert result.exit_code == 3 and f"sources[0].{key}" in result.stderr


def test_init_with_a_mistyped_local_path_creates_nothing(tmp_path: Path) -> None:
    peers = [*_local(tmp_path, "a", "b"), {"name": "c", "url": str(tmp_path / "dsik3" / "shardvault")}]
    config = _config(tmp_path, peers)
    result = _cli(config, "init")
    assert result.exit_code == 5, result.output
    assert "Peer c" in result.stderr and str(tmp_path / "dsik3") in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "dsik3").exists()


def test_local_store_creates_only_its_own_directory(tmp_path: Path) -> None:
    store = open_store("p", str(tmp_path / "missing" / "peer"))
    with pytest.raises(PeerUnavailableError, match=f"parent directory {tmp_path / 'missing'} does not exist"):
        store.create()
    assert not (tmp_path / "missing").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PeerUnavailableError, match="is not a directory"):
        open_store("p", str(tmp_path / "afile" / "peer")).create()
    ok = open_store("p", str(tmp_path / "peer"))
    ok.create()
    assert isinstance(ok, LocalStore) and ok.root.is_dir()
    ok.create()  # an existing peer directory is fine


# --- finding 8: the default write quorum ------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(4, 6, 5), (3, 5, 4), (1, 3, 2), (2, 4, 3), (10, 16, 15), (2, 3, 3), (1, 2, 2), (4, 5, 5), (3, 3, 3)],
)
def test_default_write_quorum_survives_one_dead_peer_and_one_more_failure(k: int, n: int, expected: int) -> None:
    quorum = default_write_quorum(k, n)
    assert quorum == expected
    assert k <= quorum <= n
    if n - 1 >= k + 1:
        assert quorum == n - 1 and quorum - 1 >= k  # one peer may be dead; a commit survives one more loss


def test_write_quorum_default_and_explicit(tmp_path: Path) -> None:
    peers = _local(tmp_path, *"abcdef")
    assert load_config(_config(tmp_path, peers, "k = 4\nn = 6\n")).repository.write_quorum == 5
    assert load_config(_config(tmp_path, peers, "k = 4\nn = 5\n")).repository.write_quorum == 5
    for explicit in (4, 6):
        config = load_config(_config(tmp_path, peers, f"k = 4\nn = 6\nwrite_quorum = {explicit}\n"))
        assert config.repository.write_quorum == explicit
    for bad in (3, 7):
        with pytest.raises(ConfigValueError, match=r"repository\.write_quorum: must be between 4 and 6"):
            load_config(_config(tmp_path, peers, f"k = 4\nn = 6\nwrite_quorum = {bad}\n"))


def test_backup_goes_on_with_one_dead_peer_by_default(tmp_path: Path) -> None:
    peers_dir = tmp_path / "peers"
    peers_dir.mkdir()
    source = make_tree(tmp_path / "src", files=8, big=300_000)
    peers = [{"name": f"p{i}", "url": str(peers_dir / f"p{i}"), "zone": f"z{i % 3}"} for i in range(6)]
    config = write_config(
        tmp_path / "sv.toml", peers, {"src": source}, k=4, n=6, state_dir=str(tmp_path / "state"), **SMALL
    )
    assert _cli(config, "init").exit_code == 0
    (peers_dir / "p3").rename(tmp_path / "unplugged")  # one disk of six dies
    result = _cli(config, "backup", "src")
    assert result.exit_code == 0, result.output + result.stderr
    listed = _cli(config, "snapshots", "--json")
    assert listed.exit_code == 0 and '"src"' in listed.output


# --- finding 15: a peer that never answers ---------------------------------------------


class SilentServer:
    """A TCP server that accepts connections and never answers (a hung S3 gateway)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)  # so the accept loop sees the stop flag
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._clients: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._clients.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for conn in self._clients:
            conn.close()


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    # Requests are signed before they are sent; without credentials boto3 fails before connecting.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = SilentServer()
    yield server
    server.close()


def test_s3_timeouts_bound_a_silent_peer(silent: SilentServer) -> None:
    store = open_store(
        "hung", "s3://bkt/pre", endpoint=silent.endpoint, connect_timeout=1, read_timeout=0.5, max_attempts=2
    )
    start = time.monotonic()
    with pytest.raises(PeerUnavailableError, match=r"Peer hung is unreachable: no answer from .* within 0\.5s"):
        store.probe()
    assert time.monotonic() - start < 15  # two attempts of 0.5 s; the old client waited 4 x 60 s
    assert silent.connections == 2  # max_attempts counts every try
    store.close()


def test_configured_timeouts_reach_the_store(tmp_path: Path, silent: SilentServer) -> None:
    timeouts: dict[str, Any] = {"connect_timeout_seconds": 1, "read_timeout_seconds": 0.5, "max_attempts": 1}
    peers: list[dict[str, Any]] = [
        {"name": "s1", "url": "s3://bkt/pre", "endpoint": silent.endpoint} | timeouts,
        {"name": "s2", "url": "s3://bkt/pre", "endpoint": "http://127.0.0.1:1"},
        *_local(tmp_path, "c"),
    ]
    config = load_config(_config(tmp_path, peers))
    s1, s2 = config.peer("s1"), config.peer("s2")
    assert (s1.connect_timeout, s1.read_timeout, s1.max_attempts) == (1.0, 0.5, 1)
    assert (s2.connect_timeout, s2.read_timeout, s2.max_attempts) == (5.0, 30.0, 3)  # the defaults
    store = open_peer_store(s1)
    with pytest.raises(PeerUnavailableError, match=r"within 0\.5s"):
        store.probe()
    assert silent.connections == 1
    store.close()
    with pytest.raises(ConfigValueError, match=r"peers\[0\]\.read_timeout_seconds: must be between"):
        load_config(_config(tmp_path, [peers[0] | {"read_timeout_seconds": 0}, *peers[1:]]))


def test_a_peer_marked_down_is_not_probed_again(tmp_path: Path, silent: SilentServer) -> None:
    hung = open_store("hung", "s3://bkt/pre", endpoint=silent.endpoint, read_timeout=0.5, max_attempts=1)
    good = open_store("good", str(tmp_path / "good"))
    good.create()
    peers = PeerSet([Peer("good", "z1", good), Peer("hung", "z2", hung)])
    first = peers.probe_all()
    assert first["good"] is None and isinstance(first["hung"], PeerUnavailableError)
    assert silent.connections == 1
    second = peers.probe_all()  # every later step of the command probes again
    assert second["hung"] is first["hung"] and second["good"] is None
    assert silent.connections == 1
    assert [p.name for p in peers.up()] == ["good"]
    # A peer marked down by a failed read (not by a probe) is not probed either.
    gone = open_store("gone", str(tmp_path / "gone"))
    calls: list[str] = []
    real_probe = gone.probe

    def counted_probe() -> None:
        calls.append("probe")
        real_probe()

    gone.probe = counted_probe  # type: ignore[method-assign]
    more = PeerSet([Peer("gone", "z3", gone)])
    more.mark_down(more.peers[0], "Peer gone is unreachable: read timed out")
    result = more.probe_all()
    assert calls == [] and isinstance(result["gone"], PeerUnavailableError)
    peers.close()


def test_snapshots_with_a_silent_s3_peer_is_bounded_and_probes_it_once(tmp_path: Path, silent: SilentServer) -> None:
    peers_dir = tmp_path / "peers"
    peers_dir.mkdir()
    source = make_tree(tmp_path / "src", files=4, big=100_000)
    peers = [{"name": f"p{i}", "url": str(peers_dir / f"p{i}")} for i in range(6)]
    state = str(tmp_path / "st")
    config = write_config(tmp_path / "sv.toml", peers, {"src": source}, k=4, n=6, state_dir=state, **SMALL)
    assert _cli(config, "init").exit_code == 0
    assert _cli(config, "backup", "src").exit_code == 0
    # p5's disk is replaced by an S3 gateway that hangs: k-of-n is still satisfiable by p0..p4.
    text = config.read_text().replace(
        f'url = "{peers_dir / "p5"}"',
        f'url = "s3://bkt/pre"\nendpoint = "{silent.endpoint}"\n'
        "connect_timeout_seconds = 1\nread_timeout_seconds = 0.5\nmax_attempts = 1",
    )
    config.write_text(text)
    start = time.monotonic()
    result = _cli(config, "snapshots")
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output + result.stderr
    assert "1 snapshot(s)" in result.output
    assert silent.connections == 1, "the silent peer was probed more than once in one run"
    assert elapsed < 30
    # A backup asks for the peers at open and again before writing (quorum): still one probe per run.
    (source / "new-file").write_bytes(os.urandom(50_000))
    result = _cli(config, "backup", "src")
    assert result.exit_code == 0, result.output + result.stderr
    assert silent.connections == 2, "the silent peer was probed more than once in one run"
