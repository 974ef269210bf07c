"""``shardvault forget``: retention through the CLI, tombstones on the peers, WAL expiry on a real PostgreSQL 15."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Vault, assert_same_tree, copy_tree, peer_snapshot
from test_postgres import Cluster, _restore_and_start, cluster, restored  # noqa: F401  (fixtures)

from shardvault.crypto import Cipher
from shardvault.errors import UnsupportedFormatError
from shardvault.repository.metadata import check_version, kind_of, open_object
from shardvault.repository.snapshot import Snapshot
from shardvault.repository.tombstones import TOMBSTONE_VERSION, parse_tombstone, tombstone_doc

VECTOR = json.loads((Path(__file__).parent / "vectors" / "tombstone_v1.json").read_text())


def _backup(vault: Vault, saved: Path | None = None) -> str:
    result = vault.cli("backup", "src", "--json")
    assert result.exit_code == 0, result.output
    if saved is not None:
        copy_tree(vault.source, saved)
    return str(json.loads(result.stdout)["snapshot"]["id"])


def _history(vault: Vault, tmp_path: Path, count: int) -> list[str]:
    """``count`` backups of a changing tree, oldest first; the tree of each is kept in tmp_path/tree-<i>."""
    ids = []
    for i in range(count):
        (vault.source / "changing.txt").write_text(f"version {i}\n" * (i + 1))
        ids.append(_backup(vault, tmp_path / f"tree-{i}"))
    return ids


def _on_peers(vault: Vault, name: str) -> list[int]:
    return [i for i in range(6) if (vault.peer(i) / name).exists()]


def _listed(vault: Vault) -> list[str]:
    result = vault.cli("snapshots", "--json")
    assert result.exit_code == 0, result.output
    return [s["id"] for s in json.loads(result.stdout)]


def _json(vault: Vault, *args: str) -> dict[str, Any]:
    result = vault.cli(*args, "--json")
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)  # exactly one document
    return doc


# --- the tombstone format -----------------------------------------------------------------------------


def test_tombstone_body_matches_the_golden_vector() -> None:
    case = VECTOR["tombstone"]
    body = tombstone_doc(case["names"], case["reason"], case["time"], case["hostname"])
    assert json.dumps(body, sort_keys=True, separators=(",", ":")) == case["json"]
    assert body["version"] == TOMBSTONE_VERSION == 1
    assert parse_tombstone("deleted/" + "0" * 64, json.loads(case["json"])) == sorted(set(case["names"]))
    # The sealed copy (keys of metadata_v1.json) reads back as that body, as a tombstone of version 1.
    keys = json.loads((Path(__file__).parent / "vectors" / "metadata_v1.json").read_text())["keys"]
    doc = open_object(Cipher(bytes.fromhex(keys["encryption"])), case["name"], bytes.fromhex(case["sealed"]))
    assert doc == body and kind_of(case["name"]) == "tombstone"
    check_version("tombstone", doc, case["name"])
    with pytest.raises(UnsupportedFormatError, match="format version 2"):
        check_version("tombstone", doc | {"version": 2}, case["name"])


@pytest.mark.parametrize("name", ["config", "identity", "deleted/" + "a" * 64, "data/ab/" + "ab" * 32 + ".01", "x"])
def test_a_tombstone_names_only_deletable_metadata(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be tombstoned"):
        tombstone_doc([name], "forget", "2026-01-01T00:00:00+00:00", "h")


# --- forget on local peers ----------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_names_the_rule_that_keeps_each_snapshot(vault: Vault, tmp_path: Path) -> None:
    ids = _history(vault, tmp_path, 3)
    before = peer_snapshot(vault.peers_dir)
    result = vault.cli("forget", "--keep-last", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert peer_snapshot(vault.peers_dir) == before
    out = result.stdout
    assert "would remove 1 snapshot(s)" in out and "nothing changed" in out
    kept_lines = [line for line in out.splitlines() if line.strip().startswith((ids[1][:8], ids[2][:8]))]
    assert len(kept_lines) == 2 and all("last snapshot" in line for line in kept_lines)
    removed = out.split("would remove 1 snapshot(s):")[1]
    assert ids[0][:8] in removed and ids[1][:8] not in removed
    doc = _json(vault, "forget", "--keep-last", "2", "--keep-daily", "1", "--dry-run")
    assert doc["dry_run"] is True
    (src,) = doc["sources"]
    assert src["source"] == "src" and src["policy"] == {"keep_last": 2, "keep_daily": 1}
    assert [k["id"] for k in src["keep"]] == [ids[2], ids[1]]
    assert src["keep"][0]["reasons"] == ["last snapshot", "daily snapshot"]
    assert src["keep"][1]["reasons"] == ["last snapshot"]
    assert [r["id"] for r in src["remove"]] == [ids[0]] and src["wal_expired"] == []
    assert peer_snapshot(vault.peers_dir) == before
    assert sorted(_listed(vault)) == sorted(ids)


def test_forget_removes_exactly_those_snapshots_from_every_peer_and_the_rest_restore(
    vault: Vault, tmp_path: Path
) -> None:
    ids = _history(vault, tmp_path, 4)
    shards_before = {i: vault.shards(i) for i in range(6)}
    doc = _json(vault, "forget", "--keep-last", "2")
    assert doc["dry_run"] is False and doc["snapshots_removed"] == 2 and doc["peers_missed"] == {}
    assert sorted(r["id"] for r in doc["sources"][0]["remove"]) == sorted(ids[:2])
    tombstone = doc["tombstone"]
    assert _on_peers(vault, tombstone) == list(range(6))
    for gone in ids[:2]:
        assert _on_peers(vault, f"snapshots/{gone}") == []
        assert list((vault.root / "state").rglob(gone)) == []  # nor in the local cache
    for kept in ids[2:]:
        assert _on_peers(vault, f"snapshots/{kept}") == list(range(6))
    assert {i: vault.shards(i) for i in range(6)} == shards_before  # forget deletes no pack: prune's job
    assert _listed(vault) == ids[2:]
    for i, kept in enumerate(ids[2:], start=2):
        target = tmp_path / f"out-{i}"
        result = vault.cli("restore", kept, "--target", str(target))
        assert result.exit_code == 0, result.output
        assert_same_tree(tmp_path / f"tree-{i}", target)
    # The state recorded all four backups as committed: two forgotten ones are gone on purpose, not rolled back.
    check = vault.cli("check")
    assert check.exit_code == 0, check.output
    assert "rolled back" not in check.output
    human = vault.cli("forget", "--keep-last", "1")
    assert human.exit_code == 0, human.output
    assert "removed 1 snapshot(s)" in human.stdout and "run 'shardvault prune' to free space" in human.stdout
    assert _listed(vault) == ids[3:]


def test_each_host_of_a_source_keeps_its_own_history(vault: Vault, tmp_path: Path) -> None:
    """One source backed up from two hosts: --keep-last 1 keeps the newest of each (restic groups by host)."""
    other = tmp_path / "other.toml"
    text = vault.config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "state-other"))
    other.write_text(text.replace("[repository]\n", '[repository]\nhostname = "other-host"\n', 1))
    host2 = Vault(vault.root, other, vault.peers_dir, vault.source)
    ids = {}
    for vault_, name in ((vault, "a1"), (host2, "b1"), (vault, "a2"), (host2, "b2")):
        (vault.source / name).write_bytes(name.encode() * 1000)
        result = vault_.cli("backup", "src", "--json")
        assert result.exit_code == 0, result.output
        ids[name] = json.loads(result.stdout)["snapshot"]["id"]
    result = vault.cli("forget", "--keep-last", "1", "--json")
    assert result.exit_code == 0, result.output
    (src,) = json.loads(result.stdout)["sources"]
    assert sorted(k["id"] for k in src["keep"]) == sorted([ids["a2"], ids["b2"]])
    assert sorted(r["id"] for r in src["remove"]) == sorted([ids["a1"], ids["b1"]])


def test_a_peer_down_during_forget_gets_its_stray_copy_removed_by_repair(vault: Vault, tmp_path: Path) -> None:
    ids = _history(vault, tmp_path, 2)
    vault.peer(5).rename(vault.peers_dir / "p5-away")
    result = vault.cli("forget", "--keep-last", "1")
    assert result.exit_code == 0, result.output
    assert "peer p5 keeps stray copies" in result.stderr
    (vault.peers_dir / "p5-away").rename(vault.peer(5))
    stray = f"snapshots/{ids[0]}"
    assert _on_peers(vault, stray) == [5]
    assert _listed(vault) == [ids[1]]  # the stray copy is not a snapshot
    check = _json_any(vault, "check")
    assert check["metadata"]["stray"] == {stray: ["p5"]}
    assert ids[0] not in check["metadata"]["snapshots_missing"]
    assert not any(i["object"] == stray for i in check["metadata"]["issues"])  # never "missing" elsewhere
    repair = _json(vault, "repair")
    assert repair["metadata"]["stray_deleted"] == 1
    assert _on_peers(vault, stray) == []
    assert len(list((vault.peer(5) / "deleted").iterdir())) == 1  # the tombstone reached the late peer
    assert vault.cli("check").exit_code == 0
    assert _listed(vault) == [ids[1]]


def _json_any(vault: Vault, *args: str) -> dict[str, Any]:
    """One JSON document, whatever the verdict's exit code."""
    result = vault.cli(*args, "--json")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_an_object_forgotten_after_it_was_listed_is_gone_not_lost(vault: Vault, tmp_path: Path) -> None:
    """Another process forgets a snapshot between this one's listing and its read: skipped, not a problem."""
    ids = _history(vault, tmp_path, 2)
    with vault.repo() as reader:
        names = reader.list_meta("snapshots/")
        assert vault.cli("forget", "--keep-last", "1").exit_code == 0
        reader.state.forget(f"snapshots/{ids[0]}")  # as if this host had never read it
        found = reader._read_all(names)  # the step between listing and reading
        assert [n for n, _ in found] == [f"snapshots/{ids[1]}"]
        assert reader.meta_problems == []
        assert [s.id for s in reader.snapshots()] == [ids[1]]


def test_a_tombstoned_index_file_is_gone_for_every_reader_and_repair_removes_its_copies(vault: Vault) -> None:
    """What prune's compaction relies on: the replacement is written, the old file tombstoned, then deleted."""
    from shardvault.repository.tombstones import write_tombstone

    _backup(vault)
    (vault.source / "more.txt").write_text("more\n")
    _backup(vault)
    with vault.repo() as repo:
        first = repo.list_meta("index/")[0]
        packs = {str(p["id"]) for p in repo.read_meta(first)["packs"]}
        replacement = repo.write_index([repo.index.packs[p] for p in sorted(packs)])
        name = write_tombstone(repo, [first], "prune")
        assert name.startswith("deleted/") and first in repo.deleted_names
        assert first not in repo.list_meta("index/")
    with vault.repo() as fresh:  # another run: the tombstone is read from the peers
        names = fresh.list_meta("index/")
        assert first not in names and replacement in names
        assert packs <= set(fresh.index.packs)
    assert _on_peers(vault, first) == list(range(6))  # not deleted yet: a stray copy on every peer
    check = vault.cli("check", "--json")
    assert check.exit_code == 0, check.output  # strays are not damage: no reader sees them
    assert json.loads(check.stdout)["metadata"]["stray"] == {first: [f"p{i}" for i in range(6)]}
    assert "stray copy of deleted " + first in vault.cli("check").stdout
    repair = _json(vault, "repair")
    assert repair["metadata"]["stray_deleted"] == 6
    assert _on_peers(vault, first) == []
    assert vault.cli("check").exit_code == 0


def test_forget_refuses_on_an_append_only_client_and_changes_nothing(vault: Vault, tmp_path: Path) -> None:
    """A tombstone would hide history as surely as a deletion: append-only refuses forget (exit 16), as prune."""
    ids = _history(vault, tmp_path, 2)
    vault.config.write_text(vault.config.read_text().replace("[repository]\n", "[repository]\nappend_only = true\n", 1))
    before = peer_snapshot(vault.peers_dir)
    dry = _json(vault, "forget", "--keep-last", "1", "--dry-run")  # judging still works
    assert [r["id"] for r in dry["sources"][0]["remove"]] == [ids[0]]
    result = vault.cli("forget", "--keep-last", "1")
    assert result.exit_code == 16, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refuses deletion (append-only" in lines[0] and "forget removes nothing" in lines[0]
    assert peer_snapshot(vault.peers_dir) == before
    assert sorted(_listed(vault)) == sorted(ids)


def _with_sources(vault: Vault, extra: str) -> None:
    other = vault.root / "other"
    other.mkdir()
    (other / "f.txt").write_text("other source\n")
    text = vault.config.read_text() + extra.replace("OTHER", str(other))
    vault.config.write_text(text)


def test_the_configured_policy_applies_and_sources_without_one_are_left_alone(vault: Vault, tmp_path: Path) -> None:
    _with_sources(
        vault,
        '[sources.retention]\nkeep_last = 1\nkeep_within = "1d"\n'  # applies to src, the [[sources]] above it
        '[[sources]]\nname = "other"\ntype = "files"\npath = "OTHER"\n',
    )
    ids = _history(vault, tmp_path, 2)
    others = [_json(vault, "backup", "other")["snapshot"]["id"] for _ in range(2)]
    # keep_within 1d keeps both src snapshots (made minutes apart).
    dry = _json(vault, "forget", "--dry-run")
    assert [s["source"] for s in dry["sources"]] == ["src"] and dry["unconfigured"] == ["other"]
    assert dry["sources"][0]["remove"] == []
    assert dry["sources"][0]["keep"][0]["reasons"] == ["within 1d", "last snapshot"]
    result = vault.cli("forget")
    assert result.exit_code == 0, result.output
    assert "source src: keep 1 last, all within 1d of the newest" in result.stdout
    assert "source other: no retention policy, left alone" in result.stdout
    listed = _listed(vault)
    assert sorted(listed) == sorted(ids + others)  # within 1d: nothing went
    # Flags are the whole policy of the sources they select (the configured keep_within is not merged in).
    doc = _json(vault, "forget", "--keep-last", "1", "--source", "src")
    assert doc["sources"][0]["policy"] == {"keep_last": 1} and doc["unconfigured"] == []
    assert [r["id"] for r in doc["sources"][0]["remove"]] == [ids[0]]
    gone = _json(vault, "forget", "--keep-last", "1")  # without --source: every source, the unconfigured one too
    assert {s["source"] for s in gone["sources"]} == {"src", "other"}
    assert sorted(_listed(vault)) == sorted([ids[1], others[1]])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--keep-daily", "x"], "--keep-daily: 'x' is not a count"),
        (["--keep-last", "-2"], "--keep-last: must be a count of at least 0"),
        (["--keep-within", "3w"], "--keep-within: '3w' is not a duration"),
        (["--keep-within", "0d"], "--keep-within: '0d' is zero"),
        (["--keep-last", "0"], "the --keep-* flags give no rule"),
        ([], "no retention policy"),
    ],
)
def test_a_malformed_policy_on_the_command_line_is_exit_2_in_one_line(
    vault: Vault, tmp_path: Path, flags: list[str], fragment: str
) -> None:
    _backup(vault)
    before = peer_snapshot(vault.peers_dir)
    result = vault.cli("forget", *flags)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("shardvault: error:"), result.stderr
    as_json = vault.cli("forget", *flags, "--json")
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["error"]["code"] == 2
    assert peer_snapshot(vault.peers_dir) == before


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("keep_daily = -3", "sources[0].retention.keep_daily"),
        ("keep_dayly = 3", "sources[0].retention.keep_dayly"),
        ('keep_within = "30x"', "sources[0].retention.keep_within"),
        ("keep_within = 30", "sources[0].retention.keep_within"),
        ('keep_last = "all"', "sources[0].retention.keep_last"),
        ("keep_last = 0", "sources[0].retention"),
    ],
)
def test_a_malformed_policy_in_the_configuration_is_exit_3_naming_the_key(vault: Vault, table: str, key: str) -> None:
    before = peer_snapshot(vault.peers_dir)
    vault.config.write_text(vault.config.read_text() + f"[sources.retention]\n{table}\n")
    for args in (["forget", "--dry-run"], ["snapshots"]):
        result = vault.cli(*args)
        assert result.exit_code == 3, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f": {key}: " in lines[0], result.stderr
    assert peer_snapshot(vault.peers_dir) == before


# --- PostgreSQL: WAL expires with the base backups, PITR still works ------------------------------------


class _History:
    """A repository as plan() sees it: snapshots and a WAL archive listing (no peers needed for the rule)."""

    def __init__(self, snapshots: list[Snapshot], wal: list[str]) -> None:
        self._snapshots = snapshots
        self._wal = wal

    def snapshots(self) -> list[Snapshot]:
        return self._snapshots

    def list_meta(self, prefix: str) -> list[str]:
        assert prefix == "wal/db/"
        return [prefix + name.lower() for name in self._wal]


def _pg(label: str, kind: str, day: int, parent: str | None = None, start: str | None = None) -> Snapshot:
    facts: dict[str, Any] = {"mode": "physical"} | ({"start_wal_file": start} if start else {})
    return Snapshot(
        id=label, source="db", source_type="postgres", path="", kind=kind, parent=parent,
        started=f"2025-01-0{day}T00:00:00+00:00", finished=f"2025-01-0{day}T00:00:00+00:00",
        hostname="h", tree=(), stats={"postgres": facts},
    )  # fmt: skip


# F1 on timeline 1 starts at segment 3; a PITR made timeline 2 branch at segment 6 (the old timeline's
# segment 6 is left as .partial); F2 on timeline 2 starts at segment 8.  I1 and I2 are WAL checkpoints.
TIMELINES = [
    _pg("F1", "full", 1, start="000000010000000000000003"),
    _pg("I1", "incremental", 2, parent="F1"),
    _pg("F2", "full", 3, start="000000020000000000000008"),
    _pg("I2", "incremental", 4, parent="F2"),
]
TL1 = [f"0000000100000000000000{n:02X}" for n in range(1, 10)]
TL2 = [f"0000000200000000000000{n:02X}" for n in range(6, 11)]
BACKUP_LABELS = ["000000010000000000000002.00000028.backup", "000000010000000000000003.00000060.backup"]
ARCHIVE = [*TL1, *BACKUP_LABELS, "000000010000000000000006.partial", "00000002.history", *TL2]
ARCHIVE += ["000000020000000000000008.00000028.backup"]


@pytest.mark.parametrize(
    ("keep_last", "kept", "expired"),
    [
        # I2 is the last snapshot; F2 is kept as its base.  Everything before F2's start on timelines 1 and 2.
        (
            1,
            {"I2": ["last snapshot"], "F2": ["base of I2"]},
            [*TL1[:7], *BACKUP_LABELS, "000000010000000000000006.partial", *TL2[:2]],
        ),
        # I1 keeps F1 too: only what lies before F1's start (timeline 1, segments 1-2) goes.  A base that
        # a rule keeps anyway still names the incremental that needs it.
        (
            3,
            {
                "I2": ["last snapshot"],
                "F2": ["last snapshot", "base of I2"],
                "I1": ["last snapshot"],
                "F1": ["base of I1"],
            },
            [*TL1[:2], BACKUP_LABELS[0]],
        ),
    ],
)
def test_wal_expires_only_before_every_kept_base_backups_start(
    keep_last: int, kept: dict[str, list[str]], expired: list[str]
) -> None:
    from shardvault.lifecycle.forget import plan
    from shardvault.lifecycle.retention import RetentionPolicy

    report = plan(_History(TIMELINES, ARCHIVE), {"db": RetentionPolicy(keep_last=keep_last)})  # type: ignore[arg-type]
    (src,) = report.sources
    assert {d.snapshot.id: list(d.reasons) for d in src.keep} == kept
    assert sorted(src.wal_expired) == sorted(expired)
    assert src.wal_records == [f"wal/db/{n.lower()}" for n in src.wal_expired]


def test_no_wal_expires_when_a_kept_base_backup_does_not_record_its_start() -> None:
    from shardvault.lifecycle.forget import plan
    from shardvault.lifecycle.retention import RetentionPolicy

    unknown = [_pg("F0", "full", 1, start="000000010000000000000002"), _pg("F1", "full", 2)]
    report = plan(_History(unknown, TL1), {"db": RetentionPolicy(keep_last=1)})  # type: ignore[arg-type]
    (src,) = report.sources
    assert [d.snapshot.id for d in src.remove] == ["F0"]
    assert src.wal_expired == [] and "does not record its start WAL segment" in src.wal_note


def test_an_expired_wal_name_is_refused_not_hidden(tmp_path: Path) -> None:
    """A re-created cluster repeats old WAL names: a record the tombstone hides would be lost, so refuse loudly."""
    from conftest import PASSWORD, local_peers, write_config

    from shardvault.backup.wal import push
    from shardvault.config import PostgresSource, load_config
    from shardvault.errors import SourceError
    from shardvault.repository import Repository
    from shardvault.repository.tombstones import write_tombstone

    config_path = write_config(
        tmp_path / "c.toml", local_peers(tmp_path / "peers"), {}, k=4, n=6, state_dir=str(tmp_path / "s")
    )
    with open(config_path, "a") as f:
        f.write('[[sources]]\nname = "db"\ntype = "postgres"\ndsn = "host=127.0.0.1"\n')
    config = load_config(config_path)
    Repository.init(config, PASSWORD).close()
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(b"old cluster" * 1000)
    with Repository.open(config, PASSWORD) as repo:
        assert push(repo, config.typed_source("db", PostgresSource), segment)
        write_tombstone(repo, ["wal/db/000000010000000000000001"], "forget")
    segment.write_bytes(b"new cluster" * 1000)
    with Repository.open(config, PASSWORD) as repo, pytest.raises(SourceError, match="expired by forget"):
        push(repo, config.typed_source("db", PostgresSource), segment)


def _wal_names(pg: Cluster, peer: int = 0) -> list[str]:
    """The WAL files a peer holds records of, as PostgreSQL names them (hex upper case, suffixes lower)."""
    names = [p.name.upper() for p in (pg.base / "peers" / f"p{peer}" / "wal" / "db").iterdir()]
    return sorted(n.replace(".BACKUP", ".backup").replace(".PARTIAL", ".partial") for n in names)


def test_postgres_forget_expires_wal_before_the_oldest_kept_base_backup_and_pitr_still_works(
    cluster: Cluster,  # noqa: F811  (the fixture, imported above)
    restored: list[tuple[Path, int]],  # noqa: F811
) -> None:
    cluster.sql("CREATE TABLE ledger (id serial PRIMARY KEY, batch int NOT NULL)")
    cluster.sql("INSERT INTO ledger (batch) SELECT 1 FROM generate_series(1, 100)")
    first = cluster.json("backup", "db", "--full")["snapshot"]
    for batch in (2, 3, 4):  # WAL between the two base backups: several segments
        cluster.sql(f"INSERT INTO ledger (batch) SELECT {batch} FROM generate_series(1, 100); SELECT pg_switch_wal()")
    second = cluster.json("backup", "db", "--full")["snapshot"]
    start = second["stats"]["postgres"]["start_wal_file"]
    cluster.sql("INSERT INTO ledger (batch) SELECT 5 FROM generate_series(1, 100)")
    (between,) = cluster.sql("SELECT now()::text")[0]
    time.sleep(1.2)
    cluster.sql("INSERT INTO ledger (batch) SELECT 6 FROM generate_series(1, 100)")
    incremental = cluster.json("backup", "db")["snapshot"]  # waits until this WAL is archived
    before = _wal_names(cluster)
    older = [n for n in before if n[:24] < start and not n.endswith(".history")]
    assert older and any(n.endswith(".backup") for n in older), before  # the first backup's label, too

    # keep-last 1 keeps the incremental; its base backup stays with it, the first backup goes.
    plan = cluster.json("forget", "--source", "db", "--keep-last", "1", "--dry-run")
    (src,) = plan["sources"]
    assert {k["id"]: k["reasons"] for k in src["keep"]} == {
        incremental["id"]: ["last snapshot"],
        second["id"]: [f"base of {incremental['id'][:8]}"],
    }
    assert [r["id"] for r in src["remove"]] == [first["id"]]
    assert src["wal_expired"] == older
    assert _wal_names(cluster) == before  # a dry run changes nothing

    done = cluster.json("forget", "--source", "db", "--keep-last", "1")
    assert done["wal_removed"] == len(older) and done["snapshots_removed"] == 1
    for peer in range(6):
        after = _wal_names(cluster, peer)
        assert after == [n for n in before if n not in older], peer
        assert all(n[:24] >= start for n in after if not n.endswith(".history"))
    assert cluster.cli("check").exit_code == 0  # no gap: the archive now starts at the kept backup's start

    # prune frees the first base backup and the expired WAL (PostgreSQL's archiver may be
    # running a wal-push meanwhile: then the condemned set waits for it, and a rerun deletes).
    freed = 0
    for _ in range(5):
        pruned = cluster.json("prune", "--grace", "0")
        freed += pruned["deleted"]["packs"] + pruned["repacked_packs"]
        if not pruned["waiting"]:
            break
    assert freed > 0 and not pruned["waiting"], pruned
    assert cluster.cli("check", "--read-data").exit_code == 0

    # PITR inside the kept window: the kept base backup, recovered to a time after it.
    port = _restore_and_start(cluster, restored, second["id"], "--to-time", str(between))
    rows = cluster.sql("SELECT batch, count(*) FROM ledger GROUP BY batch ORDER BY batch", port)
    assert rows == [(b, 100) for b in range(1, 6)]
    port = _restore_and_start(cluster, restored, incremental["id"])
    assert cluster.sql("SELECT count(*) FROM ledger", port) == [(600,)]
    missing = cluster.cli("restore", first["id"], "--source", "db", "--target", str(cluster.base / "gone"))
    assert missing.exit_code == 8  # forgotten: not in the repository


def test_forget_keeps_all_wal_when_no_base_backup_is_kept(cluster: Cluster) -> None:  # noqa: F811
    """A policy that keeps only a logical dump keeps every WAL record of the physical source it does not judge."""
    before = _wal_names(cluster)
    dump = cluster.json("backup", "dump")["snapshot"]
    plan = cluster.json("forget", "--source", "dump", "--keep-last", "1", "--dry-run")
    (src,) = plan["sources"]
    assert src["wal_expired"] == [] and src["wal_note"] == "" and src["keep"][0]["id"] == dump["id"]
    assert _wal_names(cluster) == before
