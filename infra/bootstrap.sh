#!/usr/bin/env bash
# Creates .venv with twinflow and its dev tools installed (editable). Idempotent: the
# install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! python=$(pick_python); then
    echo "twinflow needs Python 3.11 or 3.12 (Bytewax 0.21.1 has no wheels for newer ones)." >&2
    echo "Install python3.11 (Debian: apt-get install python3 python3-venv) and retry." >&2
    exit 1
  fi
  echo "• creating .venv with $python"
  if ! "$python" -m venv .venv 2>/dev/null; then
    echo "• python venv module missing; installing python3-venv" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv
    "$python" -m venv .venv
  fi
fi

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "• installing twinflow and its dependencies into .venv"
  .venv/bin/python -m pip install --progress-bar on -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
