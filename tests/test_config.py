"""Configuration errors name the file, the key and what is wrong; the CLI exits 3."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shardvault.cli import main
from shardvault.config import load_config
from shardvault.errors import ConfigError

GOOD_PEERS = "".join(f'[[peers]]\nname = "p{i}"\nurl = "/tmp/p{i}"\n' for i in range(6))


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("[repository\nk=4", "(syntax)", "Expected"),
        ("[repository]\nk = 4\nn = 6\n", "peers", "at least one"),
        (GOOD_PEERS, "repository", "required"),
        ("[repository]\nn = 6\n" + GOOD_PEERS, "repository.k", "required"),
        ('[repository]\nk = "four"\nn = 6\n' + GOOD_PEERS, "repository.k", "must be int"),
        ("[repository]\nk = 4\nn = 3\n" + GOOD_PEERS, "repository.n", "at least k"),
        ("[repository]\nk = 4\nn = 8\n" + GOOD_PEERS, "peers", "needs at least 8"),
        ("[repository]\nk = 4\nn = 6\nwrite_quorm = 5\n" + GOOD_PEERS, "repository.write_quorm", "unknown key"),
        ("[repository]\nk = 4\nn = 6\nwrite_quorum = 3\n" + GOOD_PEERS, "repository.write_quorum", "between 4 and 6"),
        (
            "[repository]\nk = 4\nn = 6\n" + GOOD_PEERS + '[[peers]]\nname = "p0"\nurl = "/x"\n',
            "peers[6].name",
            "duplicate",
        ),
        (
            "[repository]\nk = 4\nn = 6\n" + GOOD_PEERS.replace('"/tmp/p3"', '"ftp://x/y"'),
            "peers[3].url",
            "unsupported",
        ),
        (
            "[repository]\nk = 4\nn = 6\n" + GOOD_PEERS + '[[sources]]\nname = "s"\ntype = "tape"\npath = "/"\n',
            "sources[0].type",
            "unsupported source type",
        ),
        (
            "[repository]\nk = 4\nn = 6\n" + GOOD_PEERS + '[[sources]]\nname = "s"\ntype = "files"\n',
            "sources[0].path",
            "required",
        ),
    ],
)
def test_config_errors_name_file_key_and_problem(tmp_path: Path, text: str, key: str, what: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and key in message and what in message, message
    result = CliRunner().invoke(main, ["--config", str(path), "snapshots"], env={"SHARDVAULT_PASSWORD": "x"})
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output + result.stderr
    assert key in result.stderr


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHARDVAULT_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["snapshots"], env={"SHARDVAULT_PASSWORD": "x"})
    assert result.exit_code == 3 and "shardvault.toml not found" in result.stderr


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.toml").write_text("[repository]\nk = 2\nn = 3\n" + GOOD_PEERS)
    (tmp_path / "shardvault.toml").write_text("[repository]\nk = 3\nn = 4\n" + GOOD_PEERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHARDVAULT_CONFIG", raising=False)
    assert load_config().repository.k == 3
    monkeypatch.setenv("SHARDVAULT_CONFIG", str(tmp_path / "a.toml"))
    assert load_config().repository.k == 2
    assert load_config(tmp_path / "shardvault.toml").repository.k == 3


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[repository]\nk = 1\nn = 1\nallow_no_redundancy = true\nstate_dir = "st"\n'
        '[[peers]]\nname = "a"\nurl = "peers/a"\n'
        '[[sources]]\nname = "s"\ntype = "files"\npath = "data"\n'
    )
    config = load_config(tmp_path / "c.toml")
    assert config.peers[0].url == f"file://{tmp_path / 'peers/a'}"
    assert config.sources[0].path == tmp_path / "data"
    assert config.repository.state_dir == tmp_path / "st"
    assert config.repository.write_quorum == 1
