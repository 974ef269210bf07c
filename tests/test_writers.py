"""Issue 9, several writers: backups from two "hosts" into one repository at the same time.

A host is a process with its own configuration file and state directory
(``[repository] state_dir``) and its own ``hostname``, over the same peers.
Each scenario runs several rounds with a random offset between the two
starts (bounded, seeded), and after every round: both exited 0, every new
snapshot restores byte for byte, ``check --read-data`` is clean from each
host, and each host's ``snapshots`` lists every snapshot.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL, Vault, assert_same_tree, local_peers, make_tree, write_config

ROUNDS = 3
WAIT = 300.0


def _host(root: Path, peers_dir: Path, name: str, sources: dict[str, Path], extra: str = "") -> Vault:
    root.mkdir(parents=True, exist_ok=True)
    settings = {"k": 4, "n": 6, "state_dir": str(root / "state"), "hostname": name} | SMALL
    config = write_config(root / "shardvault.toml", local_peers(peers_dir), sources, **settings)
    if extra:
        config.write_text(config.read_text() + extra)
    return Vault(root, config, peers_dir, next(iter(sources.values())))


def _change(root: Path, rng: random.Random, round_: int) -> None:
    """Some new data every round: a new file, one file rewritten, one appended to."""
    (root / f"new{round_}.bin").write_bytes(rng.randbytes(rng.randrange(300_000, 1_500_000)))
    (root / "dir0" / "file0.txt").write_bytes(rng.randbytes(50_000))
    with (root / "large0.bin").open("ab") as f:
        f.write(rng.randbytes(200_000))


def _together(rng: random.Random, *runs: tuple[Vault, list[str]]) -> list[dict[str, Any]]:
    """Start the backups with a random offset between the starts; all must succeed."""
    procs: list[subprocess.Popen[str]] = []
    order = list(runs)
    rng.shuffle(order)
    for i, (vault, args) in enumerate(order):
        if i:
            time.sleep(rng.uniform(0, 0.6))
        procs.append(vault.popen(*args))
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        docs.append(json.loads(out) if out.strip() else {})
    return [docs[order.index(run)] for run in runs]


def _restore(vault: Vault, snapshot: str, source: Path, target: Path) -> None:
    result = vault.cli("restore", snapshot, "--target", str(target))
    assert result.exit_code == 0, result.output
    assert_same_tree(source, target)
    shutil.rmtree(target)


def _agree(hosts: list[Vault], expected: set[str]) -> list[dict[str, Any]]:
    """Every host lists exactly the expected snapshots, and check --read-data is clean from each."""
    listed: list[dict[str, Any]] = []
    for vault in hosts:
        result = vault.cli("snapshots", "--json")
        assert result.exit_code == 0, result.output
        listed = json.loads(result.stdout)
        assert {s["id"] for s in listed} == expected
        check = vault.cli("check", "--read-data", "--json")
        assert check.exit_code == 0, check.output
        report = json.loads(check.stdout)
        assert report["snapshots"] == len(expected)
    return listed


def test_two_hosts_back_up_two_sources_at_once(tmp_path: Path) -> None:
    peers_dir = tmp_path / "peers"
    alpha = make_tree(tmp_path / "alpha", seed=1, files=20, big=1 << 20)
    beta = make_tree(tmp_path / "beta", seed=2, files=20, big=1 << 20)
    a = _host(tmp_path / "host-a", peers_dir, "host-a", {"alpha": alpha})
    b = _host(tmp_path / "host-b", peers_dir, "host-b", {"beta": beta})
    assert a.cli("init").exit_code == 0
    rng = random.Random(91)
    expected: set[str] = set()
    for round_ in range(ROUNDS):
        _change(alpha, rng, round_)
        _change(beta, rng, round_)
        doc_a, doc_b = _together(rng, (a, ["backup", "alpha", "--json"]), (b, ["backup", "beta", "--json"]))
        snap_a, snap_b = doc_a["snapshot"], doc_b["snapshot"]
        assert (snap_a["hostname"], snap_b["hostname"]) == ("host-a", "host-b")
        expected |= {snap_a["id"], snap_b["id"]}
        _agree([a, b], expected)
        # Each host restores the other's snapshot too: nothing local is needed.
        _restore(b, snap_a["id"], alpha, tmp_path / "out-a")
        _restore(a, snap_b["id"], beta, tmp_path / "out-b")


def test_one_source_from_two_hosts_keeps_a_chain_per_host(tmp_path: Path) -> None:
    """Same source name, different content on each host: two snapshots a round, each host's parent its own."""
    peers_dir = tmp_path / "peers"
    on_a = make_tree(tmp_path / "a-src", seed=3, files=20, big=1 << 20)
    on_b = make_tree(tmp_path / "b-src", seed=4, files=20, big=1 << 20)
    shutil.copytree(on_a / "dir1", on_b / "common")  # the same bytes on both: both writers store them at once
    a = _host(tmp_path / "host-a", peers_dir, "host-a", {"shared": on_a})
    b = _host(tmp_path / "host-b", peers_dir, "host-b", {"shared": on_b})
    assert a.cli("init").exit_code == 0
    rng = random.Random(92)
    expected: set[str] = set()
    last: dict[str, str] = {}
    for round_ in range(ROUNDS):
        _change(on_a, rng, round_)
        _change(on_b, rng, round_)
        docs = _together(rng, (a, ["backup", "shared", "--json"]), (b, ["backup", "shared", "--json"]))
        for host, src, doc in (("host-a", on_a, docs[0]), ("host-b", on_b, docs[1])):
            snap = doc["snapshot"]
            assert snap["source"] == "shared" and snap["hostname"] == host
            # The parent is this host's previous snapshot, never the other host's (whichever finished last).
            assert snap["parent"] == last.get(host)
            assert snap["kind"] == ("incremental" if round_ else "full")
            if round_:
                assert doc["stats"]["files_unchanged"] > 0  # the skip worked against its own parent
            last[host] = snap["id"]
            expected.add(snap["id"])
            _restore(a if host == "host-b" else b, snap["id"], src, tmp_path / "out")
        listed = _agree([a, b], expected)
        assert sorted(s["hostname"] for s in listed).count("host-a") == round_ + 1
    text = b.cli("snapshots", "--source", "shared").stdout
    assert "host-a" in text and "host-b" in text


WAL_SOURCE = """
[[sources]]
name = "db"
type = "postgres"
dsn = "host=127.0.0.1 port=1 dbname=unused"
"""


def test_a_wal_push_storm_on_one_host_while_the_other_backs_up(tmp_path: Path) -> None:
    """wal-push never talks to the server: a storm of it needs no PostgreSQL."""
    peers_dir = tmp_path / "peers"
    docs_src = make_tree(tmp_path / "docs", seed=5, files=20, big=3 << 20)
    wal_dir = tmp_path / "pg_wal"
    wal_dir.mkdir()
    a = _host(tmp_path / "host-a", peers_dir, "host-a", {"docs": docs_src}, extra=WAL_SOURCE)
    b = _host(tmp_path / "host-b", peers_dir, "host-b", {"docs": docs_src}, extra=WAL_SOURCE)
    assert a.cli("init").exit_code == 0
    rng = random.Random(93)
    segments = {}
    for i in range(1, 13):
        name = f"0000000100000000{i:08X}"
        segments[name] = rng.randbytes(rng.randrange(200_000, 1_200_000))
        (wal_dir / name).write_bytes(segments[name])
    expected: set[str] = set()
    names = iter(sorted(segments))
    for round_ in range(3):  # 3 rounds x 4 files: every segment
        _change(docs_src, rng, round_)
        backup = a.popen("backup", "docs", "--json")
        time.sleep(rng.uniform(0, 0.3))
        for _ in range(2):  # four WAL files a round, two at a time
            pushes = [b.popen("wal-push", str(wal_dir / next(names))) for _ in range(2)]
            for push in pushes:
                _, err = push.communicate(timeout=WAIT)
                assert push.returncode == 0, err
        out, err = backup.communicate(timeout=WAIT)
        assert backup.returncode == 0, err
        snap = json.loads(out)["snapshot"]
        expected.add(snap["id"])
        _restore(b, snap["id"], docs_src, tmp_path / "out")
        _agree([a, b], expected)
    for name, data in segments.items():  # every pushed file comes back from the other host's view
        fetched = tmp_path / "fetched" / name
        fetched.parent.mkdir(exist_ok=True)
        done = a.run("wal-fetch", name, str(fetched))
        assert done.returncode == 0, done.stderr
        assert fetched.read_bytes() == data


@pytest.mark.parametrize("value", ["  padded ", "tab\there"])
def test_a_bad_hostname_is_refused_by_name(tmp_path: Path, value: str) -> None:
    host = _host(tmp_path, tmp_path / "peers", value, {"src": make_tree(tmp_path / "src", files=5, big=10)})
    result = host.cli("snapshots")
    assert result.exit_code == 3
    assert result.output.strip().splitlines() == [
        f"shardvault: error: {host.config}: repository.hostname: {value!r} is not a host name "
        "(printable, no surrounding spaces, at most 255)"
    ]
