"""QuestDB from its Maven Central jar, with its data root inside the state folder."""

from __future__ import annotations

from connectors.questdb import QuestDBError, QuestDBHttp
from twinflow.services.base import LocalService
from twinflow.services.provision import (
    INFRA_DIR,
    Progress,
    heap_options,
    resolve_jars,
    resolve_java,
    resolve_tool,
)


class QuestDBService(LocalService):
    """A local QuestDB: HTTP (REST, ILP, console), PostgreSQL wire, ILP/TCP."""

    name = "questdb"

    def ports(self) -> dict[str, int]:
        """All four listeners."""
        q = self.settings.questdb
        return {
            "questdb.http_port": q.http_port,
            "questdb.pg_port": q.pg_port,
            "questdb.ilp_tcp_port": q.ilp_tcp_port,
            "questdb.min_http_port": q.min_http_port,
        }

    def endpoints(self) -> list[str]:
        """Console/REST URL and the PG wire address."""
        q = self.settings.questdb
        return [f"console+REST+ILP {q.http_url}", f"PG wire 127.0.0.1:{q.pg_port}"]

    def _server_conf(self) -> str:
        q = self.settings.questdb
        conf = {
            "http.bind.to": f"127.0.0.1:{q.http_port}",
            "http.min.net.bind.to": f"127.0.0.1:{q.min_http_port}",
            "pg.net.bind.to": f"127.0.0.1:{q.pg_port}",
            "line.tcp.net.bind.to": f"127.0.0.1:{q.ilp_tcp_port}",
            "pg.user": q.pg_user,
            "pg.password": q.pg_password.get_secret_value(),
            "line.udp.enabled": "false",
            "telemetry.enabled": "false",
            # Prometheus metrics on the minimal HTTP server (commits, rows written, WAL).
            "metrics.enabled": "true",
        }
        if q.http_auth is not None:
            # HTTP basic auth on REST, ILP over HTTP and the console (QuestDB OSS).
            conf["http.user"], conf["http.password"] = q.http_auth
        return "".join(f"{key}={_property(value)}\n" for key, value in conf.items())

    def prepare(self, progress: Progress) -> list[str]:
        """Fetch the jar and write conf/server.conf under the data root."""
        java = resolve_java(self.settings.services.java, progress)
        jars = resolve_jars(
            resolve_tool(self.settings.services.maven, "TWINFLOW_SERVICES__MAVEN", progress),
            INFRA_DIR / "maven" / "questdb" / "pom.xml",
            self.settings.jar_dir / "questdb",
            progress,
        )
        conf_dir = self.home / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf_file = conf_dir / "server.conf"
        conf_file.write_text(self._server_conf())
        conf_file.chmod(0o600)
        (questdb_jar,) = (jar for jar in jars if jar.name.startswith("questdb-"))
        return [
            java,
            *heap_options(self.settings.questdb.heap),
            "-Djava.awt.headless=true",
            "-p",
            str(questdb_jar.resolve()),
            "-m",
            "io.questdb/io.questdb.ServerMain",
            "-d",
            str(self.home.resolve()),
        ]

    def healthy(self) -> bool:
        """``SELECT 1`` over HTTP returns 1."""
        try:
            result = QuestDBHttp(self.settings.questdb, timeout_s=3).exec("SELECT 1")
        except QuestDBError:
            return False
        return result.rows == ((1,),)


def _property(value: str) -> str:
    r"""``value`` escaped for a Java properties file (server.conf is read as one).

    >>> print(_property(r" p\w;d=é"))
    \ p\\w;d=\u00e9
    """
    escaped = []
    for char in value.replace("\\", "\\\\"):
        if 0x20 <= ord(char) < 0x7F:
            escaped.append(char)
        else:  # \uXXXX of each UTF-16 code unit (surrogate pairs above U+FFFF)
            units = char.encode("utf-16-be")
            escaped.extend(
                f"\\u{int.from_bytes(units[i : i + 2]):04x}" for i in range(0, len(units), 2)
            )
    text = "".join(escaped)
    return "\\" + text if text.startswith(" ") else text
