"""The viewer page's chart library: uPlot from npm, pinned by ``infra/viewer``'s lock file.

npm runs in a build folder under the state folder, so ``node_modules`` never lands in the
repository; the two files the page loads are copied to where ``twinflow serve`` serves
``/vendor`` from. A stamp file records which locked package they came from, so a second
run over the same lock file does nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from twinflow.errors import ProvisionError
from twinflow.serve.server import viewer_assets
from twinflow.services.provision import INFRA_DIR, _matching, _stream
from twinflow.settings import Settings

VIEWER_DIR = INFRA_DIR / "viewer"
PACKAGE = "uplot"
FILES = ("dist/uPlot.iife.min.js", "dist/uPlot.min.css")
"""What the page loads, as paths inside the npm package."""
STAMP = "uplot.stamp"


def locked_package(lock: Path) -> str:
    """The locked chart package as ``name@version integrity``: what the stamp records."""
    try:
        packages = json.loads(lock.read_text())["packages"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProvisionError(f"cannot read the npm lock file {lock}: {exc}") from None
    entry = packages.get(f"node_modules/{PACKAGE}") if isinstance(packages, dict) else None
    if not isinstance(entry, dict) or not entry.get("version"):
        raise ProvisionError(
            f"{lock} pins no {PACKAGE} version; in {lock.parent} run "
            f"`npm install --save-exact {PACKAGE}@<version>` to pin one"
        )
    return f"{PACKAGE}@{entry['version']} {entry.get('integrity', '')}".strip()


def is_installed(dest: Path, stamp: str) -> bool:
    """Whether ``dest`` holds every file, copied from the package ``stamp`` names."""
    marker = dest / STAMP
    if not marker.is_file() or marker.read_text().strip() != stamp:
        return False
    return all((dest / Path(name).name).is_file() for name in FILES)


def install_viewer_assets(settings: Settings, progress: Callable[[str], None]) -> Path:
    """Install the locked uPlot with ``npm ci`` and copy its files for the page; idempotent."""
    dest = viewer_assets(settings)
    stamp = locked_package(VIEWER_DIR / "package-lock.json")
    if is_installed(dest, stamp):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise ProvisionError(
            "npm is missing; the viewer page's chart library is installed with it: install "
            "Node.js and npm (Debian/Ubuntu: apt-get install npm), then run `twinflow setup`"
        )
    build = settings.state_dir / "viewer-build"
    build.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(VIEWER_DIR / name, build / name)
    progress(f"installing {stamp.split()[0]} for the viewer page (npm ci in {build})")
    try:
        _stream(
            [npm, "ci", "--no-audit", "--no-fund"],
            _matching(r"^((?:added|npm (?:error|ERR!)) .*)", progress),
            cwd=build,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        output = getattr(exc, "output", None) or str(exc)
        tail = "\n".join(output.splitlines()[-10:])
        raise ProvisionError(
            f"npm ci failed in {build}:\n{tail}\nCheck that npm can reach its registry "
            "(`npm config get registry`; set a proxy or mirror there if needed), then run "
            "`twinflow setup` again"
        ) from None
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        source = build / "node_modules" / PACKAGE / name
        if not source.is_file():
            raise ProvisionError(
                f"npm installed {stamp.split()[0]} without {name}; pin a version that has it "
                f"in {VIEWER_DIR / 'package.json'} and its lock file"
            )
        shutil.copyfile(source, dest / source.name)
    # Written last: an interrupted copy leaves no stamp, so the next run redoes it.
    (dest / STAMP).write_text(stamp + "\n")
    return dest
