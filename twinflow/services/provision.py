"""First-run installs: Debian packages, their unpacked files and the Kafka/QuestDB jars.

Every step is idempotent and cheap once done, shows progress while it downloads, and on
failure says what was tried and what to do next.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from twinflow.errors import ProvisionError

Progress = Callable[[str], None]

INFRA_DIR = Path(__file__).resolve().parents[2] / "infra"
JAVA_MIN_MAJOR = 17

# executable -> Debian package that provides it
DEBIAN_PACKAGES: dict[str, str] = {
    "mosquitto": "mosquitto",
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "chromium": "chromium",  # the browser the viewer's tests drive (never a downloaded one)
}
# Debian installs daemons in /usr/sbin, which is not on every user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin")


def find_executable(name: str) -> str | None:
    """``name`` on PATH, or in the sbin folders Debian uses for daemons."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _EXTRA_BIN_DIRS:
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _stream(
    argv: Sequence[str], report: Callable[[str], None], cwd: str | Path | None = None
) -> str:
    """Run argv (in ``cwd``), handing every output line to ``report``; return the output."""
    lines: list[str] = []
    with subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            report(line.strip())
    output = "\n".join(lines)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(argv), output)
    return output


def _matching(pattern: str, progress: Progress) -> Callable[[str], None]:
    """Report the first group of lines matching ``pattern``, drop the rest."""
    compiled = re.compile(pattern)

    def report(line: str) -> None:
        match = compiled.search(line)
        if match:
            progress(match.group(1)[:120])

    return report


def ensure_executables(names: Sequence[str], progress: Progress) -> dict[str, str]:
    """Find each executable, installing its Debian package if it is missing."""
    missing = [name for name in names if find_executable(name) is None]
    if missing:
        packages = sorted({DEBIAN_PACKAGES[name] for name in missing})
        _apt_install(packages, progress)
    found: dict[str, str] = {}
    for name in names:
        path = find_executable(name)
        if path is None:
            raise ProvisionError(
                f"{name} is still missing after installing {DEBIAN_PACKAGES[name]}"
            )
        found[name] = path
    return found


def resolve_tool(configured: str, env_var: str, progress: Progress) -> str:
    """The executable a setting names: a known tool name is installed if missing."""
    if configured in DEBIAN_PACKAGES:
        return ensure_executables([configured], progress)[configured]
    if find_executable(configured) is None:
        raise ProvisionError(f"{env_var}={configured!r} is not an executable; fix or unset it")
    return configured


def _apt_install(packages: list[str], progress: Progress) -> None:
    apt = shutil.which("apt-get")
    hint = f"install them yourself (Debian/Ubuntu: apt-get install {' '.join(packages)})"
    if apt is None:
        raise ProvisionError(f"missing packages {packages} and no apt-get here; {hint}")
    if os.geteuid() != 0:
        raise ProvisionError(f"missing packages {packages}; as a non-root user, {hint}")
    progress(f"installing Debian packages: {', '.join(packages)}")
    report = _matching(r"^((?:Unpacking|Setting up|E:) .*)", progress)
    try:
        _stream([apt, "update"], report)
        _stream([apt, "install", "-y", "--no-install-recommends", *packages], report)
    except subprocess.CalledProcessError as exc:
        tail = "\n".join(str(exc.output).splitlines()[-8:])
        raise ProvisionError(
            f"apt-get could not install {packages} (exit {exc.returncode}). "
            f"Are the Debian package mirrors reachable?\n{tail}"
        ) from None


def extract_debian_package(package: str, dest: Path, progress: Progress) -> Path:
    """Unpack Debian's ``package`` into ``dest`` without installing it; return ``dest``.

    Installing would run the package's maintainer scripts, which may start a system-wide
    daemon; the files alone are enough to run a binary from ``dest``. The unpacked tree
    is reused as it is once there.
    """
    if dest.is_dir():
        return dest
    apt, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg_deb is None:
        raise ProvisionError(
            f"cannot fetch Debian's {package} package here (no apt-get/dpkg-deb); "
            f"install {package} yourself so that it is on PATH"
        )
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress(f"downloading Debian's {package} package (first run only; not installed)")
    report = _matching(r"^((?:Get:\d+|Fetched|E:) .*)", progress)
    with tempfile.TemporaryDirectory(prefix=f"twinflow-{package}-") as download:
        argv = [apt, "download", package]
        try:
            try:
                _stream(argv, report, cwd=download)
            except subprocess.CalledProcessError:
                # Package lists missing (a fresh container) or stale (the version they
                # name is gone from the mirror): refresh them once and try again.
                progress("refreshing the Debian package lists (apt-get update)")
                _stream([apt, "update"], report)
                _stream(argv, report, cwd=download)
            (deb,) = Path(download).glob(f"{package}_*.deb")
            progress(f"unpacking {deb.name}")
            _stream([dpkg_deb, "-x", str(deb), str(staging)], progress)
        except (OSError, subprocess.CalledProcessError, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            output = getattr(exc, "output", None) or str(exc)
            tail = "\n".join(str(output).splitlines()[-8:])
            raise ProvisionError(
                f"could not fetch Debian's {package} package (are the Debian package mirrors "
                f"reachable? as a non-root user, install {package} yourself):\n{tail}"
            ) from None
    staging.rename(dest)
    return dest


def resolve_java(configured: str, progress: Progress) -> str:
    """The java executable to run services with, checked to be Java 17 or newer."""
    java = resolve_tool(configured, "TWINFLOW_SERVICES__JAVA", progress)
    check_java(java)
    return java


def check_java(java: str) -> int:
    """The major version of ``java``; raise unless it is at least 17."""
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ProvisionError(
            f"cannot run {java!r} ({exc}); install a JDK {JAVA_MIN_MAJOR}+ "
            "(apt-get install openjdk-17-jre-headless) or set TWINFLOW_SERVICES__JAVA"
        ) from None
    match = re.search(r'version "(\d+)', result.stderr + result.stdout)
    major = int(match.group(1)) if match else 0
    if major < JAVA_MIN_MAJOR:
        raise ProvisionError(
            f"{java} is Java {major}; Kafka 4 and QuestDB 9 need Java {JAVA_MIN_MAJOR}+. "
            "Install openjdk-17-jre-headless or point TWINFLOW_SERVICES__JAVA at a newer java"
        )
    return major


def heap_options(heap: str) -> list[str]:
    """JVM options for a server's heap: fixed at ``heap`` and resident from the start.

    As Kafka's own start script and Elasticsearch do: a heap that grows on demand makes
    the process's memory climb for an hour toward its maximum, which hides a native
    leak behind normal growth (the soak judges memory by resident size); pre-touched,
    resident memory changes only outside the heap.

    >>> heap_options("1g")
    ['-Xms1g', '-Xmx1g', '-XX:+AlwaysPreTouch']
    """
    return [f"-Xms{heap}", f"-Xmx{heap}", "-XX:+AlwaysPreTouch"]


def resolve_jars(mvn: str, pom: Path, dest: Path, progress: Progress) -> list[Path]:
    """Copy the runtime jars ``pom`` depends on into ``dest`` (skipped when up to date).

    The copy is stamped with the pom's hash, so changing a version in the pom fetches
    the new jars on the next run.
    """
    stamp = dest / ".resolved-from"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return sorted(dest.glob("*.jar"))
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    progress(f"resolving {pom.parent.name} jars from Maven Central (first run only)")
    argv = [
        mvn,
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    try:
        _stream(argv, _matching(r"Downloaded from \S+ \S+/([^/\s]+\.jar) ", progress))
    except (OSError, subprocess.CalledProcessError) as exc:
        output = getattr(exc, "output", None) or str(exc)
        # Maven's first ERROR line names the artifact and the cause; the rest is boilerplate.
        first_error = next(
            (line for line in str(output).splitlines() if line.startswith("[ERROR] ")),
            str(output)[-600:],
        )
        raise ProvisionError(
            f"Maven could not resolve the jars of {pom} (is Maven Central reachable? "
            f"a proxy goes in ~/.m2/settings.xml; a warm ~/.m2 works offline):\n{first_error}"
        ) from None
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    stamp.write_text(digest)
    return sorted(dest.glob("*.jar"))
