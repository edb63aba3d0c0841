"""The cluster_env filter: lines end where a shell ends them, the mapping comes from the option table."""

import pytest

from ansible.errors import AnsibleFilterError

from ansible_collections.meshcapture.sidecar.plugins.filter.cluster_env import (
    CLUSTER_ENV_OPTIONS, cluster_env, parse_cluster_env)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_options import OPTIONS

# Characters Python's splitlines() (and other readers) break a line at, where a
# shell reads on: each could hide an assignment inside another variable's value.
LINE_BREAKERS = [
    ("\x0b", "vertical tab"),
    ("\x0c", "form feed"),
    ("\r", "carriage return (not followed by a line feed)"),
    ("\x1c", "file separator"),
    ("\x1d", "group separator"),
    ("\x1e", "record separator"),
    ("\x85", "next line (NEL)"),
    ("\u2028", "line separator"),
    ("\u2029", "paragraph separator"),
]


@pytest.mark.parametrize("char, name", LINE_BREAKERS, ids=["U+%04X" % ord(c) for c, n in LINE_BREAKERS])
def test_hidden_line_break_is_refused_naming_the_line(char, name):
    text = "ISTIO_SERVICE_CIDR=10.0.0.0/8\nISTIO_META_CLUSTER_ID=x%sISTIO_INBOUND_PORTS=*\n" % char
    with pytest.raises(AnsibleFilterError) as err:
        cluster_env(text)
    assert str(err.value) == (
        "cluster_env: line 2 contains a %s (U+%04X), which a shell and other readers split differently: remove it "
        "(line %r)" % (name, ord(char), "ISTIO_META_CLUSTER_ID=x%sISTIO_INBOUND_PORTS=*" % char))


def test_other_control_characters_are_refused():
    with pytest.raises(AnsibleFilterError) as err:
        cluster_env("ISTIO_INBOUND_PORTS=80\x00\n")
    assert str(err.value).startswith("cluster_env: line 1 contains a control character (U+0000)")


def test_crlf_line_ends_read_like_lf():
    crlf = "ISTIO_INBOUND_PORTS='*'\r\nISTIO_LOCAL_EXCLUDE_PORTS=15090,15021\r\n# comment\r\n\r\nENVOY_PORT=15001\r"
    lf = crlf.replace("\r", "")
    assert cluster_env(crlf) == cluster_env(lf) == {
        "inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021", "proxy_port": "15001"}


def test_tab_is_a_blank():
    assert parse_cluster_env("export\tISTIO_INBOUND_PORTS =\t80 # web\n") == {"ISTIO_INBOUND_PORTS": "80"}


def test_mapping_is_the_option_table():
    assert CLUSTER_ENV_OPTIONS == dict((o.env, o.name) for o in OPTIONS if o.env)
    assert CLUSTER_ENV_OPTIONS["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"] == "host_ipv4_loopback_cidr"
    assert len(CLUSTER_ENV_OPTIONS) == 18


def test_loopback_cidr_is_read_verbatim():
    assert cluster_env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR=127.0.0.1/8\n") == {
        "host_ipv4_loopback_cidr": "127.0.0.1/8"}
