"""The committed OpenAPI document of ``twinflow serve`` (schemas/openapi/serve.v1.json).

``python -m twinflow.serve.openapi`` rewrites it after the API changes; a test fails
while the file and the served document differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twinflow.serve.app import create_app
from twinflow.serve.live import LiveTwin
from twinflow.settings import load_settings
from twinflow.twin_model import load_twin_model

DOCUMENT = Path(__file__).resolve().parents[2] / "schemas" / "openapi" / "serve.v1.json"


def served_document() -> dict[str, Any]:
    """The document the server publishes at /api/v1/openapi.json (default settings)."""
    settings = load_settings()
    live = LiveTwin(settings, load_twin_model(settings.twin_model))
    return create_app(settings, live).openapi()


def rendered(document: dict[str, Any]) -> str:
    """The document as the committed file holds it."""
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    DOCUMENT.parent.mkdir(exist_ok=True)
    DOCUMENT.write_text(rendered(served_document()))
    print(f"wrote {DOCUMENT}")
