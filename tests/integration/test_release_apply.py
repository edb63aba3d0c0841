"""meshcapture.sidecar.rules with istio_version against the real kernel.

From Istio 1.24 on the module returns Istio's own iptables-restore payloads
(`-N CHAIN`); state=present must apply exactly that ruleset, idempotently,
also when switching between releases.  Every run happens inside namespaces
the test created (deleted at teardown, also on failure).
"""

import re

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_marker import MARKER_CHAIN
from rules_helpers import CONFIGS, FAMILIES, apply, assert_same, ok, restore, saves

pytestmark = pytest.mark.netns

_MARKER = re.compile(r"^(\[\d+:\d+\] )?(:%s |-A %s )" % (MARKER_CHAIN, MARKER_CHAIN))


def without_marker(dumps):
    """{family: save} without the lines of the ownership marker chain."""
    out = {}
    for family, text in dumps.items():
        lines = [line for line in text.splitlines() if not _MARKER.match(line)]
        out[family] = "\n".join(lines) + "\n" if lines else ""
    return out


def reference(netns_factory, result, tag):
    """The tables of a fresh namespace after a plain iptables-restore --noflush of the result's payloads
    (as istio-iptables applies them)."""
    ns = netns_factory(tag)
    for family in FAMILIES:
        if result["restore"][family]:
            restore(ns, family, result["restore"][family])
    return saves(ns)


@pytest.mark.parametrize("version, name", [
    ("1.21", "tproxy"), ("1.23", "dual-dns"), ("1.24", "kubevirt"), ("1.24", "dual-dns"), ("1.24", "trace"),
    ("1.25", "trace"), ("1.26", "dual-dns"), ("1.26", "groups"), ("1.30", "vm-redirect"),
])
def test_release_applies_its_payload_idempotently(netns_factory, tmp_path, version, name):
    ns = netns_factory("rel")
    opts = dict(CONFIGS[name], istio_version=version)
    first = ok(apply(ns, tmp_path, **opts))
    assert first["changed"] is True
    if version >= "1.24":
        assert first["restore"]["ipv4"].startswith("* ")
    assert_same(without_marker(saves(ns)), reference(netns_factory, first, "ref"))
    again = ok(apply(ns, tmp_path, **opts))
    assert again["changed"] is False
    assert (again["added"], again["removed"]) == ([], [])


def test_switching_releases_converges(netns_factory, tmp_path):
    """1.17 -> 1.26 -> 1.17 in one namespace: each run leaves exactly that release's rules."""
    ns = netns_factory("switch")
    opts = dict(CONFIGS["dual-dns"], drop_invalid=True, outbound_ports_exclude=["25"])
    for version in ("1.17", "1.26", "1.17"):
        result = ok(apply(ns, tmp_path, istio_version=version, **opts))
        assert result["changed"] is True, version
        assert_same(without_marker(saves(ns)), reference(netns_factory, result, "ref" + version.replace(".", "")))
        assert ok(apply(ns, tmp_path, istio_version=version, **opts))["changed"] is False
    ok(apply(ns, tmp_path, state="absent"))
    for family, text in saves(ns).items():
        assert "ISTIO_" not in text, family


@pytest.mark.parametrize("version", ["1.27", "1.28"])
def test_native_nftables_layout_applies_idempotently(netns_factory, tmp_path, version):
    """backend nftables with istio_version 1.27+: Istio's own nftables ruleset, applied once."""
    ns = netns_factory("nft")
    opts = dict(CONFIGS["dual-dns"], istio_version=version, backend="nftables")
    first = ok(apply(ns, tmp_path, **opts))
    assert first["changed"] is True
    assert first["restore"]["nft"].startswith("add table inet istio-proxy-nat\n")
    listing = ns.run(["nft", "list", "table", "inet", "istio-proxy-nat"]).stdout
    assert "jump istio-output-dns" in listing
    assert ("counter" in listing) == (version >= "1.28")
    assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    ok(apply(ns, tmp_path, state="absent", backend="nftables"))
    assert "istio-proxy" not in ns.run(["nft", "list", "tables"]).stdout
