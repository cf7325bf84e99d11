"""First-run installs: the error paths a user hits when a download cannot succeed."""

import hashlib
import uuid
from pathlib import Path

import pytest

from twinflow.errors import ProvisionError
from twinflow.services.provision import check_java, find_executable, resolve_jars

pytestmark = pytest.mark.integration

BOGUS_POM_TEMPLATE = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.twinflow.test</groupId><artifactId>bogus</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.twinflow.nonexistent</groupId><artifactId>no-such-jar-{suffix}</artifactId>
      <version>0.0.1</version>
    </dependency>
  </dependencies>
</project>
"""


def test_unresolvable_jar_gives_a_clear_error(tmp_path: Path) -> None:
    pom = tmp_path / "pom.xml"
    suffix = uuid.uuid4().hex[:8]  # unique, so Maven's cache of a past miss is not what we test
    pom.write_text(BOGUS_POM_TEMPLATE.format(suffix=suffix))
    mvn = find_executable("mvn")
    assert mvn is not None
    with pytest.raises(ProvisionError, match=rf"(?s)Maven could not resolve.*no-such-jar-{suffix}"):
        resolve_jars(mvn, pom, tmp_path / "lib", lambda _line: None)
    assert not (tmp_path / "lib").exists()


def test_resolved_jars_are_not_fetched_again(tmp_path: Path) -> None:
    pom = tmp_path / "pom.xml"
    pom.write_text(BOGUS_POM_TEMPLATE.format(suffix="cached"))
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "already-there.jar").write_bytes(b"")

    (lib / ".resolved-from").write_text(hashlib.sha256(pom.read_bytes()).hexdigest())
    # "false" would fail if Maven were run at all.
    assert resolve_jars("false", pom, lib, lambda _line: None) == [lib / "already-there.jar"]


def test_a_java_that_is_not_java_is_refused() -> None:
    with pytest.raises(ProvisionError, match=r"Java 0.*TWINFLOW_SERVICES__JAVA"):
        check_java("true")
