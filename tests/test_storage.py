"""The storage root rule, file modes of what lopd writes, and the one id resolver. No engine starts here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lopd import storage
from lopd.errors import LopdError
from lopd.models.lineage import LINEAGE_FILE, write_lineage
from lopd.storage import default_root, find_artifact, write_json_atomic


def test_root_rule_env_then_checkout_then_user_cache(tmp_path, monkeypatch):
    """Before: an installed lopd (no checkout) defaulted to ./storage of wherever it ran, and a checkout only when
    its storage/ existed. Now: $LOPD_ROOT, else a source checkout's storage/, else $XDG_CACHE_HOME/lopd."""
    checkout, site = tmp_path / "repo", tmp_path / "site-packages"
    checkout.mkdir()
    site.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'lopd'\n")
    monkeypatch.setenv("LOPD_ROOT", str(tmp_path / "shared"))
    monkeypatch.setattr(storage, "PACKAGE_PARENT", checkout)
    assert default_root() == tmp_path / "shared"

    monkeypatch.delenv("LOPD_ROOT")
    assert default_root() == checkout / "storage"  # a checkout, even before storage/ exists

    monkeypatch.setattr(storage, "PACKAGE_PARENT", site)  # installed: never inside site-packages
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "lopd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "lopd"


def test_the_repository_itself_is_a_checkout(monkeypatch):
    monkeypatch.delenv("LOPD_ROOT", raising=False)
    assert default_root() == Path(__file__).resolve().parent.parent / "storage"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_json_files_honour_the_umask(tmp_path, umask):
    """Before: write_json_atomic went through mkstemp, so manifest.json, meta.json and lopd_lineage.json were 0600
    whatever the umask, unreadable by a team sharing the root."""
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "manifest.json", {"id": "s-x"})
        write_lineage(tmp_path, {"sft_data_model": "f"})
    finally:
        os.umask(old)
    for name in ("manifest.json", LINEAGE_FILE):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [LINEAGE_FILE, "manifest.json"]  # no temporary left


def make_sets(directory: Path, *ids: str) -> None:
    for set_id in ids:
        (directory / set_id).mkdir(parents=True)
        (directory / set_id / "meta.json").write_text("{}")


def test_resolver_path_id_prefix_and_ambiguity(tmp_path):
    sets = tmp_path / "rollouts"
    make_sets(sets, "r-abc123", "r-abd456", "r-abc123x")

    def find(ref: str) -> Path:
        return find_artifact(sets, ref, "meta.json", "rollout set")

    assert find(str(sets / "r-abd456")) == sets / "r-abd456"  # a path
    assert find("r-abd") == sets / "r-abd456"  # a unique prefix
    assert find("r-abc123") == sets / "r-abc123"  # a full id wins over the longer id it prefixes
    with pytest.raises(LopdError) as info:
        find("r-ab")
    message = str(info.value)
    assert "\n" not in message and "ambiguous" in message
    assert "r-abc123, r-abc123x, r-abd456" in message
    with pytest.raises(LopdError, match="no rollout set matches 'r-zz'"):
        find("r-zz")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LopdError, match="is not a rollout set .it holds no meta.json"):
        find(str(tmp_path / "plain"))
    with pytest.raises(LopdError, match="no rollout set matches"):
        find(str(tmp_path / "missing"))  # an absolute path is never globbed as a prefix
