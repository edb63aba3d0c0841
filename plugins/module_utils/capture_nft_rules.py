# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""One iptables rule of the capture model as an nftables rule.

translate(rule) parses the rule's argv words (the finite vocabulary of
capture_generator) into NftRule values: a tuple of matches and one
statement, in the order the words came.  text() writes a rule the way
`nft list` prints it (nft 1.0.x), so a listing of the loaded table reads
back exactly as rendered.  Every word not known here raises
NftRenderError: no match is ever dropped silently.  Pure Python, no
Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import re
import socket
from collections import namedtuple

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import IPV4, IPV6

NFPROTO = {IPV4: "ipv4", IPV6: "ipv6"}
ADDR_KEYWORD = {IPV4: "ip", IPV6: "ip6"}
MAX_U32 = 2 ** 32 - 1

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,14}$")
_OWNER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?$")
_DIGITS_RE = re.compile(r"^[0-9]{1,10}$")
_PORT_RE = re.compile(r"^([0-9]{1,5})(?::([0-9]{1,5}))?$")
_PREFIX_RE = re.compile(r'^(?:"([A-Za-z0-9_.:-]{1,64})"|([A-Za-z0-9_.:-]{1,64}))$')
_CHAIN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,28}$")
_CT_STATES = ("INVALID", "ESTABLISHED", "RELATED", "NEW", "UNTRACKED")  # nft's bit order
_PROTOCOLS = ("tcp", "udp")
_MODULES = ("owner", "conntrack", "mark", "connmark", "multiport", "tcp", "udp")
_VERDICTS = {"RETURN": "return", "ACCEPT": "accept", "DROP": "drop"}


class NftRenderError(CaptureError):
    """The capture model holds something the nftables renderer cannot express."""


# kind: l4proto daddr saddr iifname oifname dport sport skuid skgid ctstate mark ctmark.
# value: a string, or a SetRef for daddr/saddr/dport/sport.
Match = namedtuple("Match", "kind negated value")
# family: None when the rule is the same for IPv4 and IPv6, else IPV4 / IPV6.
NftRule = namedtuple("NftRule", "family matches statement")
# A named set's content: kind is daddr4/daddr6/saddr4/saddr6/dport/sport; elements as nft prints them.
SetRef = namedtuple("SetRef", "kind elements")

SET_TYPES = {"daddr4": "ipv4_addr", "saddr4": "ipv4_addr", "daddr6": "ipv6_addr", "saddr6": "ipv6_addr",
             "dport": "inet_service", "sport": "inet_service"}


def nft_chain_name(chain):
    """PREROUTING -> prerouting, ISTIO_IN_REDIRECT -> istio-in-redirect (Istio's nft names)."""
    if not _CHAIN_RE.match(chain):
        raise NftRenderError("chain name %r cannot be an nftables chain name" % (chain,))
    return chain.lower().replace("_", "-")


def _fail(rule, message):
    raise NftRenderError("%s in %s rule '%s' of %s/%s" % (
        message, rule.family, " ".join(rule.params), rule.table, rule.chain))


def _u32(rule, word):
    try:
        value = int(word, 16) if word.lower().startswith("0x") else int(word, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_U32:
        _fail(rule, "%r is not a 32-bit value" % (word,))
    return value


def _mark_value(rule, word):
    """'1337' or '0x539/0xffff' -> (value, mask)."""
    value, sep, mask = word.partition("/")
    return _u32(rule, value), (_u32(rule, mask) if sep else MAX_U32)


def format_address(network):
    """An address or prefix as nft prints it (glibc inet_ntop, no /32 or /128)."""
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    text = socket.inet_ntop(family, network.network_address.packed)
    if network.prefixlen == network.max_prefixlen:
        return text
    return "%s/%d" % (text, network.prefixlen)


def _network(rule, word):
    try:
        network = ipaddress.ip_network(word, strict=False)
    except ValueError:
        network = None
    wanted = 4 if rule.family == IPV4 else 6
    if network is None or network.version != wanted or not re.match(r"^[0-9A-Fa-f:./]+$", word):
        _fail(rule, "%r is not an IPv%d address or CIDR" % (word, wanted))
    return network


def _port(rule, word):
    m = _PORT_RE.match(word)
    if not m:
        _fail(rule, "%r is not a port or port range" % (word,))
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 0 <= low <= high <= 65535:
        _fail(rule, "%r is not a port or port range" % (word,))
    return "%d" % low if low == high else "%d-%d" % (low, high)


def _interface(rule, word):
    if word in (".", "..") or not _IFNAME_RE.match(word):
        _fail(rule, "%r is not an interface name" % (word,))
    # iptables' trailing '+' wildcard is nft's trailing '*'.
    return word[:-1] + "*" if word.endswith("+") else word


def _owner(rule, word, resolve):
    if _DIGITS_RE.match(word) and int(word) < MAX_U32:
        return str(int(word))
    if not _OWNER_NAME_RE.match(word):
        _fail(rule, "%r is not a numeric id or a user/group name" % (word,))
    if resolve is not None:
        resolved = resolve(word)
        if resolved is None:
            _fail(rule, "owner name %r does not resolve" % (word,))
        return str(int(resolved))
    return '"%s"' % word


def _ct_states(rule, word):
    states = word.upper().split(",")
    if not states or any(s not in _CT_STATES for s in states):
        _fail(rule, "%r is not a list of conntrack states" % (word,))
    return ",".join(s.lower() for s in _CT_STATES if s in states)


class _Parser(object):
    def __init__(self, rule, resolve_owner):
        self.rule = rule
        self.resolve_owner = resolve_owner
        self.words = list(rule.params)
        self.pos = 0
        self.matches = []
        self.protocol = None
        self.module = None

    def next(self, what):
        if self.pos >= len(self.words):
            _fail(self.rule, "missing %s" % what)
        word = self.words[self.pos]
        self.pos += 1
        return word

    def parse(self):
        negate = False
        while self.pos < len(self.words):
            word = self.next("word")
            if word == "!":
                if negate:
                    _fail(self.rule, "double '!'")
                negate = True
                continue
            if word == "-j":
                if negate:
                    _fail(self.rule, "'!' before -j")
                return self.target()
            self.option(word, negate)
            negate = False
        _fail(self.rule, "no target (-j)")

    def add(self, kind, negated, value):
        self.matches.append(Match(kind, negated, value))

    def option(self, word, negate):
        rule = self.rule
        if word == "-p":
            proto = self.next("protocol")
            if proto not in _PROTOCOLS:
                _fail(rule, "unknown protocol %r" % (proto,))
            if negate or self.protocol:
                _fail(rule, "unsupported protocol match")
            self.protocol = proto
            self.add("l4proto", False, proto)
        elif word in ("-d", "-s"):
            kind = "daddr" if word == "-d" else "saddr"
            self.add(kind, negate, _network(rule, self.next("address")))
        elif word in ("-i", "-o"):
            self.add("iifname" if word == "-i" else "oifname", negate, _interface(rule, self.next("interface")))
        elif word in ("--dport", "--sport"):
            if self.protocol is None:
                _fail(rule, "%s without -p tcp/udp" % word)
            self.add(word[2:], negate, (self.protocol, _port(rule, self.next("port"))))
        elif word in ("--dports", "--sports") and self.module == "multiport":
            if self.protocol is None:
                _fail(rule, "%s without -p tcp/udp" % word)
            ports = [_port(rule, p) for p in self.next("ports").split(",")]
            if len(ports) > 15:
                _fail(rule, "multiport takes at most 15 ports")
            # An anonymous set, as nft prints it: tcp dport != { 53, 15008 }.
            self.add(word[2:-1], negate, (self.protocol, "{ %s }" % ", ".join(ports)))
        elif word == "-m":
            if negate:
                _fail(rule, "'!' before -m")
            module = self.next("module")
            if module not in _MODULES or (module in _PROTOCOLS and module != self.protocol):
                _fail(rule, "unknown match module %r" % (module,))
            self.module = module
        elif word in ("--uid-owner", "--gid-owner") and self.module == "owner":
            kind = "skuid" if word == "--uid-owner" else "skgid"
            self.add(kind, negate, _owner(rule, self.next("owner"), self.resolve_owner))
        elif word == "--ctstate" and self.module == "conntrack":
            if negate:
                _fail(rule, "negated --ctstate is not supported")
            self.add("ctstate", False, _ct_states(rule, self.next("states")))
        elif word == "--mark" and self.module in ("mark", "connmark"):
            kind = "mark" if self.module == "mark" else "ctmark"
            self.add(kind, negate, _mark_value(rule, self.next("mark")))
        else:
            _fail(rule, "unknown word %r" % (word,))

    def rest(self, options):
        """The target's options: {option: value}; only the given ones are allowed."""
        out = {}
        while self.pos < len(self.words):
            word = self.next("option")
            if word not in options or word in out:
                _fail(self.rule, "unknown word %r" % (word,))
            out[word] = self.next(word) if options[word] else True
        return out

    def target(self):
        rule = self.rule
        name = self.next("target")
        if name in _VERDICTS:
            self.rest({})
            return (_VERDICTS[name],)
        if name == "REDIRECT":
            opts = self.rest({"--to-ports": True, "--to-port": True})
            if len(opts) > 1:
                _fail(rule, "REDIRECT with both --to-ports and --to-port")
            if not opts:
                return ("redirect", None)
            if self.protocol is None:
                _fail(rule, "REDIRECT --to-ports without -p tcp/udp")
            return ("redirect", _port(rule, list(opts.values())[0].replace("-", ":")))
        if name == "TPROXY":
            opts = self.rest({"--tproxy-mark": True, "--on-port": True, "--on-ip": True})
            if "--on-ip" in opts or "--on-port" not in opts or self.protocol is None:
                _fail(rule, "TPROXY needs -p tcp/udp and --on-port, and no --on-ip")
            port = _port(rule, opts["--on-port"])
            mark = _mark_value(rule, opts["--tproxy-mark"]) if "--tproxy-mark" in opts else None
            if mark is not None and mark[1] != MAX_U32:
                _fail(rule, "a TPROXY mark mask other than 0xffffffff is not supported")
            return ("tproxy", rule.family, port, None if mark is None else mark[0])
        if name == "MARK":
            opts = self.rest({"--set-mark": True})
            value, mask = _mark_value(rule, opts.get("--set-mark", ""))
            if mask != MAX_U32:
                _fail(rule, "a MARK mask is not supported")
            return ("mark-set", value)
        if name == "CONNMARK":
            opts = self.rest({"--save-mark": False, "--restore-mark": False})
            if len(opts) != 1:
                _fail(rule, "CONNMARK needs exactly one of --save-mark / --restore-mark")
            return ("ct-mark-save",) if "--save-mark" in opts else ("ct-mark-restore",)
        if name == "CT":
            opts = self.rest({"--zone": True})
            zone = opts.get("--zone", "")
            if not _DIGITS_RE.match(zone) or int(zone) > 65535:
                _fail(rule, "CT needs --zone 0-65535")
            return ("ct-zone", int(zone))
        if name == "NFLOG":
            opts = self.rest({"--nflog-prefix": True, "--nflog-group": True, "--nflog-size": True})
            prefix = opts.get("--nflog-prefix")
            if prefix is not None:
                m = _PREFIX_RE.match(prefix)
                if not m:
                    _fail(rule, "unsupported NFLOG prefix %r" % (prefix,))
                prefix = m.group(1) or m.group(2)
            group = opts.get("--nflog-group", "0")
            size = opts.get("--nflog-size")
            if not _DIGITS_RE.match(group) or int(group) > 65535 or (size is not None and not _DIGITS_RE.match(size)):
                _fail(rule, "unsupported NFLOG group or size")
            return ("log", prefix, int(group), None if size is None else int(size))
        if name.startswith("-") or name.upper() != name or name in ("LOG", "DNAT", "SNAT", "MASQUERADE"):
            _fail(rule, "unknown target %r" % (name,))
        self.rest({})
        return ("jump", nft_chain_name(name))


def translate(rule, resolve_owner=None):
    """[NftRule] for one capture_rules.Rule (a TPROXY rule becomes two)."""
    parser = _Parser(rule, resolve_owner)
    statement = parser.parse()
    matches = tuple(parser.matches)
    has_address = any(m.kind in ("daddr", "saddr") for m in matches)
    family = rule.family if has_address or statement[0] == "tproxy" else None
    if statement[0] == "tproxy":
        # iptables' TPROXY drops a packet it finds no socket for; nft's tproxy
        # only stops evaluating the rule, so the drop is written out.
        return [NftRule(family, matches, statement), NftRule(family, matches, ("drop",))]
    return [NftRule(family, matches, statement)]


# ---------------------------------------------------------------- text
def _match_text(match, family, set_names):
    op = "!= " if match.negated else ""
    kind, value = match.kind, match.value
    if kind == "l4proto":
        return "meta l4proto %s" % value
    if kind in ("daddr", "saddr"):
        if isinstance(value, SetRef):
            return "%s %s @%s" % (ADDR_KEYWORD[family], kind, set_names[value])
        return "%s %s %s%s" % (ADDR_KEYWORD[family], kind, op, format_address(value))
    if kind in ("dport", "sport"):
        proto, port = value
        if isinstance(port, SetRef):
            return "%s %s @%s" % (proto, kind, set_names[port])
        return "%s %s %s%s" % (proto, kind, op, port)
    if kind in ("iifname", "oifname"):
        return '%s %s"%s"' % (kind, op, value)
    if kind in ("skuid", "skgid"):
        return "meta %s %s%s" % (kind, op, value)
    if kind == "ctstate":
        return "ct state %s" % value
    prefix = "meta mark" if kind == "mark" else "ct mark"
    mark, mask = value
    if mask == MAX_U32:
        return "%s %s0x%08x" % (prefix, op, mark)
    return "%s & 0x%08x %s 0x%08x" % (prefix, mask, "!=" if match.negated else "==", mark)


def _statement_text(statement):
    kind = statement[0]
    if kind in ("return", "accept", "drop"):
        return kind
    if kind == "jump":
        return "jump %s" % statement[1]
    if kind == "redirect":
        return "redirect" if statement[1] is None else "redirect to :%s" % statement[1]
    if kind == "tproxy":
        dummy, family, port, mark = statement
        text = "tproxy %s to :%s" % (ADDR_KEYWORD[family], port)
        return text + (" accept" if mark is None else " meta mark set 0x%08x accept" % mark)
    if kind == "mark-set":
        return "meta mark set 0x%08x" % statement[1]
    if kind == "ct-mark-save":
        return "ct mark set meta mark"
    if kind == "ct-mark-restore":
        return "meta mark set ct mark"
    if kind == "ct-zone":
        return "ct zone set %d" % statement[1]
    dummy, prefix, group, size = statement
    words = ["log"]
    if prefix is not None:
        words.append('prefix "%s"' % prefix)
    words.append("group %d" % group)
    if size is not None:
        words.append("snaplen %d" % size)
    return " ".join(words)


def text(rule, restrict_to, set_names):
    """The rule as `nft list` prints it; restrict_to adds `meta nfproto`.

    family-specific matches use the rule's family; a family-neutral rule
    emitted for one family only is restricted with restrict_to.
    """
    family = rule.family or restrict_to
    port_protos = set(m.value[0] for m in rule.matches if m.kind in ("dport", "sport"))
    words = []
    if restrict_to is not None and rule.family is None:
        words.append("meta nfproto %s" % NFPROTO[restrict_to])
    for match in rule.matches:
        # nft drops `meta l4proto tcp` that a `tcp dport` match implies.
        if match.kind == "l4proto" and match.value in port_protos:
            continue
        words.append(_match_text(match, family, set_names))
    words.append(_statement_text(rule.statement))
    return " ".join(words)
