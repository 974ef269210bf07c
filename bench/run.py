"""shardvault against restic on the same corpora, in one run; prints ratios.

Corpora (built once under bench/work/): *mixed*, copies of /usr/include,
/usr/lib/gcc and /usr/share/doc plus 256 MiB of random data; *small*, a tree
of many small files (about 130,000: this Python installation's standard
library and site-packages, /usr/share, /usr/include and, where installed,
the Google Cloud SDK's Python tree).  For each tool: first backup,
unchanged re-backup, restore, and a full read-data check; shardvault's peak
RSS too.  ``--memory`` adds invariant 5: the peak RSS of backups of 512 MiB
and 2 GiB of random data, which must not grow with the source.

    .venv/bin/python bench/run.py [--corpus mixed|small|both] [--memory]

Machines are noisy: compare the ratios of one run, not absolute times across
runs.  Both tools run quiet (restic ``-q``, shardvault ``--json``): neither
draws progress nor runs its progress scanner.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
BIN = Path(sys.executable).parent
SOURCES = ["/usr/include", "/usr/lib/gcc", "/usr/share/doc"]
SMALL_SOURCES = [
    sysconfig.get_paths()["stdlib"],
    sysconfig.get_paths()["purelib"],
    "/usr/share",
    "/usr/include",
    "/usr/lib/google-cloud-sdk",
]
RANDOM_MIB = 256
PASSWORD = "benchmark passphrase"


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """Run a command; return (seconds, peak RSS in bytes of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr}")
    return elapsed, usage.ru_maxrss * 1024


def write_random(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def corpus(name: str) -> tuple[Path, int, int]:
    """The corpus ``mixed`` or ``small`` (built on first use); its root, bytes and regular files."""
    root = WORK / ("corpus" if name == "mixed" else "small")
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for src in SOURCES if name == "mixed" else SMALL_SOURCES:
            if os.path.isdir(src):
                # Only what the walk records: sockets and the like would be skipped with a warning anyway.
                shutil.copytree(src, root / src.strip("/").replace("/", "_"), symlinks=True)
        if name == "mixed":
            for i in range(RANDOM_MIB // 64):
                write_random(root / "random" / f"r{i}.bin", 64)
        (root / ".complete").write_text("")
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return root, sum(p.stat().st_size for p in files), len(files)


def sv_config(base: Path, source: Path) -> Path:
    lines = ["[repository]", "k = 4", "n = 6", f'state_dir = "{base / "state"}"']
    (base / "peers").mkdir(parents=True, exist_ok=True)  # init creates each peer's directory, not its parents
    for i in range(6):
        lines += ["[[peers]]", f'name = "p{i}"', f'url = "{base / "peers" / f"p{i}"}"', f'zone = "z{i % 3}"']
    lines += ["[[sources]]", 'name = "corpus"', 'type = "files"', f'path = "{source}"']
    path = base / "shardvault.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def median(values: list[float]) -> float:
    # statistics.median: of an even count, the mean of the middle two (not the slower one, which made
    # --repeat 2 report each tool's worst run).
    return statistics.median(values)


class Tools:
    """Both tools, each with its own repository of the corpus."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD, "RESTIC_PASSWORD": PASSWORD}
        self.sv_base = WORK / "sv"
        self.sv = [str(BIN / "shardvault"), "--config", str(self.sv_base / "shardvault.toml")]
        self.restic_repo = WORK / "restic" / "repo"
        # restic keeps a local cache by default, as shardvault keeps its metadata cache: both get theirs.
        self.restic = ["restic", "--repo", str(self.restic_repo), "--cache-dir", str(WORK / "restic" / "cache"), "-q"]

    def init(self) -> None:
        fresh(self.sv_base)
        sv_config(self.sv_base, self.source)
        fresh(WORK / "restic")
        timed([*self.sv, "init"], self.env)
        timed([*self.restic, "init"], self.env)

    def run(self, cmd: list[str]) -> tuple[float, int]:
        subprocess.run(["sync"], check=True)  # neither tool pays for the other's writeback
        time.sleep(1)
        return timed(cmd, self.env)


def run_tools(source: Path, size: int, repeat: int) -> None:
    tools = Tools(source)
    rows: dict[str, tuple[list[float], list[float], list[int]]] = {}

    def both(name: str, sv_cmd: list[str], restic_cmd: list[str]) -> None:
        # Alternate who goes first: the filesystem remembers what the previous
        # run did (ext4 skips recently deleted inodes, dirty pages flush later).
        row = rows.setdefault(name, ([], [], []))
        if len(row[0]) % 2:
            t_r, _ = tools.run(restic_cmd)
            t_sv, rss = tools.run(sv_cmd)
        else:
            t_sv, rss = tools.run(sv_cmd)
            t_r, _ = tools.run(restic_cmd)
        row[0].append(t_sv)
        row[1].append(t_r)
        row[2].append(rss)

    for _ in range(repeat):
        tools.init()
        both("first backup", [*tools.sv, "backup", "corpus", "--json"], [*tools.restic, "backup", str(source)])
    both("unchanged re-backup", [*tools.sv, "backup", "corpus", "--json"], [*tools.restic, "backup", str(source)])
    for _ in range(repeat - 1):
        both("unchanged re-backup", [*tools.sv, "backup", "corpus", "--json"], [*tools.restic, "backup", str(source)])
    for i in range(repeat):
        sv_out, r_out = WORK / f"sv-restore-{i}", WORK / f"restic-restore-{i}"
        both(
            "restore",
            [*tools.sv, "restore", "latest", "--source", "corpus", "--target", str(sv_out), "--json"],
            [*tools.restic, "restore", "latest", "--target", str(r_out)],
        )
    for _ in range(repeat):
        both("check --read-data", [*tools.sv, "check", "--read-data"], [*tools.restic, "check", "--read-data"])
    for _ in range(repeat):
        # A scrub without a budget reads every shard, oldest first, and records each result.
        both("full scrub", [*tools.sv, "scrub"], [*tools.restic, "check", "--read-data"])

    print(f"median of {repeat} runs each, the tools alternating who goes first; sync before every run")
    print(f"{'operation':<22}{'shardvault':>18}{'restic':>18}{'ratio':>8}{'peak RSS':>11}")
    for name, (sv_times, r_times, rss) in rows.items():
        t_sv, t_r = median(sv_times), median(r_times)
        print(
            f"{name:<22}{t_sv:7.2f} s {size / t_sv / 2**20:5.0f} MiB/s{t_r:7.2f} s {size / t_r / 2**20:5.0f} MiB/s"
            f"{t_sv / t_r:8.2f}{max(rss) / 2**20:7.0f} MiB"
        )
    for name, (sv_times, r_times, _) in rows.items():  # the spread behind each median
        runs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(sv_times, r_times, strict=True))
        print(f"  {name}: runs (shardvault/restic, s): {runs}")
    stored = sum(p.stat().st_size for p in (tools.sv_base / "peers").rglob("*") if p.is_file())
    r_stored = sum(p.stat().st_size for p in tools.restic_repo.rglob("*") if p.is_file())
    print(
        f"stored: shardvault {stored / 2**20:.0f} MiB over 6 peers (4-of-6: survives any 2 lost peers), "
        f"restic {r_stored / 2**20:.0f} MiB (one copy)"
    )
    subprocess.run(["diff", "-rq", "--no-dereference", str(source), str(WORK / "sv-restore-0")], check=True)
    print("shardvault's restore is identical to the corpus (diff -r)")
    for i in range(repeat):
        shutil.rmtree(WORK / f"sv-restore-{i}")
        shutil.rmtree(WORK / f"restic-restore-{i}")
    repair_after_peer_loss(tools, repeat)


def repair_after_peer_loss(tools: Tools, repeat: int) -> None:
    """Repair throughput: every shard of one peer deleted, rebuilt from the other five."""
    lost = tools.sv_base / "peers" / "p0" / "data"
    times, sizes = [], []
    for _ in range(repeat):
        sizes.append(sum(p.stat().st_size for p in lost.rglob("*") if p.is_file()))
        shutil.rmtree(lost)
        seconds, _ = tools.run([*tools.sv, "repair"])
        times.append(seconds)
    t = median(times)
    print(
        f"repair after losing peer p0: {sizes[0] / 2**20:.0f} MiB of shards rebuilt in {t:.2f} s "
        f"({sizes[0] / t / 2**20:.0f} MiB/s written; reads k shards per pack, no restic equivalent)"
    )


def memory() -> None:
    """Invariant 5: peak RSS of a backup does not grow with the source size."""
    for mib in (512, 2048):
        src = fresh(WORK / f"mem-{mib}")
        for i in range(mib // 256):
            write_random(src / f"part{i}.bin", 256)
        base = fresh(WORK / f"mem-sv-{mib}")
        cfg = sv_config(base, src)
        env = os.environ | {"SHARDVAULT_PASSWORD": PASSWORD}
        timed([str(BIN / "shardvault"), "--config", str(cfg), "init"], env)
        seconds, rss = timed([str(BIN / "shardvault"), "--config", str(cfg), "backup", "corpus"], env)
        print(
            f"memory: backup of {mib:5d} MiB in {seconds:6.2f} s ({mib / seconds:4.0f} MiB/s), "
            f"peak RSS {rss / 2**20:4.0f} MiB",
            flush=True,
        )
        shutil.rmtree(src)
        shutil.rmtree(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS for 512 MiB and 2 GiB")
    parser.add_argument("--no-compare", action="store_true", help="skip the restic comparison")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median is reported)")
    parser.add_argument("--corpus", choices=["mixed", "small", "both"], default="both", help="which corpora")
    args = parser.parse_args()
    if shutil.which("restic") is None and not args.no_compare:
        raise SystemExit("restic is not installed (make bench installs it)")
    version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
    print(f"{os.cpu_count()} cores; {version}")
    for name in [] if args.no_compare else ["mixed", "small"] if args.corpus == "both" else [args.corpus]:
        source, size, files = corpus(name)
        what = f"{', '.join(SOURCES)} + {RANDOM_MIB} MiB random" if name == "mixed" else ", ".join(SMALL_SOURCES)
        print(f"\ncorpus {name}: {size / 2**20:.0f} MiB in {files} files ({what})", flush=True)
        run_tools(source, size, args.repeat)
    if args.memory:
        memory()


if __name__ == "__main__":
    main()
