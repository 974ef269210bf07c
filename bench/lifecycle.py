"""Issue 9's benchmarks: opening a repository of 10,000 index files, and prune against restic.

1. **Index files.**  A 4-of-6 repository (6 local-directory peers) whose
   index holds ``--index-files`` (10,000) index files, built as the issue
   describes them piling up: one ``wal-push`` each.  Two child processes
   (two writers with their own state directories, as two hosts would be)
   announce their session once and call the library's
   :func:`shardvault.backup.wal.push` in a loop on
   4 KiB WAL files of random bytes, so every push stores one real pack
   (6 shards), one index file naming it and one WAL record referencing its
   chunk; fsync is off while building (the measurements use a config with
   fsync on).  One ``backup`` of a small files source adds a snapshot.
   Then, before and after ``shardvault prune --grace 0`` (which has nothing
   to delete, since every pack is referenced, and compacts the index into
   files of 2,000 pack records): ``snapshots`` (opens the repository),
   an unchanged ``backup`` of the small source (loads the index),
   ``check`` (loads the index and every WAL record) and ``wal-push`` of one
   more segment (loads the index), each with a cold cache
   (a fresh state directory per run, as on a new host) and a warm one.

2. **Prune against restic.**  The same history in both tools: back up a
   corpus (v1: 128 MiB of random data in 16 files of 8 MiB, a copy of
   /usr/lib/python3.11 and half of /usr/include), replace half of it (the
   odd-numbered random files get new random bytes, the /usr/include half
   becomes the other half; v2), back up again, ``forget --keep-last 1``;
   then ``shardvault prune --grace 0 --max-unused 5`` against ``restic
   prune`` (its default ``--max-unused 5%``).  Repository sizes before and
   after; afterwards both restore the kept snapshot, compared to v2 with
   ``diff -r``, and both pass ``check --read-data``.  A second history
   backs up v3 (only the half of v1 that v2 keeps) instead of v2, so that
   half of the repository is garbage.

    .venv/bin/python bench/lifecycle.py [--index-files N] [--repeat R]

Machines are noisy: compare the ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run import BIN, PASSWORD, WORK, fresh, median, timed, write_random

HERE = WORK / "lifecycle"
K, N = 4, 6
MIB = 1 << 20
WAL_BYTES = 4096


def sv_config(
    base: Path, state_dir: Path, sources: dict[str, tuple[str, str]], fsync: bool = True, name: str = "sv.toml"
) -> Path:
    """A 4-of-6 config over ``base/peers``; ``sources``: name -> (type, path or DSN)."""
    lines = ["[repository]", f"k = {K}", f"n = {N}", f'state_dir = "{state_dir}"', f"fsync = {str(fsync).lower()}"]
    (base / "peers").mkdir(parents=True, exist_ok=True)
    for i in range(N):
        lines += ["[[peers]]", f'name = "p{i}"', f'url = "{base / "peers" / f"p{i}"}"', f'zone = "z{i % 3}"']
    for source, (kind, where) in sources.items():
        key = "dsn" if kind == "postgres" else "path"
        lines += ["[[sources]]", f'name = "{source}"', f'type = "{kind}"', f'{key} = "{where}"']
    path = base / name
    path.write_text("\n".join(lines) + "\n")
    return path


def env() -> dict[str, str]:
    return os.environ | {"SHARDVAULT_PASSWORD": PASSWORD, "RESTIC_PASSWORD": PASSWORD}


def settle() -> None:
    subprocess.run(["sync"], check=True)  # no command pays for the previous one's writeback
    time.sleep(1)


def timed_json(cmd: list[str]) -> tuple[float, dict[str, object]]:
    """Run a ``--json`` command; return (seconds, its JSON document)."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env(), stdout=out, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()}\n{text}")
    doc: dict[str, object] = json.loads(text)
    return elapsed, doc


def tree_size(root: Path, under: str | None = None) -> int:
    """Bytes of the regular files below ``root`` (only those under a directory called ``under``, if given)."""
    total = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and (under is None or under in p.relative_to(root).parts):
            total += p.stat().st_size
    return total


def sv_stored(peers: Path) -> tuple[int, int]:
    """(raw bytes on all peers, bytes per copy): shards count k/n of their size, metadata 1/n (one copy each)."""
    raw = tree_size(peers)
    shards = tree_size(peers, "data")
    return raw, round(shards * K / N + (raw - shards) / N)


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


# -- 1. opening a repository of many index files ----------------------------------------------------------------


def push_wal(config: str, first: int, step: int, count: int) -> None:
    """Child process: ``count`` wal-pushes of 4 KiB random segments, numbers first, first + step, ..."""
    from shardvault.backup.wal import push
    from shardvault.config import PostgresSource, load_config
    from shardvault.repository import Repository
    from shardvault.repository.sessions import SessionKind

    cfg = load_config(config)
    source = cfg.source("db")
    assert isinstance(source, PostgresSource)
    spool = Path(config).parent / f"wal-{first}"
    spool.mkdir(exist_ok=True)
    with Repository.open(cfg, PASSWORD) as repo:
        # push() announces a session each call, and announcing drops the loaded index (for a
        # process per segment, as archive_command runs it, that is the one load anyway).  This
        # builder is one long process with nothing pruning: announce once, keep the index.
        repo.announce(SessionKind.BACKUP)
        repo.announce = lambda kind=None: None  # type: ignore[method-assign]
        for i in range(first, first + step * count, step):
            segment = spool / f"00000001{i >> 8:08X}{i & 0xFF:08X}"
            segment.write_bytes(os.urandom(WAL_BYTES))
            if not push(repo, source, segment):
                raise SystemExit(f"{segment.name} was already archived")
            segment.unlink()
    spool.rmdir()


def build_index_history(base: Path, files: int, sources: dict[str, tuple[str, str]]) -> Path:
    """The repository of part 1; returns the measuring config's path (fsync on)."""
    fresh(base)
    cfg = sv_config(base, base / "state", sources)
    timed([str(BIN / "shardvault"), "--config", str(cfg), "init"], env())
    writers = 2  # one per core, each its own "host" (state directory)
    start = time.perf_counter()
    procs = []
    for w in range(writers):
        wcfg = sv_config(base, base / f"writer-{w}", sources, fsync=False, name=f"writer-{w}.toml")
        count = files // writers + (1 if w < files % writers else 0)
        cmd = [sys.executable, __file__, "--push-wal", str(wcfg), str(w), str(writers), str(count)]
        procs.append(subprocess.Popen(cmd, env=env()))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit("building the WAL history failed")
    built = time.perf_counter() - start
    print(f"built {files} wal-pushes (2 writer processes, fsync off) in {built:.0f} s", flush=True)
    timed([str(BIN / "shardvault"), "--config", str(cfg), "backup", "small"], env())
    return cfg


def index_files(base: Path) -> int:
    return sum(1 for _ in (base / "peers" / "p0" / "index").iterdir())


def measure_open(
    base: Path, sources: dict[str, tuple[str, str]], repeat: int, label: str, history: int
) -> dict[str, float]:
    """Median seconds of each command, cold (a fresh state directory per run) and warm."""
    spool = base / "segments"
    spool.mkdir(exist_ok=True)

    def segment() -> list[str]:
        """``wal-push`` of the next 4 KiB segment (no gap: check reports one), a new process as archive_command runs."""
        number = history + sum(1 for _ in spool.iterdir())
        path = spool / f"00000001{number >> 8:08X}{number & 0xFF:08X}"
        path.write_bytes(os.urandom(WAL_BYTES))
        return ["wal-push", "--source", "db", str(path)]

    commands: dict[str, Callable[[], list[str]]] = {
        "snapshots": lambda: ["snapshots"],
        "unchanged backup": lambda: ["backup", "small"],
        "check": lambda: ["check"],
        "wal-push": segment,
    }
    result: dict[str, float] = {}
    warm_state = base / f"warm-{label}"
    shutil.rmtree(warm_state, ignore_errors=True)
    warm_cfg = sv_config(base, warm_state, sources, name=f"warm-{label}.toml")
    for name, args in commands.items():
        cold = []
        for i in range(repeat):
            state = base / f"cold-{label}-{i}"
            shutil.rmtree(state, ignore_errors=True)
            cold_cfg = sv_config(base, state, sources, name=f"cold-{label}-{i}.toml")
            settle()
            cold.append(timed([str(BIN / "shardvault"), "--config", str(cold_cfg), *args()], env())[0])
            shutil.rmtree(state)
            cold_cfg.unlink()
        timed([str(BIN / "shardvault"), "--config", str(warm_cfg), *args()], env())  # fills the cache
        warm = []
        for _ in range(repeat):
            settle()
            warm.append(timed([str(BIN / "shardvault"), "--config", str(warm_cfg), *args()], env())[0])
        result[f"{name}, cold cache"] = median(cold)
        result[f"{name}, warm cache"] = median(warm)
        print(f"  {label}: {name}: cold {median(cold):.2f} s, warm {median(warm):.2f} s", flush=True)
    return result


def index_benchmark(files: int, repeat: int) -> None:
    base = HERE / "index"
    small = base.parent / "small-source"
    if not small.exists():
        shutil.copytree("/usr/include/linux", small, symlinks=True)
    sources = {"db": ("postgres", "host=/nonexistent"), "small": ("files", str(small))}
    cfg = build_index_history(base, files, sources)
    before_files = index_files(base)
    before = measure_open(base, sources, repeat, "before", files)
    settle()
    seconds, report = timed_json([str(BIN / "shardvault"), "--config", str(cfg), "prune", "--grace", "0", "--json"])
    after_files = index_files(base)
    print(
        f"prune --grace 0: {seconds:.2f} s; index files {report['index_files_before']} -> "
        f"{report['index_files_after']} (on peer p0: {before_files} -> {after_files}); "
        f"deleted {report['deleted']}",
        flush=True,
    )
    after = measure_open(base, sources, repeat, "after", files)
    print(f"\n4-of-6, 6 local peers; median of {repeat} runs; sync before every run")
    print(f"{'command':<32}{f'{before_files} index files':>20}{f'{after_files} index files':>20}{'after/before':>14}")
    for name in before:
        print(f"{name:<32}{before[name]:>18.2f} s{after[name]:>18.2f} s{after[name] / before[name]:>14.2f}")
    print(f"prune (compaction only){seconds:>27.2f} s")


# -- 2. prune of half garbage against restic -------------------------------------------------------------------


def split_include() -> tuple[list[Path], list[Path]]:
    """/usr/include's top-level entries in two halves of about the same size (largest first, to the lighter)."""
    entries = sorted(Path("/usr/include").iterdir(), key=lambda p: p.name)
    sized = sorted(((tree_size(p) if p.is_dir() else p.lstat().st_size, p) for p in entries), reverse=True)
    halves: tuple[list[Path], list[Path]] = ([], [])
    totals = [0, 0]
    for size, path in sized:
        lighter = 0 if totals[0] <= totals[1] else 1
        halves[lighter].append(path)
        totals[lighter] += size
    return halves


def copy_entries(entries: list[Path], target: Path) -> None:
    target.mkdir(parents=True)
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, target / p.name, symlinks=True)
        else:
            shutil.copy2(p, target / p.name, follow_symlinks=False)


def build_corpora() -> tuple[Path, Path, Path]:
    """v1, v2 and v3 (see the module docstring); what v2 and v3 keep is hard-linked: unchanged to both tools."""
    v1, v2, v3 = HERE / "v1", HERE / "v2", HERE / "v3"
    if (HERE / ".corpora-complete-3").exists():
        return v1, v2, v3
    for d in (v1, v2, v3, HERE / "corpus"):
        shutil.rmtree(d, ignore_errors=True)
    half_a, half_b = split_include()
    (v2 / "random").mkdir(parents=True)
    (v3 / "random").mkdir(parents=True)
    for i in range(16):
        write_random(v1 / "random" / f"{i:02d}.bin", 8)
        if i % 2:
            write_random(v2 / "random" / f"{i:02d}.bin", 8)  # replaced in v2, gone from v3
        else:
            os.link(v1 / "random" / f"{i:02d}.bin", v2 / "random" / f"{i:02d}.bin")
            os.link(v1 / "random" / f"{i:02d}.bin", v3 / "random" / f"{i:02d}.bin")
    shutil.copytree(
        "/usr/lib/python3.11", v1 / "python3.11", symlinks=True, ignore=shutil.ignore_patterns("site-packages")
    )
    shutil.copytree(v1 / "python3.11", v2 / "python3.11", symlinks=True, copy_function=os.link)
    shutil.copytree(v1 / "python3.11", v3 / "python3.11", symlinks=True, copy_function=os.link)
    copy_entries(half_a, v1 / "include-a")
    copy_entries(half_b, v2 / "include-b")
    (HERE / ".corpora-complete-3").write_text("")
    return v1, v2, v3


class History:
    """Both tools' repositories holding v1 and v2 of ``HERE/corpus``, the first snapshot forgotten."""

    def __init__(self) -> None:
        self.source = HERE / "corpus"
        self.sv_base = HERE / "sv"
        self.sv = [str(BIN / "shardvault"), "--config", str(self.sv_base / "sv.toml")]
        self.restic_repo = HERE / "restic" / "repo"
        self.restic = ["restic", "--repo", str(self.restic_repo), "--cache-dir", str(HERE / "restic" / "cache"), "-q"]

    def build(self, v1: Path, v2: Path) -> None:
        fresh(self.sv_base)
        sv_config(self.sv_base, self.sv_base / "state", {"corpus": ("files", str(self.source))})
        fresh(HERE / "restic")
        timed([*self.sv, "init"], env())
        timed([*self.restic, "init"], env())
        v1.rename(self.source)
        try:
            timed([*self.sv, "backup", "corpus"], env())
            timed([*self.restic, "backup", str(self.source)], env())
        finally:
            self.source.rename(v1)
        v2.rename(self.source)
        try:
            timed([*self.sv, "backup", "corpus"], env())
            timed([*self.restic, "backup", str(self.source)], env())
        finally:
            self.source.rename(v2)
        timed([*self.sv, "forget", "--keep-last", "1"], env())
        timed([*self.restic, "forget", "--keep-last", "1"], env())

    def verify(self, v2: Path) -> None:
        """The kept snapshot restores identically in both tools, and both repositories check clean."""
        sv_out, r_out = fresh(HERE / "sv-restore"), fresh(HERE / "restic-restore")
        v2.rename(self.source)  # restic restores under the backed-up path; shardvault's check reads nothing there
        try:
            timed([*self.sv, "check", "--read-data"], env())
            timed([*self.restic, "check", "--read-data"], env())
            timed([*self.sv, "restore", "latest", "--source", "corpus", "--target", str(sv_out)], env())
            timed([*self.restic, "restore", "latest", "--target", str(r_out)], env())
            for out in (sv_out, r_out / str(self.source).lstrip("/")):
                subprocess.run(["diff", "-r", "--no-dereference", str(self.source), str(out)], check=True)
        finally:
            self.source.rename(v2)
        shutil.rmtree(sv_out)
        shutil.rmtree(r_out)


def prune_benchmark(repeat: int, v1: Path, v2: Path, what: str) -> None:
    print(f"\ncorpus: v1 {mib(tree_size(v1))}, then {v2.name} {mib(tree_size(v2))} ({what})", flush=True)
    history = History()
    sv_times: list[float] = []
    r_times: list[float] = []
    figures: list[dict[str, int]] = []
    report: dict[str, object] = {}
    for run in range(repeat):
        history.build(v1, v2)
        sv_before, sv_copy_before = sv_stored(history.sv_base / "peers")
        r_before = tree_size(history.restic_repo)
        # Alternate who goes first: the filesystem remembers what the previous run did.
        order = ["sv", "restic"] if run % 2 == 0 else ["restic", "sv"]
        for tool in order:
            settle()
            if tool == "sv":
                cmd = [*history.sv, "prune", "--grace", "0", "--max-unused", "5", "--json"]
                seconds, report = timed_json(cmd)
                sv_times.append(seconds)
            else:
                r_times.append(timed([*history.restic, "prune"], env())[0])
        sv_after, sv_copy_after = sv_stored(history.sv_base / "peers")
        r_after = tree_size(history.restic_repo)
        figures.append(
            {
                "sv_before": sv_before,
                "sv_after": sv_after,
                "sv_copy_before": sv_copy_before,
                "sv_copy_after": sv_copy_after,
                "r_before": r_before,
                "r_after": r_after,
                "sv_freed_reported": int(str(report["freed_total"])),
            }
        )
        history.verify(v2)
        print(
            f"  run {run + 1}: shardvault prune {sv_times[-1]:.2f} s, restic prune {r_times[-1]:.2f} s; "
            f"kept snapshot restores identically in both, both check --read-data clean",
            flush=True,
        )
    f = figures[0]
    t_sv, t_r = median(sv_times), median(r_times)
    print(f"\nprune of the history (v1, {v2.name}, v1 forgotten); median of {repeat} runs, alternating who goes first")
    print(f"{'':<34}{'shardvault':>16}{'restic':>16}{'ratio':>8}")
    print(f"{'prune':<34}{t_sv:>14.2f} s{t_r:>14.2f} s{t_sv / t_r:>8.2f}")
    print(f"{'stored before (all peers)':<34}{mib(f['sv_before']):>16}{mib(f['r_before']):>16}")
    print(f"{'stored after (all peers)':<34}{mib(f['sv_after']):>16}{mib(f['r_after']):>16}")
    print(f"{'freed (all peers)':<34}{mib(f['sv_before'] - f['sv_after']):>16}{mib(f['r_before'] - f['r_after']):>16}")
    print(f"{'stored before (per copy)':<34}{mib(f['sv_copy_before']):>16}{mib(f['r_before']):>16}")
    print(f"{'stored after (per copy)':<34}{mib(f['sv_copy_after']):>16}{mib(f['r_after']):>16}")
    freed_copy = f["sv_copy_before"] - f["sv_copy_after"]
    print(f"{'freed (per copy)':<34}{mib(freed_copy):>16}{mib(f['r_before'] - f['r_after']):>16}")
    used, unused = int(str(report["bytes_used"])), int(str(report["bytes_unused"]))
    print(
        f"garbage before prune (shardvault's count of blob bytes): {mib(unused)} unused of {mib(used + unused)} "
        f"({unused / (used + unused):.0%})"
    )
    print(f"shardvault's report (last run): freed_total {mib(f['sv_freed_reported'])} (bytes deleted)", end="")
    keys = ("packs_total", "packs_unused", "packs_partly_used", "repacked_packs", "repacked_bytes", "new_packs")
    print("; " + ", ".join(f"{k} {report[k]}" for k in keys) + f"; deleted {report['deleted']}")
    print(f"freed per peer (report): {report['freed_bytes']}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--push-wal":
        config, first, step, count = sys.argv[2:6]
        push_wal(config, int(first), int(step), int(count))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-files", type=int, default=10000, help="index files of part 1 (one wal-push each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median is reported)")
    parser.add_argument("--only", choices=("index", "prune"), help="run one part only")
    args = parser.parse_args()
    if shutil.which("restic") is None and args.only != "index":
        raise SystemExit("restic is not installed (make bench-lifecycle installs it)")
    version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
    print(f"{os.cpu_count()} cores; {version}; load average {os.getloadavg()[0]:.1f}", flush=True)
    HERE.mkdir(parents=True, exist_ok=True)
    if args.only != "prune":
        index_benchmark(args.index_files, args.repeat)
    if args.only != "index":
        v1, v2, v3 = build_corpora()
        prune_benchmark(args.repeat, v1, v2, "v2 replaces half of v1: half of v1 is garbage, a third of the whole")
        prune_benchmark(args.repeat, v1, v3, "v3 is the half of v1 that v2 keeps: about half of all is garbage")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes make every figure noisier)")


if __name__ == "__main__":
    main()
