"""Validation: every bad value fails with a message naming the option and value."""

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    CaptureConfig,
    ConfigError,
    parse_resolv_conf,
)

# (option, value, exact message)
BAD_VALUES = [
    ("proxy_port", 0, "proxy_port: expected a port number between 1 and 65535 (got 0)"),
    ("proxy_port", 65536, "proxy_port: expected a port number between 1 and 65535 (got 65536)"),
    ("inbound_capture_port", "15006 -j ACCEPT",
     "inbound_capture_port: expected a port number between 1 and 65535 (got '15006 -j ACCEPT')"),
    ("inbound_tunnel_port", True, "inbound_tunnel_port: expected a port number between 1 and 65535 (got True)"),
    ("inbound_ports_include", ["80", "*"], "inbound_ports_include: '*' must be the only item (got ['80', '*'])"),
    ("inbound_ports_include", ["8080\n-A INPUT -j ACCEPT"],
     "inbound_ports_include: expected a port number between 1 and 65535 (got '8080\\n-A INPUT -j ACCEPT')"),
    ("inbound_ports_include", ["1000:2000"],
     "inbound_ports_include: expected a port number between 1 and 65535 (got '1000:2000')"),
    ("inbound_ports_exclude", ["*"], "inbound_ports_exclude: '*' is not allowed here (got '*')"),
    ("outbound_ports_include", ["-1"], "outbound_ports_include: expected a port number between 1 and 65535 (got '-1')"),
    ("outbound_ports_exclude", ["70000"],
     "outbound_ports_exclude: expected a port number between 1 and 65535 (got '70000')"),
    ("outbound_ip_ranges_include", ["10.0.0.0/33"],
     "outbound_ip_ranges_include: expected a CIDR (address/prefix length) (got '10.0.0.0/33')"),
    ("outbound_ip_ranges_include", ["10.0.0.1"],
     "outbound_ip_ranges_include: expected a CIDR (address/prefix length) (got '10.0.0.1')"),
    ("outbound_ip_ranges_include", ["*", "10.0.0.0/8"],
     "outbound_ip_ranges_include: '*' must be the only item (got ['*', '10.0.0.0/8'])"),
    ("outbound_ip_ranges_exclude", ["*"], "outbound_ip_ranges_exclude: '*' is not allowed here (got '*')"),
    ("outbound_ip_ranges_exclude", ["10.0.0.0/8 -j ACCEPT"],
     "outbound_ip_ranges_exclude: expected a CIDR (address/prefix length) (got '10.0.0.0/8 -j ACCEPT')"),
    ("outbound_ip_ranges_exclude", ["::ffff:10.0.0.0/104"],
     "outbound_ip_ranges_exclude: IPv4-mapped IPv6 ranges are not supported; use the IPv4 form "
     "(got '::ffff:10.0.0.0/104')"),
    ("proxy_uid", ["--uid-owner"], "proxy_uid: expected a numeric id or a POSIX user/group name (got '--uid-owner')"),
    ("proxy_uid", ["4294967295"], "proxy_uid: numeric id is out of range (got '4294967295')"),
    ("proxy_gid", ["istio proxy"], "proxy_gid: expected a numeric id or a POSIX user/group name (got 'istio proxy')"),
    ("owner_groups_include", ["java", "*"], "owner_groups_include: '*' must be the only item (got ['java', '*'])"),
    ("owner_groups_include", ["g%d" % i for i in range(65)],
     "owner_groups_include: at most 64 groups can be included (got %r)" % ["g%d" % i for i in range(65)]),
    ("owner_groups_exclude", ["*"], "owner_groups_exclude: '*' is not allowed here (got '*')"),
    ("owner_groups_exclude", ['ftp"'], "owner_groups_exclude: expected a numeric id or a POSIX user/group name "
                                       "(got 'ftp\"')"),
    ("kube_virt_interfaces", ["averyveryverylongname"],
     "kube_virt_interfaces: expected an interface name of 1-15 characters from [A-Za-z0-9_.@+-], not starting "
     "with '-' (got 'averyveryverylongname')"),
    ("exclude_interfaces", ["-j"],
     "exclude_interfaces: expected an interface name of 1-15 characters from [A-Za-z0-9_.@+-], not starting "
     "with '-' (got '-j')"),
    ("exclude_interfaces", ["eth/0"],
     "exclude_interfaces: expected an interface name of 1-15 characters from [A-Za-z0-9_.@+-], not starting "
     "with '-' (got 'eth/0')"),
    ("inbound_interception_mode", "tproxy", "inbound_interception_mode: expected one of REDIRECT, TPROXY (got 'tproxy')"),
    ("inbound_tproxy_mark", 0, "inbound_tproxy_mark: must be between 1 and 4294967295 (got 0)"),
    ("inbound_tproxy_mark", 2 ** 32, "inbound_tproxy_mark: must be between 1 and 4294967295 (got 4294967296)"),
    ("inbound_tproxy_route_table", 254, "inbound_tproxy_route_table: is reserved by the kernel (got 254)"),
    ("inbound_tproxy_route_table", "133 x", "inbound_tproxy_route_table: expected an integer (got '133 x')"),
    ("dns_servers_v4", ["::1"], "dns_servers_v4: expected an IPv4 address (got '::1')"),
    ("dns_servers_v4", ["192.0.2.1/32"], "dns_servers_v4: expected an IPv4 address (got '192.0.2.1/32')"),
    ("dns_servers_v6", ["192.0.2.1"], "dns_servers_v6: expected an IPv6 address (got '192.0.2.1')"),
    ("dns_servers_v6", ["fe80::1%eth0"], "dns_servers_v6: expected an IPv6 address (got 'fe80::1%eth0')"),
    ("redirect_dns", "yes", "redirect_dns: expected a boolean (got 'yes')"),
    ("no_such_option", 1, "no_such_option: unknown option (got 1)"),
]


@pytest.mark.parametrize("option, value, message", BAD_VALUES,
                         ids=["%s-%d" % (o, i) for i, (o, v, m) in enumerate(BAD_VALUES)])
def test_bad_value_fails_naming_option(option, value, message):
    with pytest.raises(ConfigError) as err:
        CaptureConfig.from_params({option: value})
    assert str(err.value) == message
    assert err.value.option == option


@pytest.mark.parametrize("option, value, expected", [
    ("inbound_ports_include", "80, 443,,8080", ["80", "443", "8080"]),
    ("inbound_ports_include", ["080"], ["80"]),
    ("inbound_ports_include", "*", ["*"]),
    ("proxy_uid", [1337], ["1337"]),
    ("exclude_interfaces", "eth0,eth1", ["eth0", "eth1"]),
    ("exclude_interfaces", ["eth0\t"], ["eth0"]),
], ids=["comma-string", "leading-zero", "wildcard-string", "int-uid", "comma-interfaces", "blanks-stripped"])
def test_list_values_are_normalised(option, value, expected):
    assert getattr(CaptureConfig.from_params({option: value}), option) == expected


def test_proxy_gid_defaults_to_proxy_uid():
    assert CaptureConfig.from_params({"proxy_uid": ["3", "4"]}).proxy_gid == ["3", "4"]
    assert CaptureConfig.from_params({"proxy_uid": ["3"], "proxy_gid": ["5"]}).proxy_gid == ["5"]


def test_dns_servers_read_from_resolv_conf_only_when_needed():
    calls = []

    def resolv():
        calls.append(1)
        return "search example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver bogus\n"

    cfg = CaptureConfig.from_params({"redirect_dns": True}, read_resolv_conf=resolv)
    assert (cfg.dns_servers_v4, cfg.dns_servers_v6) == (["192.0.2.53"], ["2001:db8::53"])
    assert cfg.warnings == ["ignoring resolv.conf nameserver 'bogus': not an IP address"]
    CaptureConfig.from_params({"redirect_dns": True, "dns_servers_v4": [], "dns_servers_v6": []},
                              read_resolv_conf=resolv)
    CaptureConfig.from_params({"redirect_dns": False}, read_resolv_conf=resolv)
    assert len(calls) == 1


def test_explicit_empty_dns_list_means_none():
    cfg = CaptureConfig.from_params({"redirect_dns": True, "dns_servers_v4": [], "dns_servers_v6": ["2001:db8::53"]},
                                    read_resolv_conf=lambda: "nameserver 192.0.2.53\n")
    assert (cfg.dns_servers_v4, cfg.dns_servers_v6) == ([], ["2001:db8::53"])


def test_parse_resolv_conf_splits_families():
    assert parse_resolv_conf("nameserver 192.0.2.1\nnameserver ::1\n#nameserver 192.0.2.2\n") == (
        ["192.0.2.1"], ["::1"], [])


def test_owner_group_warnings():
    cfg = CaptureConfig.from_params({"owner_groups_include": ["java"], "owner_groups_exclude": ["ftp"]})
    assert cfg.warnings == ["owner_groups_exclude is ignored because owner_groups_include is not '*'"]


@pytest.mark.parametrize("option, value, message", [
    ("proxy_uid", ["nobody-here"], "proxy_uid: no such user on the target (got 'nobody-here')"),
    ("proxy_gid", ["nogroup-here"], "proxy_gid: no such group on the target (got 'nogroup-here')"),
    ("owner_groups_include", ["java"], "owner_groups_include: no such group on the target (got 'java')"),
    ("owner_groups_exclude", ["ftp"], "owner_groups_exclude: no such group on the target (got 'ftp')"),
], ids=["user", "gid", "include", "exclude"])
def test_owner_names_must_exist_on_target(option, value, message):
    cfg = CaptureConfig.from_params({option: value})
    with pytest.raises(ConfigError) as err:
        cfg.check_owner_names(lambda name: False, lambda name: False)
    assert str(err.value) == message


def test_numeric_owners_need_no_lookup():
    cfg = CaptureConfig.from_params({"proxy_uid": ["1337"], "owner_groups_exclude": ["888"]})
    cfg.check_owner_names(lambda name: False, lambda name: False)


SUPPORTED = ("1.17, 1.18, 1.19, 1.20, 1.21, 1.22, 1.23, 1.24, 1.25, 1.26, 1.27, 1.28, 1.29, 1.30")
UNSUPPORTED = ("istio_version: unsupported Istio release; supported: %s (a patch version such as 1.28.3 selects its "
               "release)" % SUPPORTED)

# (options, exact message)
RELEASE_ERRORS = [
    (dict(istio_version="1.16"), UNSUPPORTED + " (got '1.16')"),
    (dict(istio_version="1.31.0"), UNSUPPORTED + " (got '1.31.0')"),
    (dict(istio_version="1.2x"), UNSUPPORTED + " (got '1.2x')"),
    (dict(istio_version="1.026"), UNSUPPORTED + " (got '1.026')"),
    (dict(host_ipv4_loopback_cidr="127.0.0.1/8"),
     "host_ipv4_loopback_cidr: not an option of Istio 1.17: it is new in Istio 1.21 (istio_version) "
     "(got '127.0.0.1/8')"),
    (dict(istio_version="1.20.8", host_ipv4_loopback_cidr="127.0.0.1/8"),
     "host_ipv4_loopback_cidr: not an option of Istio 1.20: it is new in Istio 1.21 (istio_version) "
     "(got '127.0.0.1/8')"),
    (dict(istio_version="1.26", trace_logging=True),
     "trace_logging: not an option of Istio 1.26: Istio 1.26 removed it (istio_version) (got True)"),
    (dict(istio_version="1.30", trace_logging=True),
     "trace_logging: not an option of Istio 1.30: Istio 1.26 removed it (istio_version) (got True)"),
    (dict(istio_version="1.26", nft_layout="istio"),
     "nft_layout: Istio's native nftables capture is new in Istio 1.27; set istio_version to 1.27 or later, "
     "or use 'sets' (got 'istio')"),
    (dict(nft_layout="nft"), "nft_layout: expected one of istio, sets (got 'nft')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="10.0.0.1/8"),
     "host_ipv4_loopback_cidr: expected an IPv4 loopback address (127.0.0.0/8) (got '10.0.0.1/8')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.1/7"),
     "host_ipv4_loopback_cidr: the prefix length must be between 8 and 32 (got '127.0.0.1/7')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.1/33"),
     "host_ipv4_loopback_cidr: the prefix length must be between 8 and 32 (got '127.0.0.1/33')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.1"),
     "host_ipv4_loopback_cidr: expected an IPv4 CIDR (address/prefix length) (got '127.0.0.1')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="::1/128"),
     "host_ipv4_loopback_cidr: expected an IPv4 CIDR (address/prefix length) (got '::1/128')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.01/8"),
     "host_ipv4_loopback_cidr: expected an IPv4 CIDR (address/prefix length) (got '127.0.0.01/8')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.1/8 -j ACCEPT"),
     "host_ipv4_loopback_cidr: expected an IPv4 CIDR (address/prefix length) (got '127.0.0.1/8 -j ACCEPT')"),
    (dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.256/8"),
     "host_ipv4_loopback_cidr: expected an IPv4 CIDR (address/prefix length) (got '127.0.0.256/8')"),
]


@pytest.mark.parametrize("options, message", RELEASE_ERRORS, ids=[
    "too-old", "too-new", "garbage", "leading-zero", "cidr-on-1.17", "cidr-on-1.20", "trace-1.26", "trace-1.30",
    "nft-istio-1.26", "nft-layout-choice", "cidr-not-loopback", "cidr-prefix-7", "cidr-prefix-33", "cidr-no-prefix",
    "cidr-ipv6", "cidr-leading-zero", "cidr-injection", "cidr-octet"])
def test_release_errors_name_option_and_value(options, message):
    with pytest.raises(ConfigError) as err:
        CaptureConfig.from_params(options)
    assert str(err.value) == message


@pytest.mark.parametrize("version, release, patch", [
    (None, (1, 17), None), ("1.17", (1, 17), None), ("1.19", (1, 19), None), ("1.28.3", (1, 28), 3),
    ("1.30.0", (1, 30), 0), ("1.21.10", (1, 21), 10)])
def test_istio_version_selects_its_release(version, release, patch):
    cfg = CaptureConfig.from_params({"istio_version": version})
    assert (cfg.istio_version, cfg.istio_patch) == (release, patch)
    assert isinstance(cfg.istio_version, tuple) and all(isinstance(v, int) for v in cfg.istio_version)
    assert cfg.to_dict()["istio_version"] == "%d.%d" % release


@pytest.mark.parametrize("options", [
    dict(host_ipv4_loopback_cidr="127.0.0.1/32"),  # the default is accepted by every release
    dict(istio_version="1.26", trace_logging=False),
    dict(istio_version="1.25", trace_logging=True),
    dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.1/8"),
    dict(istio_version="1.30", host_ipv4_loopback_cidr="127.255.0.0/16"),
    dict(istio_version="1.20", nft_layout="sets"),
    dict(istio_version="1.28", nft_layout="sets"),
], ids=["default-cidr-1.17", "trace-false-1.26", "trace-1.25", "cidr-1.21", "cidr-1.30", "sets-1.20", "sets-1.28"])
def test_release_options_accepted(options):
    cfg = CaptureConfig.from_params(options)
    assert cfg.warnings == []


@pytest.mark.parametrize("version, layout", [(None, "sets"), ("1.26", "sets"), ("1.27", "istio"), ("1.30.2", "istio")])
def test_nft_layout_default_follows_the_release(version, layout):
    assert CaptureConfig.from_params({"istio_version": version}).nft_layout == layout


def test_host_ipv4_loopback_cidr_kept_as_written():
    cfg = CaptureConfig.from_params(dict(istio_version="1.21", host_ipv4_loopback_cidr="127.0.0.1/8"))
    assert cfg.host_ipv4_loopback_cidr == "127.0.0.1/8"
    assert CaptureConfig.from_params({}).host_ipv4_loopback_cidr == "127.0.0.1/32"


@pytest.mark.parametrize("value", ["1.2", 1.2])
def test_unquoted_yaml_version_gets_a_hint(value):
    with pytest.raises(ConfigError) as err:
        CaptureConfig.from_params({"istio_version": value})
    assert str(err.value) == UNSUPPORTED + "; quote the version in YAML, an unquoted 1.20 is the number 1.2 (got '1.2')"
