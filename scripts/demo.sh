#!/usr/bin/env bash
# The main job on the embedded default: six local-directory peers, 4-of-6.
# Backs up a real directory tree twice (full, then incremental after a change),
# destroys two peers, corrupts a shard on a third, checks, and restores.
set -euo pipefail

DEMO=${DEMO_DIR:-demo}
SOURCE_TREE=${DEMO_SOURCE:-/usr/include}
[ -d "$SOURCE_TREE" ] || SOURCE_TREE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

rm -rf "$DEMO"
mkdir -p "$DEMO/peers"
DEMO=$(cd "$DEMO" && pwd)
export SHARDVAULT_CONFIG="$DEMO/shardvault.toml"
export SHARDVAULT_PASSWORD="demo passphrase, not for real use"

say "Copying $SOURCE_TREE to $DEMO/source (the source to protect)"
cp -a "$SOURCE_TREE" "$DEMO/source"
printf '%s files, %s\n' "$(find "$DEMO/source" -type f | wc -l)" "$(du -sh "$DEMO/source" | cut -f1)"

say "Configuration: 6 peers in 3 zones, k = 4 data + 2 parity shards per pack"
{
  printf '[repository]\nk = 4\nn = 6\nstate_dir = "state"\n\n'
  i=0
  for p in a b c d e f; do
    printf '[[peers]]\nname = "%s"\nurl = "peers/%s"\nzone = "z%d"\n\n' "$p" "$p" $((i / 2 + 1))
    i=$((i + 1))
  done
  printf '[[sources]]\nname = "docs"\ntype = "files"\npath = "source"\n\n'
  printf '[[sources]]\nname = "notes"\ntype = "files"\npath = "notes"\n'
} > "$SHARDVAULT_CONFIG"
cat "$SHARDVAULT_CONFIG"

say "Creating the repository on every peer"
run shardvault init

say "First backup (full)"
run shardvault backup docs

say "Changing the source: one file edited, one added, one deleted"
first_file=$(find "$DEMO/source" -type f -name '*.h' | sort | sed -n 1p)
last_file=$(find "$DEMO/source" -type f | sort | sed -n '$p')
echo "/* edited by the shardvault demo */" >> "$first_file"
head -c 3000000 /dev/urandom > "$DEMO/source/added-by-demo.bin"
rm -f "$last_file"
echo "edited $first_file; added added-by-demo.bin; deleted $last_file"

say "Second backup (incremental: only changed files are read)"
run shardvault backup docs

say "A second, small source backed up into the same repository"
mkdir -p "$DEMO/notes"
for i in 1 2 3; do head -c 200000 /dev/urandom | base64 > "$DEMO/notes/note$i.txt"; done
run shardvault backup notes
run shardvault snapshots
run shardvault check --read-data

say "Disaster: peers a and b are destroyed"
run rm -rf "$DEMO/peers/a" "$DEMO/peers/b"

say "Bit rot: one shard on peer c is corrupted"
# Every pack has exactly one shard on each of the 6 peers.  With a and b gone,
# any pack that also loses its shard on c is down to 3 good shards, below
# k = 4: beyond what 4-of-6 can survive.  We damage a pack of the "notes"
# snapshot, so check must say exactly that "notes" is lost while "docs", whose
# packs all still have 4 good shards, must restore byte for byte.
python "$(dirname "$0")/demo_corrupt.py" c notes

say "Check: names the destroyed peers, the corrupt shard and what it costs"
set +e
run shardvault check --read-data
status=$?
set -e
echo "(check exited with $status: 6 means damage found)"

say "Restore of the latest snapshot into a fresh directory"
run shardvault restore latest --source docs --target "$DEMO/restore"

say "Comparing the restore with the source, byte for byte"
run diff -r --no-dereference "$DEMO/source" "$DEMO/restore"
echo "identical: $(find "$DEMO/restore" -type f | wc -l) files"

say "The notes snapshot needed the lost pack: its restore fails, and says why"
set +e
run shardvault restore latest --source notes --target "$DEMO/restore-notes"
status=$?
set -e
echo "(restore exited with $status: 7 means data lost)"
[ "$status" -eq 7 ]

say "Demo finished: everything is under $DEMO"
