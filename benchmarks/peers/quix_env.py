"""The private virtualenv that the Quix Streams peer (:mod:`benchmarks.peers.quix_app`) runs in.

quixstreams 3.28.1 needs ``confluent-kafka<2.13`` while twinflow uses a newer one, so
the peer cannot share the project's environment. :func:`ensure_quix_python` creates a
venv under the state directory once, pip-installs the pinned requirements into it, and
records them in a stamp file: later calls are free until the list changes. Stdlib only,
since it is imported from the project's own environment.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

REQUIREMENTS: tuple[str, ...] = ("quixstreams==3.28.1", "river==0.26.1", "questdb==6.0.0")
_STAMP = "twinflow-requirements.txt"
_STDERR_TAIL_LINES = 30


def _venv_python(venv: Path) -> Path:
    if sys.platform == "win32":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _run(command: list[str]) -> None:
    """Run ``command`` with its output shown; raise RuntimeError with stderr's tail."""
    tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {process.returncode}:\n{''.join(tail).rstrip()}"
        )


def ensure_quix_python(state_dir: Path) -> Path:
    """The python of the Quix venv at ``state_dir/bench/quix-venv``, created if needed."""
    venv = state_dir / "bench" / "quix-venv"
    python = _venv_python(venv)
    stamp = venv / _STAMP
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(venv)])
    stamp.unlink(missing_ok=True)
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS])
    stamp.write_text(wanted)
    return python
