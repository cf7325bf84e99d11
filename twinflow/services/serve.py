"""``twinflow serve`` as a local service: started by the demo or ``twinflow up serve``.

It is not among the services ``twinflow up`` starts by default (it needs Kafka first and
is a twinflow process, not infrastructure), but ``status`` and ``down`` include it
whenever it runs.
"""

from __future__ import annotations

import http.client
import ssl
import sys
import urllib.request

from twinflow.services.base import LocalService
from twinflow.services.provision import Progress

# Health checks go to the server itself, never through an http_proxy of the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _trusting(certfile: str) -> urllib.request.OpenerDirector:
    """A direct opener that trusts the server's own certificate chain, by any host name."""
    context = ssl.create_default_context(cafile=certfile)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a bare leaf is pinned too
    context.check_hostname = False  # serve.host may be 0.0.0.0, in no certificate
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


class ServeService(LocalService):
    """The twin API and viewer page."""

    name = "serve"

    def ports(self) -> dict[str, int]:
        """The HTTP listener."""
        return {"serve.port": self.settings.serve.port}

    def endpoints(self) -> list[str]:
        """The viewer page."""
        from twinflow.serve.server import url

        return [url(self.settings)]

    def prepare(self, progress: Progress) -> list[str]:
        """Build the page's chart library if missing; the command line of ``twinflow serve``."""
        from twinflow.services.viewer import install_viewer_assets

        install_viewer_assets(self.settings, progress)
        config = self.settings.config_file
        options = ["--config", str(config)] if config is not None else []
        return [sys.executable, "-m", "twinflow", *options, "serve"]

    def healthy(self) -> bool:
        """``/api/v1/health`` answers 200 once the server has read its topics."""
        host = self.settings.serve.host
        shown = f"[{host}]" if ":" in host else host
        serve = self.settings.serve
        url = f"{serve.scheme}://{shown}:{serve.port}/api/v1/health"
        try:
            opener = _DIRECT if serve.ssl_certfile is None else _trusting(str(serve.ssl_certfile))
            with opener.open(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, http.client.HTTPException):
            return False
