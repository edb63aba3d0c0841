"""Parity: the nftables renderer steers real packets like the iptables one.

For every Istio 1.17 conformance case (tests/unit/corpus.py: the vendored
istio-1.17 corpus and the extra istio 1.17 cases), plus a few configurations
with longer range and port lists (EXTRA, named sets), the
capture Ruleset is loaded twice, into two identical topologies (netns.py's
host + peer joined by veth): as iptables rules (render_restore, through
iptables-nft-restore / ip6tables-nft-restore) in one, as native nftables
(capture_nft.render_nft, through `nft -f`) in the other.  The same probe
set then runs in both and every probe must land at the same place: which
listener answered (Envoy's 15001 / 15006 / the agent's 15053 on the host,
an app or resolver on the host or the peer, or no answer and why) and the
original destination it saw (SO_ORIGINAL_DST; a TPROXY listener's local
address).  Real packets, not text.

Per release (test_release_nft_steers_like_its_iptables): every Istio release
the module renders (istio_version 1.17 to 1.28), two configurations each,
the release's iptables rules against its nftables rules: Istio's own native
tables (capture_nft_istio) from 1.27, the set translation before and, as
nft_layout 'sets', from 1.27 too.

Addresses: traffic only uses 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32 (and loopback).  A case's outbound ranges outside those are
mapped onto /26s of 203.0.113.0/24 (IPv6: /48s under 2001:db8:e000::) and
its non-loopback DNS servers onto the peer's 192.0.2.53 / 2001:db8::53,
identically for both rulesets, so probes can go inside and outside every
range.  Owner names missing on this machine become numeric ids (like
test_restore_payloads).  The peer owns 198.51.100.0/24, 203.0.113.0/24 and
2001:db8:8000::/33 as local (AnyIP) routes; the host routes mark 1337 to
a local table (TPROXY), as meshcapture.sidecar.routes does.
"""

import grp
import ipaddress
import pwd
from concurrent.futures import ThreadPoolExecutor

import pytest

import netns
from probe_batch import Listeners, listener, run_probes
from tests.unit.corpus import all_cases

from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_config
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureConfig
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import generate
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import render_nft
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_istio import render_transaction
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import IPV4, IPV6, render_restore

pytestmark = pytest.mark.netns

# Beyond the corpora: named sets with overlapping ranges and port lists, both inbound modes.
EXTRA = {
    "sets-dual-stack": dict(
        inbound_ports_include=["*"], inbound_ports_exclude=["8081", "8082", "9000"],
        outbound_ip_ranges_include=["198.51.100.0/24", "203.0.113.0/24", "2001:db8:8000::/33"],
        outbound_ip_ranges_exclude=["198.51.100.7/32", "203.0.113.64/26", "203.0.113.96/27", "203.0.113.200/30",
                                    "2001:db8:ffff::/48", "2001:db8:fff0::/44"],
        outbound_ports_exclude=["8443", "8444", "9443"], redirect_dns=True,
        dns_servers_v4=["192.0.2.53", "127.0.0.53"], dns_servers_v6=["2001:db8::53"], enable_inbound_ipv6=True),
    "sets-tproxy-ipv4": dict(
        inbound_interception_mode="TPROXY", inbound_ports_include=["8080", "8081", "9000"],
        outbound_ip_ranges_include=["*"], outbound_ip_ranges_exclude=["203.0.113.0/25", "203.0.113.64/26"],
        outbound_ports_include=["8443", "8444"], proxy_uid=["1337", "1338"], proxy_gid=["1337"],
        owner_groups_exclude=["4242"], drop_invalid=True, redirect_dns=True, capture_all_dns=True),
}
CASES = [c[:2] for c in all_cases()] + [("parity/" + name, options) for name, options in EXTRA.items()]
APP = 1000
TEST_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
SERVICE = {4: "198.51.100.7", 6: "2001:db8:ffff::7"}
HOST = {4: netns.HOST_V4, 6: netns.HOST_V6}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
PASSTHROUGH = {4: "127.0.0.6", 6: "::6"}
PEER_DNS = {4: "192.0.2.53", 6: "2001:db8::53"}
SUBSTITUTES = {}  # owner name missing here -> numeric id


# ----------------------------------------------------------------- options
def _owner_id(option, value):
    if value.isdigit():
        return value
    lookup = pwd.getpwnam if option == "proxy_uid" else grp.getgrnam
    try:
        lookup(value)
        return value
    except KeyError:
        return SUBSTITUTES.setdefault(value, str(60000 + len(SUBSTITUTES)))


def _map_ranges(values, mapping):
    out = []
    for value in values:
        net = ipaddress.ip_network(value, strict=False)
        if net.is_loopback or any(net.subnet_of(t) for t in TEST_NETS if t.version == net.version):
            out.append(str(net))
            continue
        if net not in mapping:
            taken = [m for m in mapping.values() if m.version == net.version]
            mapping[net] = ipaddress.ip_network(
                "203.0.113.%d/26" % (64 * len(taken)) if net.version == 4 else "2001:db8:e00%d::/48" % len(taken))
        out.append(str(mapping[net]))
    return out


def mapped_options(options):
    """The case's options with test addresses (see the module docstring)."""
    out = dict(options)
    for option in ("proxy_uid", "proxy_gid", "owner_groups_include", "owner_groups_exclude"):
        if out.get(option) and out[option] != ["*"]:
            out[option] = [_owner_id(option, str(v)) for v in out[option]]
    mapping = {}
    originals = [ipaddress.ip_network(v, strict=False) for option in ("outbound_ip_ranges_include",
                 "outbound_ip_ranges_exclude") if out.get(option) != ["*"] for v in out.get(option) or ()]
    originals = [n for n in originals if not n.is_loopback and not any(n.subnet_of(t) for t in TEST_NETS
                                                                       if t.version == n.version)]
    for a in originals:  # mapping keeps the ranges' relations only for equal or disjoint ones
        assert all(a == b or not a.overlaps(b) for b in originals if a.version == b.version), originals
    for option in ("outbound_ip_ranges_include", "outbound_ip_ranges_exclude"):
        if out.get(option) and out[option] != ["*"]:
            out[option] = _map_ranges(out[option], mapping)
    for option, version in (("dns_servers_v4", 4), ("dns_servers_v6", 6)):
        out[option] = [v if ipaddress.ip_address(v).is_loopback else PEER_DNS[version] for v in out.get(option) or ()]
    return out


# ------------------------------------------------------------------ probes
ANYIP = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "203.0.113.0/24", "2001:db8:8000::/33")]


def _inside(net):
    """An address of ``net`` the topology answers for: its first one when the
    peer or the host's loopback owns it, else a well-known one inside."""
    first = net.network_address + (0 if net.prefixlen == net.max_prefixlen else 1)
    if first.is_loopback or any(first in anyip for anyip in ANYIP):
        return str(first)
    for candidate in list(SERVICE.values()) + list(PEER_DNS.values()):
        if ipaddress.ip_address(candidate) in net:
            return candidate
    return str(first)


def _ports(values):
    return [int(p) for p in values if p != "*"]


def probe_plan(cfg):
    """(probes, host ports, peer ports) for a validated CaptureConfig."""
    uids = [int(u) for u in cfg.proxy_uid if u.isdigit()][:2]
    gids = [int(g) for g in cfg.proxy_gid if g.isdigit()][:2]
    groups = [int(g) for g in cfg.owner_groups_include + cfg.owner_groups_exclude if g.isdigit()]
    who = [(APP, APP)] + [(u, APP) for u in uids] + [(APP, g) for g in gids] + [(APP, g) for g in groups]
    out_ports = sorted(set([80] + _ports(cfg.outbound_ports_include) + _ports(cfg.outbound_ports_exclude)))
    in_ports = sorted(set([8080, int(cfg.inbound_tunnel_port)] + _ports(cfg.inbound_ports_include)
                          + _ports(cfg.inbound_ports_exclude)))
    ranges = [] if cfg.outbound_ip_ranges_include == "*" else list(cfg.outbound_ip_ranges_include)
    ranges += list(cfg.outbound_ip_ranges_exclude)
    probes = []
    for family in (4, 6):
        dsts = [SERVICE[family]] + [_inside(c.network) for c in ranges if c.version == family]
        for uid, gid in who:
            for dst in dict.fromkeys(dsts):
                for port in out_ports:
                    probes.append(dict(proto="tcp", dst=dst, port=port, uid=uid, gid=gid))
            # Back to the host itself over lo, and from the inbound passthrough address.
            probes.append(dict(proto="tcp", dst=HOST[family], port=8080, uid=uid, gid=gid))
            probes.append(dict(proto="tcp", dst=LOOPBACK[family], port=8080, uid=uid, gid=gid))
            probes.append(dict(proto="tcp", dst=HOST[family], port=8080, uid=uid, gid=gid, src=PASSTHROUGH[family]))
        if cfg.redirect_dns:
            servers = cfg.dns_servers_v4 if family == 4 else cfg.dns_servers_v6
            for dst in dict.fromkeys(list(servers) + [PEER_DNS[family]]):
                for uid, gid in who[:1 + len(uids) + len(gids)]:
                    for proto in ("udp", "tcp"):
                        probes.append(dict(proto=proto, dst=dst, port=53, uid=uid, gid=gid))
    inbound = [dict(proto="tcp", dst=HOST[family], port=port) for family in (4, 6) for port in in_ports]
    return probes, inbound, in_ports, out_ports


def host_listeners(cfg, in_ports):
    uid = next((int(u) for u in cfg.proxy_uid if u.isdigit()), 1337)
    gid = next((int(g) for g in cfg.proxy_gid if g.isdigit()), uid)
    tcp, udp = [], []
    for family in (4, 6):
        tcp.append(listener(int(cfg.proxy_port), family, "host:15001"))
        tcp.append(listener(int(cfg.inbound_capture_port), family, "host:15006", transparent=True))
        tcp.append(listener(15053, family, "host:15053", uid=uid, gid=gid))
        udp.append(listener(15053, family, "host:15053", uid=uid, gid=gid))
        udp.append(listener(53, family, "host:53"))
        for port in sorted(set(in_ports + [53, 80])):
            tcp.append(listener(port, family, "host:%d" % port))
    return tcp, udp


def peer_listeners(out_ports):
    tcp = [listener(p, f, "peer:%d" % p) for f in (4, 6) for p in sorted(set(out_ports + [53]))]
    udp = [listener(53, f, "peer:53") for f in (4, 6)]
    return tcp, udp


# ---------------------------------------------------------------- topology
def build(topo):
    host, peer = topo.host_and_peer()
    for cmd in (["ip", "route", "add", "local", "198.51.100.0/24", "dev", "lo"],
                ["ip", "route", "add", "local", "203.0.113.0/24", "dev", "lo"],
                ["ip", "-6", "route", "add", "local", "2001:db8:8000::/33", "dev", "lo"],
                ["ip", "addr", "add", "192.0.2.53/32", "dev", "eth0"],
                ["ip", "addr", "add", "2001:db8::53/128", "dev", "eth0", "nodad"]):
        peer.run(cmd)
    # TPROXY policy routing (what meshcapture.sidecar.routes sets up) and ::6.
    for cmd in (["ip", "-4", "rule", "add", "fwmark", "1337", "lookup", "133"],
                ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133"],
                ["ip", "-6", "rule", "add", "fwmark", "1337", "lookup", "133"],
                ["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "133"],
                ["ip", "addr", "add", "::6/128", "dev", "lo", "nodad"]):
        host.run(cmd)
    return host, peer


@pytest.fixture(scope="module")
def sides():
    """{"iptables": (host, peer), "nftables": (host, peer)}: two identical topologies."""
    if netns.unavailable_reason():
        pytest.skip(netns.unavailable_reason())
    with netns.Topology() as topo:
        yield {"iptables": build(topo), "nftables": build(topo)}


def load_iptables(host, ruleset):
    host.run(["nft", "flush", "ruleset"])
    for family, restore in ((IPV4, "iptables-nft-restore"), (IPV6, "ip6tables-nft-restore")):
        payload = render_restore(ruleset, family)
        if payload:
            host.run([restore, "--noflush"], input=payload)


def load_nftables(host, ruleset):
    host.run(["nft", "flush", "ruleset"])
    payload = render_nft(ruleset).payload()
    if payload:
        host.run(["nft", "-f", "-"], input=payload)


def run_side(side, loader, ruleset, cfg, plan):
    host, peer = side
    probes, inbound, in_ports, out_ports = plan
    loader(host, ruleset)
    with Listeners(host, *host_listeners(cfg, in_ports)), Listeners(peer, *peer_listeners(out_ports)):
        return run_probes(host, probes) + run_probes(peer, inbound)


def landing(result):
    if not result["ok"]:
        return "no answer: %s" % result["error"]
    return "%s (local %s, original destination %s)" % (result["banner"], result["local"], result["orig_dst"])


def assert_same_landing(sides, nft_loader, ruleset, cfg, plan):
    """Load ruleset as iptables on one side and with nft_loader on the other, run plan's probes on both at
    once; every probe must land at the same place. Returns the iptables side's results."""
    with ThreadPoolExecutor(2) as pool:
        ipt = pool.submit(run_side, sides["iptables"], load_iptables, ruleset, cfg, plan)
        nft = pool.submit(run_side, sides["nftables"], nft_loader, ruleset, cfg, plan)
        ipt, nft = ipt.result(), nft.result()
    probes = plan[0] + plan[1]
    assert len(ipt) == len(nft) == len(probes)
    differ = ["%s: iptables -> %s | nftables -> %s" % (probe, landing(a), landing(b))
              for probe, a, b in zip(probes, ipt, nft) if landing(a) != landing(b)]
    assert not differ, "%d of %d probes land elsewhere:\n%s" % (len(differ), len(probes), "\n".join(differ))
    return ipt


SEEN = set()  # landing places over all cases (for the coverage check)


@pytest.mark.parametrize("options", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_nft_steers_like_iptables(sides, options):
    cfg = CaptureConfig.from_params(mapped_options(options))
    ipt = assert_same_landing(sides, load_nftables, generate(cfg), cfg, probe_plan(cfg))
    assert any(r["ok"] for r in ipt), "no probe got an answer: the topology is broken"
    SEEN.update(r["banner"] for r in ipt if r["ok"])


def test_probes_reached_every_listener_kind():
    """Over all cases the probes exercised every capture path (not a vacuous parity)."""
    if len(SEEN) == 0:
        pytest.skip("the parity cases did not run")
    assert {"host:15001", "host:15006", "host:15053", "host:53", "peer:53", "peer:80", "host:8080"} <= SEEN, SEEN


# ------------------------------------------------------------ per release
# Every Istio release the module renders (istio_version): its iptables
# rules against its nftables rules (Istio's native layout from 1.27, the
# named-set translation before, and as nft_layout 'sets' from 1.27 too).
# Two configurations per release cover what VERSIONS.md lists as changed:
# the loopback redirect and the tunnel port (1.18), the DNS zones (1.20),
# host_ipv4_loopback_cidr (1.21), DNS through ISTIO_OUTPUT and the include
# list without RETURN (1.23), ISTIO_DROP (1.24), all-protocol OUTPUT, UDP
# port exclusions and the DNS chains (1.25), the native tables, their
# dual-stack insert order and counters (1.27, 1.28).
RELEASES = ("1.17", "1.18", "1.20", "1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27", "1.28")
RELEASES_READY = "istio_version" in capture_config.DEFAULTS
needs_releases = pytest.mark.skipif(not RELEASES_READY, reason="capture_config has no istio_version option yet")


def release_configs(release):
    """{name: options} of the configurations a release is checked with."""
    version = tuple(int(part) for part in release.split("."))
    redirect = dict(
        inbound_ports_include=["*"], inbound_ports_exclude=["8081"], outbound_ip_ranges_include=["*"],
        outbound_ip_ranges_exclude=["198.51.100.128/25", "2001:db8:fffe::/48"], outbound_ports_exclude=["8443"],
        redirect_dns=True, dns_servers_v4=["192.0.2.53", "127.0.0.53"], dns_servers_v6=["2001:db8::53"],
        proxy_gid=["1337", "1338"], owner_groups_exclude=["4242"], enable_inbound_ipv6=True)
    if version >= (1, 21):
        redirect["host_ipv4_loopback_cidr"] = "127.0.0.1/8"
    tproxy = dict(
        inbound_interception_mode="TPROXY", inbound_ports_include=["8080", "9000"],
        outbound_ip_ranges_include=["198.51.100.0/24", "203.0.113.0/24", "2001:db8:8000::/33"],
        outbound_ip_ranges_exclude=["203.0.113.64/26"], outbound_ports_include=["8443"],
        owner_groups_include=["1000", "4242"], kube_virt_interfaces=["eth9"], drop_invalid=True,
        enable_inbound_ipv6=True)
    out = {"redirect-dual-dns": redirect, "tproxy-groups": tproxy}
    if version >= (1, 27):
        out.update(("%s-sets" % name, dict(options, nft_layout="sets")) for name, options in list(out.items()))
    return out


def _release_case(release, name, options):
    return pytest.param(release, options, id="%s/%s" % (release, name))


RELEASE_CASES = [_release_case(release, name, options)
                 for release in RELEASES for name, options in release_configs(release).items()]


def release_probe_plan(cfg):
    """probe_plan plus what the releases changed: the proxy's own connections
    to the inbound tunnel port and to a loopback address other than
    127.0.0.1 (both over lo)."""
    probes, inbound, in_ports, out_ports = probe_plan(cfg)
    extra = []
    owners = [(APP, APP)] + [(int(u), APP) for u in cfg.proxy_uid[:1]] + [(APP, int(g)) for g in cfg.proxy_gid[-1:]]
    for uid, gid in owners:
        for family in (4, 6):
            extra.append(dict(proto="tcp", dst=HOST[family], port=int(cfg.inbound_tunnel_port), uid=uid, gid=gid))
        extra.append(dict(proto="tcp", dst="127.0.0.2", port=8080, uid=uid, gid=gid))
    return probes + extra, inbound, in_ports, out_ports


def release_nft_loader(cfg):
    """The nftables loader of cfg's layout: Istio's native transaction or the set translation."""
    def load(host, ruleset):
        host.run(["nft", "flush", "ruleset"])
        payload = render_transaction(cfg) if cfg.nft_layout == "istio" else render_nft(ruleset).payload()
        host.run(["nft", "-f", "-"], input=payload)
    return load


@needs_releases
@pytest.mark.parametrize("release, options", RELEASE_CASES)
def test_release_nft_steers_like_its_iptables(sides, release, options):
    cfg = CaptureConfig.from_params(mapped_options(dict(options, istio_version=release)))
    assert cfg.istio_version == tuple(int(part) for part in release.split("."))
    assert cfg.nft_layout == options.get("nft_layout", "istio" if cfg.istio_version >= (1, 27) else "sets")
    ipt = assert_same_landing(sides, release_nft_loader(cfg), generate(cfg), cfg, release_probe_plan(cfg))
    landed = set(r["banner"] for r in ipt if r["ok"])
    # Every configuration captures outbound and inbound traffic, DNS where asked.
    assert {"host:15001", "host:15006"} | ({"host:15053"} if cfg.redirect_dns else set()) <= landed, landed
