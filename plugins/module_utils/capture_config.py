# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Validated capture configuration (istio-iptables options, Istio 1.17 to 1.30).

Pure Python, no Ansible imports.  Every value that can end up in an
iptables-restore payload is checked against a strict grammar here, so no
option can smuggle whitespace, newlines or option-like text into a rule.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import re

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_options import BY_NAME, core_defaults
from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_releases


class CaptureError(Exception):
    """Base class of every error the capture core raises."""


class ApplyError(CaptureError):
    """A command failed; carries what fail_json wants."""

    def __init__(self, msg, cmd=None, rc=None, stderr=None):
        super(ApplyError, self).__init__(msg)
        self.msg = msg
        self.cmd = cmd
        self.rc = rc
        self.stderr = stderr


def run_checked(run, argv, what, data=None):
    """stdout of run(argv, data=data) -> (rc, stdout, stderr), or ApplyError('<what> failed: <stderr>')."""
    rc, out, err = run(argv, data=data)
    if rc != 0:
        raise ApplyError("%s failed: %s" % (what, (err or out).strip()), cmd=argv, rc=rc, stderr=err)
    return out


class ConfigError(CaptureError):
    """An option has a value the capture cannot use."""

    def __init__(self, option, value, reason):
        self.option = option
        self.value = value
        self.reason = reason
        super(ConfigError, self).__init__("%s: %s (got %r)" % (option, reason, value))


INTERCEPTION_MODES = ("REDIRECT", "TPROXY")
NFT_LAYOUTS = ("istio", "sets")
# Routing tables the kernel reserves: unspec, default, main, local.
RESERVED_ROUTE_TABLES = (0, 253, 254, 255)
MAX_U32 = 2 ** 32 - 1
# istio-iptables config.maxOwnerGroupsInclude: the included groups become
# one rule with N owner matches, which must stay short.
MAX_OWNER_GROUPS_INCLUDE = 64

_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_DIGITS_RE = re.compile(r"^[0-9]{1,10}$")
_POSIX_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,14}$")
_ADDR_CHARS_RE = re.compile(r"^[0-9A-Fa-f:.]+$")

# name -> default of every capture option, from the option table.  proxy_gid
# None means "same as proxy_uid"; dns_servers_* None means "read
# /etc/resolv.conf"; istio_version None means 1.17; nft_layout None means
# "istio" from Istio 1.27 on, "sets" before.
DEFAULTS = core_defaults()


def as_list(option, value):
    """Normalise a list option: None, a list, or a comma-separated string.

    Empty items are dropped (istio's config.Split); surrounding blanks are
    stripped so values copied from a cluster.env work.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, str):
        items = value.split(",")
    else:
        raise ConfigError(option, value, "expected a list or a comma-separated string")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ConfigError(option, item, "expected a string item")
        text = str(item).strip()
        if text:
            out.append(text)
    return out


def check_int(option, value, low, high, reserved=()):
    """An integer in [low, high] (accepts digit strings), not in reserved."""
    if isinstance(value, bool):
        raise ConfigError(option, value, "expected an integer")
    if isinstance(value, str):
        if not _DIGITS_RE.match(value):
            raise ConfigError(option, value, "expected an integer")
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(option, value, "expected an integer")
    if not low <= value <= high:
        raise ConfigError(option, value, "must be between %d and %d" % (low, high))
    if value in reserved:
        raise ConfigError(option, value, "is reserved by the kernel")
    return value


def check_port(option, value):
    """A TCP/UDP port 1-65535, returned as a canonical decimal string."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _PORT_RE.match(text) or not 1 <= int(text) <= 65535:
        raise ConfigError(option, value, "expected a port number between 1 and 65535")
    return str(int(text))


def _is_wildcard(option, items, wildcard):
    """True for ["*"] where a wildcard is allowed; '*' anywhere else is an error."""
    if "*" not in items:
        return False
    if not wildcard:
        raise ConfigError(option, "*", "'*' is not allowed here")
    if len(items) != 1:
        raise ConfigError(option, items, "'*' must be the only item")
    return True


def _check_items(option, values, check, wildcard):
    """A list option whose items each pass check; with wildcard, ["*"] alone means all."""
    items = as_list(option, values)
    if _is_wildcard(option, items, wildcard):
        return ["*"]
    return [check(option, item) for item in items]


def check_ports(option, values, wildcard=False):
    """A list of ports; with wildcard, ["*"] alone means every port."""
    return _check_items(option, values, check_port, wildcard)


def check_owner(option, value):
    """A numeric uid/gid or a POSIX user/group name."""
    if _DIGITS_RE.match(value):
        if int(value) > MAX_U32 - 1:
            raise ConfigError(option, value, "numeric id is out of range")
        return value
    if not _POSIX_NAME_RE.match(value):
        raise ConfigError(option, value, "expected a numeric id or a POSIX user/group name")
    return value


def check_owners(option, values, wildcard=False):
    """A list of uids/gids/names; with wildcard, ["*"] alone means everyone."""
    return _check_items(option, values, check_owner, wildcard)


def check_interface(option, value):
    """A Linux interface name (at most 15 characters, iptables '+' allowed)."""
    if value in (".", "..") or not _IFNAME_RE.match(value):
        raise ConfigError(
            option, value,
            "expected an interface name of 1-15 characters from [A-Za-z0-9_.@+-], not starting with '-'")
    return value


def _check_address(option, value, version):
    if not _ADDR_CHARS_RE.match(value):
        raise ConfigError(option, value, "expected an IPv%d address" % version)
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(option, value, "expected an IPv%d address" % version)
    if addr.version != version:
        raise ConfigError(option, value, "expected an IPv%d address" % version)
    return addr


def check_dns_servers(option, values, version):
    """DNS server addresses of one family, kept as written (istio appends /32 or /128)."""
    out = []
    for value in as_list(option, values):
        _check_address(option, value, version)
        out.append(value)
    return out


class Cidr(object):
    """A normalised network as istio's net.ParseCIDR gives it."""

    __slots__ = ("network", "is_loopback")

    def __init__(self, network, is_loopback):
        self.network = network
        self.is_loopback = is_loopback

    @property
    def version(self):
        return self.network.version

    def __str__(self):
        return str(self.network)


def check_cidr(option, value):
    if "/" not in value:
        raise ConfigError(option, value, "expected a CIDR (address/prefix length)")
    address, prefix = value.split("/", 1)
    if not _ADDR_CHARS_RE.match(address) or not re.match(r"^[0-9]{1,3}$", prefix):
        raise ConfigError(option, value, "expected a CIDR (address/prefix length)")
    try:
        if ":" not in address:
            # IPv4 fast path (10,000-entry exclusion lists): IPv4Network
            # accepts and normalises exactly what ip_interface does here.
            return Cidr(ipaddress.IPv4Network(value, strict=False), address.split(".", 1)[0] == "127")
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ConfigError(option, value, "expected a CIDR (address/prefix length)")
    if iface.version == 6 and iface.ip.ipv4_mapped is not None:
        raise ConfigError(option, value, "IPv4-mapped IPv6 ranges are not supported; use the IPv4 form")
    return Cidr(iface.network, iface.ip.is_loopback)


def check_cidrs(option, values, wildcard=False):
    cidrs = _check_items(option, values, check_cidr, wildcard)
    return "*" if cidrs == ["*"] else cidrs


def check_bool(option, value):
    if isinstance(value, bool):
        return value
    raise ConfigError(option, value, "expected a boolean")


def check_istio_version(option, value):
    """'1.26' or '1.26.3' -> ((1, 26), patch or None); unset -> ((1, 17), None)."""
    if value is None:
        return capture_releases.DEFAULT_RELEASE, None
    if isinstance(value, float):
        value = repr(value)
    parsed = capture_releases.parse_version(value)
    if parsed is None:
        hint = ""
        if isinstance(value, str) and capture_releases.parse_version(value + "0"):
            # YAML reads an unquoted 1.20 as the number 1.2.
            hint = "; quote the version in YAML, an unquoted %s0 is the number %s" % (value, value)
        raise ConfigError(option, value, "unsupported Istio release; supported: %s (a patch version such as "
                          "1.28.3 selects its release)%s" % (capture_releases.supported_text(), hint))
    return parsed


_LOOPBACK_CIDR_RE = re.compile(r"^(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}/([1-9][0-9]?)$")


def check_loopback_cidr(option, value):
    """An IPv4 loopback address with a prefix length of 8 to 32, kept as written (istio's
    ValidateIPv4LoopbackCidr)."""
    if not isinstance(value, str) or not _LOOPBACK_CIDR_RE.match(value):
        raise ConfigError(option, value, "expected an IPv4 CIDR (address/prefix length)")
    address, prefix = value.split("/")
    try:
        addr = ipaddress.IPv4Address(address)
    except ValueError:
        raise ConfigError(option, value, "expected an IPv4 CIDR (address/prefix length)")
    if not addr.is_loopback:
        raise ConfigError(option, value, "expected an IPv4 loopback address (127.0.0.0/8)")
    if not 8 <= int(prefix) <= 32:
        raise ConfigError(option, value, "the prefix length must be between 8 and 32")
    return value


def check_release_options(params, release):
    """Options the release does not have may only have their default value."""
    text = capture_releases.release_text(release)
    for name in sorted(params):
        option = BY_NAME.get(name)
        value = params[name]
        if option is None or value is None or value == option.default:
            continue
        if option.first is not None and release < option.first:
            raise ConfigError(name, value, "not an option of Istio %s: it is new in Istio %s (istio_version)"
                              % (text, capture_releases.release_text(option.first)))
        if option.last is not None and release > option.last:
            raise ConfigError(name, value, "not an option of Istio %s: Istio %s removed it (istio_version)"
                              % (text, capture_releases.release_text((option.last[0], option.last[1] + 1))))


def parse_resolv_conf(text):
    """Name servers of a resolv.conf, split by family (istio SplitV4V6).

    Returns (v4, v6, warnings); unusable entries become warnings.
    """
    v4, v6, warnings = [], [], []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        server = fields[1]
        try:
            addr = ipaddress.ip_address(server)
        except ValueError:
            warnings.append("ignoring resolv.conf nameserver %r: not an IP address" % server)
            continue
        (v4 if addr.version == 4 else v6).append(str(addr))
    return v4, v6, warnings


class CaptureConfig(object):
    """The validated configuration of one capture ruleset.

    Build it with from_params(); attributes carry the option names of
    INTERFACE.md.  Ports are canonical strings, outbound ranges are lists
    of Cidr or the string "*".
    """

    # Set by from_params; the class values keep a bare instance at the
    # defaults (Istio 1.17).
    istio_version = capture_releases.DEFAULT_RELEASE
    istio_patch = None
    host_ipv4_loopback_cidr = "127.0.0.1/32"
    nft_layout = "sets"

    def __init__(self):
        self.warnings = []

    @classmethod
    def from_params(cls, params, read_resolv_conf=None):
        """Validate a dict of options (missing or None -> default).

        read_resolv_conf is a callable returning the text of the host's
        resolv.conf; it is called only when DNS capture needs it.
        """
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise ConfigError(unknown[0], params[unknown[0]], "unknown option")

        def get(name):
            value = params.get(name)
            return DEFAULTS[name] if value is None else value

        cfg = cls()
        cfg.istio_version, cfg.istio_patch = check_istio_version("istio_version", params.get("istio_version"))
        check_release_options(params, cfg.istio_version)
        cfg.host_ipv4_loopback_cidr = check_loopback_cidr("host_ipv4_loopback_cidr", get("host_ipv4_loopback_cidr"))
        layout = params.get("nft_layout")
        if layout is None:
            layout = "istio" if cfg.has("native_nftables") else "sets"
        elif layout not in NFT_LAYOUTS:
            raise ConfigError("nft_layout", layout, "expected one of %s" % ", ".join(NFT_LAYOUTS))
        elif layout == "istio" and not cfg.has("native_nftables"):
            raise ConfigError("nft_layout", layout, "Istio's native nftables capture is new in Istio 1.27; set "
                              "istio_version to 1.27 or later, or use 'sets'")
        cfg.nft_layout = layout
        cfg.proxy_port = check_port("proxy_port", get("proxy_port"))
        cfg.inbound_capture_port = check_port("inbound_capture_port", get("inbound_capture_port"))
        cfg.inbound_tunnel_port = check_port("inbound_tunnel_port", get("inbound_tunnel_port"))
        cfg.proxy_uid = check_owners("proxy_uid", get("proxy_uid"))
        gid = params.get("proxy_gid")
        cfg.proxy_gid = list(cfg.proxy_uid) if gid is None else check_owners("proxy_gid", gid)

        mode = get("inbound_interception_mode")
        if mode not in INTERCEPTION_MODES:
            raise ConfigError("inbound_interception_mode", mode,
                              "expected one of %s" % ", ".join(INTERCEPTION_MODES))
        cfg.inbound_interception_mode = mode
        cfg.inbound_tproxy_mark = str(check_int("inbound_tproxy_mark", get("inbound_tproxy_mark"), 1, MAX_U32))
        cfg.inbound_tproxy_route_table = check_int(
            "inbound_tproxy_route_table", get("inbound_tproxy_route_table"), 1, MAX_U32,
            reserved=RESERVED_ROUTE_TABLES)

        cfg.inbound_ports_include = check_ports("inbound_ports_include", get("inbound_ports_include"), wildcard=True)
        cfg.inbound_ports_exclude = check_ports("inbound_ports_exclude", get("inbound_ports_exclude"))
        cfg.outbound_ports_include = check_ports("outbound_ports_include", get("outbound_ports_include"))
        cfg.outbound_ports_exclude = check_ports("outbound_ports_exclude", get("outbound_ports_exclude"))
        cfg.outbound_ip_ranges_include = check_cidrs(
            "outbound_ip_ranges_include", get("outbound_ip_ranges_include"), wildcard=True)
        cfg.outbound_ip_ranges_exclude = check_cidrs("outbound_ip_ranges_exclude", get("outbound_ip_ranges_exclude"))
        cfg.kube_virt_interfaces = [check_interface("kube_virt_interfaces", i)
                                    for i in as_list("kube_virt_interfaces", get("kube_virt_interfaces"))]
        cfg.exclude_interfaces = [check_interface("exclude_interfaces", i)
                                  for i in as_list("exclude_interfaces", get("exclude_interfaces"))]

        cfg.owner_groups_include = check_owners("owner_groups_include", get("owner_groups_include"), wildcard=True)
        cfg.owner_groups_exclude = check_owners("owner_groups_exclude", get("owner_groups_exclude"))
        if cfg.owner_groups_include != ["*"]:
            if len(cfg.owner_groups_include) > MAX_OWNER_GROUPS_INCLUDE:
                raise ConfigError("owner_groups_include", cfg.owner_groups_include,
                                  "at most %d groups can be included" % MAX_OWNER_GROUPS_INCLUDE)
            if not cfg.owner_groups_include:
                cfg.warnings.append("owner_groups_include is empty: no outbound traffic will be captured")
            if cfg.owner_groups_exclude:
                cfg.warnings.append("owner_groups_exclude is ignored because owner_groups_include is not '*'")

        for name in ("redirect_dns", "capture_all_dns", "drop_invalid", "enable_inbound_ipv6", "trace_logging"):
            setattr(cfg, name, check_bool(name, get(name)))

        v4, v6 = params.get("dns_servers_v4"), params.get("dns_servers_v6")
        if cfg.redirect_dns and not cfg.capture_all_dns and (v4 is None or v6 is None) and read_resolv_conf:
            found4, found6, warnings = parse_resolv_conf(read_resolv_conf())
            cfg.warnings.extend(warnings)
            v4 = found4 if v4 is None else v4
            v6 = found6 if v6 is None else v6
        cfg.dns_servers_v4 = check_dns_servers("dns_servers_v4", v4, 4)
        cfg.dns_servers_v6 = check_dns_servers("dns_servers_v6", v6, 6)
        if (cfg.redirect_dns and not cfg.capture_all_dns and not cfg.dns_servers_v4 and not cfg.dns_servers_v6
                and cfg.has("dns_needs_servers")):
            cfg.warnings.append("redirect_dns is set, but there are no DNS servers and capture_all_dns is false: "
                                "Istio %s captures no DNS then" % capture_releases.release_text(cfg.istio_version))
        return cfg

    def has(self, behaviour):
        """Whether the rules of the configured Istio release have the named behaviour change
        (capture_releases.RELEASES)."""
        return capture_releases.has(self.istio_version, behaviour)

    def check_owner_names(self, user_exists, group_exists):
        """Owner names must exist where the rules are applied: iptables
        resolves them when a rule is added.  The callables answer whether a
        user / group name exists on the target."""
        options = (("proxy_uid", self.proxy_uid, "user", user_exists),
                   ("proxy_gid", self.proxy_gid, "group", group_exists),
                   ("owner_groups_include", self.owner_groups_include, "group", group_exists),
                   ("owner_groups_exclude", self.owner_groups_exclude, "group", group_exists))
        for option, names, kind, exists in options:
            for name in names:
                if name != "*" and not _DIGITS_RE.match(name) and not exists(name):
                    raise ConfigError(option, name, "no such %s on the target" % kind)

    def to_dict(self):
        """The effective options, in a JSON-friendly form."""
        out = {}
        for name in DEFAULTS:
            value = getattr(self, name)
            if value == "*":
                value = ["*"]
            if isinstance(value, list):
                value = [str(v) for v in value]
            out[name] = value
        out["istio_version"] = capture_releases.release_text(self.istio_version)
        out["inbound_tproxy_mark"] = int(self.inbound_tproxy_mark)
        for name in ("proxy_port", "inbound_capture_port", "inbound_tunnel_port"):
            out[name] = int(out[name])
        return out
