"""The collection builds, and every plugin's documentation renders."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGINS = [("module", "meshcapture.sidecar.rules"), ("module", "meshcapture.sidecar.routes"),
           ("module", "meshcapture.sidecar.probe"), ("module", "meshcapture.sidecar.persist"),
           ("connection", "meshcapture.sidecar.netns"),
           ("filter", "meshcapture.sidecar.cluster_env"), ("filter", "meshcapture.sidecar.capture_plan")]

pytestmark = pytest.mark.skipif(not shutil.which("ansible-galaxy"), reason="ansible-core not on PATH")


def test_collection_builds(tmp_path):
    subprocess.run(["ansible-galaxy", "collection", "build", "--output-path", str(tmp_path), REPO],
                   check=True, capture_output=True)
    with tarfile.open(str(tmp_path / "meshcapture-sidecar-0.1.0.tar.gz")) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert manifest["collection_info"]["license"] == ["Apache-2.0"]
    for path in ("plugins/modules/rules.py", "plugins/modules/routes.py", "plugins/modules/persist.py",
                 "roles/capture/tasks/main.yml", "roles/capture/files/meshcapture-restore.sh",
                 "plugins/connection/netns.py", "meta/runtime.yml",
                 # Execution environments (ansible-builder): tests/unit/test_execution_environment.py
                 "meta/execution-environment.yml", "meta/ee-requirements.txt", "bindep.txt"):
        assert path in names
    assert not any(name.startswith((".cache", ".venv")) for name in names)


@pytest.mark.parametrize("kind, name", PLUGINS, ids=[name for kind, name in PLUGINS])
def test_ansible_doc_renders(kind, name):
    proc = subprocess.run(["ansible-doc", "-t", kind, "--json", name], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)[name]["doc"]
    assert doc.get("short_description")


def test_role_variables_page_is_current():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "role_docs.py"), "--check"], check=False)
    assert proc.returncode == 0, "docs/role-variables.md is stale: run python scripts/role_docs.py"
