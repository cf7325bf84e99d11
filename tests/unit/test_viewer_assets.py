"""The viewer's chart library: the pinned version, the stamp check and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinflow.errors import ProvisionError
from twinflow.serve.server import viewer_assets
from twinflow.services.viewer import (
    FILES,
    STAMP,
    VIEWER_DIR,
    install_viewer_assets,
    is_installed,
    locked_package,
)
from twinflow.settings import Settings


def _lock(tmp_path: Path, packages: object) -> Path:
    lock = tmp_path / "package-lock.json"
    lock.write_text(json.dumps({"lockfileVersion": 3, "packages": packages}))
    return lock


def _installed(dest: Path, stamp: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (dest / Path(name).name).write_text("/* copied */")
    (dest / STAMP).write_text(stamp + "\n")


def test_the_chart_library_is_pinned_to_the_locked_version() -> None:
    wanted = json.loads((VIEWER_DIR / "package.json").read_text())["dependencies"]["uplot"]
    stamp = locked_package(VIEWER_DIR / "package-lock.json")
    name, integrity = stamp.split(" ")
    assert name == f"uplot@{wanted}"
    assert wanted[0].isdigit(), "package.json must pin an exact version, not a range"
    assert integrity.startswith("sha512-")


def test_a_lock_without_the_package_names_the_fix(tmp_path: Path) -> None:
    lock = _lock(tmp_path, {"": {"name": "twinflow-viewer"}})
    with pytest.raises(ProvisionError, match=r"pins no uplot version.*npm install --save-exact"):
        locked_package(lock)


def test_an_unreadable_lock_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "package-lock.json"
    lock.write_text("{not json")
    with pytest.raises(ProvisionError, match="cannot read the npm lock file"):
        locked_package(lock)


def test_the_stamp_decides_whether_to_install(tmp_path: Path) -> None:
    lock = _lock(tmp_path, {"node_modules/uplot": {"version": "1.6.32", "integrity": "sha512-x"}})
    stamp = locked_package(lock)
    assert stamp == "uplot@1.6.32 sha512-x"
    dest = tmp_path / "viewer"
    assert not is_installed(dest, stamp)
    _installed(dest, "uplot@1.6.31 sha512-y")
    assert not is_installed(dest, stamp), "an older copy must be replaced"
    _installed(dest, stamp)
    assert is_installed(dest, stamp)
    (dest / "uPlot.min.css").unlink()
    assert not is_installed(dest, stamp), "a missing file must be copied again"


def test_installed_assets_need_no_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(state_dir=tmp_path)
    _installed(viewer_assets(settings), locked_package(VIEWER_DIR / "package-lock.json"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert install_viewer_assets(settings, print) == viewer_assets(settings)


def test_missing_npm_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ProvisionError, match=r"npm is missing.*apt-get install npm"):
        install_viewer_assets(Settings(state_dir=tmp_path), print)
    assert not (tmp_path / "viewer").exists()
