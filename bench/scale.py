"""The scale series and the nftables backend of bench/bench.py.

bench.py measures every rules and scale variant for each backend of
--backends (iptables-nft and nftables by default), round-robin in the same
run. The iptables variants keep the keys they always had ("vm.first",
"scale10000.noop", ...); the nftables counterparts are the same keys with
the prefix "nft." ("nft.vm.first", "nft.scale10000.bare", ...). This module
holds what only the scale series and the nftables backend need: the scale
configuration, the nftables rendering, the rules.yml playbook with
`backend: nftables`, the nftables scale point, and the nftables rows of the
report and of the goals. The functions take the bench.Bench object as `b`
(its bare_nft() is the counterpart of bare_restore()).

`--backends ...,nftables-istio` (not in the default) measures the same
variants with Istio's native nftables layout (`nft_layout: istio`, which
needs `istio_version` 1.27 or later; keys with the prefix "nfti."),
reported beside the others, without goals.
"""

from __future__ import annotations

import math
import time

import yaml

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    DEFAULTS,
    CaptureConfig,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import generate
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import render_nft, render_nft_payload

try:  # Istio's native nftables layout (nft_layout: istio)
    from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_nft_istio
except ImportError:  # pragma: no cover  (a tree without it: --backends nftables-istio fails to measure)
    capture_nft_istio = None
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    FAMILIES,
    render_commands,
    render_restore,
)

SCALE_POINTS = (10, 100, 1000, 10000)
SCALE_PORTS = 1000
RENDER_REPEAT = 3  # in-process renders per run and scale point (cheap; all are samples)
BACKENDS = ("iptables-nft", "nftables")  # --backends, the default
EXTRA_BACKENDS = ("nftables-istio",)  # --backends, on request
NFT = "nft."  # key prefix of the nftables measurements (nft_layout: sets, the default below Istio 1.27)
NFT_ISTIO = "nfti."  # key prefix of the nftables-istio measurements
ISTIO_NFT_RELEASE = "1.27"  # the first release with Istio's native nftables capture
# The module options and key prefix of each nftables variant of --backends.
NFT_VARIANTS = {
    "nftables": (NFT, {"backend": "nftables"}),
    "nftables-istio": (NFT_ISTIO, {"backend": "nftables", "nft_layout": "istio", "istio_version": ISTIO_NFT_RELEASE}),
}
NFT_FLAT_LIMIT = 0.5  # the nftables backend's growth 10 -> 10,000 CIDRs, at most this share of iptables'


def scale_capture(vm_capture: dict, n_cidrs: int, n_ports: int = SCALE_PORTS) -> dict:
    """The VM configuration with n distinct /32 CIDRs and n_ports distinct ports excluded.

    Every other address and port (10.0.0.2, 10.0.0.4, ...; 30000, 30002,
    ...): no two are adjacent, so the nftables backend's interval sets hold
    one element per CIDR and port instead of merging them into one range.
    (iptables has one rule per CIDR and port either way.)
    """
    cidrs = ["10.%d.%d.%d/32" % (i >> 15 & 255, i >> 7 & 255, i << 1 & 255) for i in range(1, n_cidrs + 1)]
    ports = [str(30000 + 2 * i) for i in range(n_ports)]
    return dict(vm_capture, outbound_ip_ranges_exclude=cidrs, outbound_ports_exclude=ports)


def build(capture: dict):
    """(CaptureConfig, Ruleset) of module options, as the module computes them."""
    params = dict(DEFAULTS)
    params.update((k, v) for k, v in capture.items() if k in DEFAULTS)  # not the module's own: backend, state, ...
    cfg = CaptureConfig.from_params(params)
    return cfg, generate(cfg)


def render(capture: dict):
    """Render the way state=rendered does: validate, generate, commands and restore payloads."""
    cfg, ruleset = build(capture)
    commands = render_commands(ruleset)
    payloads = {family: render_restore(ruleset, family) for family in FAMILIES}
    cfg.to_dict()
    return ruleset, commands, payloads


def render_nftables(capture: dict):
    """Render what the module renders with backend=nftables: the iptables
    rendering (its `commands` and `restore` are returned in every backend)
    and the nft tables; (number of nft rules, nft -f payload)."""
    ruleset = render(capture)[0]
    if capture.get("nft_layout") == "istio":
        cfg = build(capture)[0]
        payload = capture_nft_istio.render_transaction(cfg)
        capture_nft_istio.render_tables(cfg)
        return sum(1 for line in payload.splitlines() if line.startswith(("add rule ", "insert rule "))), payload
    nft = render_nft(ruleset)
    payload = render_nft_payload(nft)
    for name in nft.tables:
        nft.table_text(name)
    return nft.rule_count(), payload


def nft_playbook(b, playbooks, backend="nftables"):
    """bench/playbooks/rules.yml with the options of the nftables variant
    (NFT_VARIANTS) added to the rules task, written once into the temporary
    directory."""
    prefix, options = NFT_VARIANTS[backend]
    if prefix + "playbook" not in b.info:
        play = yaml.safe_load((playbooks / "rules.yml").read_text())
        play[0]["tasks"][0]["meshcapture.sidecar.rules"].update(options)
        path = b.path("rules-" + backend, ".yml")
        path.write_text(yaml.safe_dump(play, sort_keys=False, width=1000))
        b.info[prefix + "playbook"] = str(path)
    return b.info[prefix + "playbook"]


def measure_scale_nft(b, n, netns, capture, playbooks, backend="nftables"):
    """The nftables counterpart of Bench.measure_scale at one scale point."""
    prefix, options = NFT_VARIANTS[backend]
    key = prefix + "scale%d" % n
    nft_capture = dict(capture, **options)
    for dummy in range(RENDER_REPEAT):
        start = time.perf_counter()
        rules, payload = render_nftables(nft_capture)
        b.record(key + ".render", time.perf_counter() - start)
    b.info[key + ".rules"] = rules
    b.info[key + ".bytes"] = len(payload)
    with netns.Netns("bbnft") as ns:
        b.record(key + ".bare", b.bare_nft(ns, payload))
    b.measure_rules(key, nft_capture, None, 0, playbook=nft_playbook(b, playbooks, backend))
    b.measure_module(key, nft_capture)


# ------------------------------------------------------------------ report
def fmt_s(value) -> str:
    return "n/a" if value is None or math.isnan(value) else "%.2f" % value


def _added(value):
    return "n/a" if math.isnan(value) else "%+.2f" % value


def growth(b, what, prefix=""):
    """(seconds at the largest point, seconds added from the smallest to the largest point)."""
    lo, hi = (b.med("%sscale%d.%s" % (prefix, n, what)) for n in (SCALE_POINTS[0], SCALE_POINTS[-1]))
    return hi, hi - lo


def nft_scale_report(b, add, backend="nftables"):
    """The scale table of an nftables variant, beside the iptables one."""
    r = b.results
    prefix, options = NFT_VARIANTS[backend]
    top = prefix + "scale%d" % SCALE_POINTS[-1]
    if top + ".first" not in r:
        return
    add("scale, %s: the same N CIDRs + %s ports (n=%d)"
        % (", ".join("%s: %s" % item for item in sorted(options.items())), format(SCALE_PORTS, ","),
           len(r[top + ".first"])))
    fmt = "%7s %9s %7s %8s %6s %6s %8s %9s %8s   %s"
    add(fmt % ("CIDRs", "nft bytes", "render", "bare nft", "first", "no-op", "mod 1st", "mod no-op", "max RSS",
               "iptables-nft: first / no-op / mod 1st / mod no-op"))
    for n in SCALE_POINTS:
        k, i = prefix + "scale%d" % n, "scale%d" % n
        add(fmt % (
            format(n, ","), format(b.info[k + ".bytes"], ","), "%.3f" % b.med(k + ".render"),
            "%.3f" % b.med(k + ".bare"), fmt_s(b.med(k + ".first")), fmt_s(b.med(k + ".noop")),
            fmt_s(b.med(k + ".mod_first")), fmt_s(b.med(k + ".mod_noop")),
            "%.0f MiB" % (max(r[k + ".rss_first"]) / 1024),
            " / ".join(fmt_s(b.med(i + "." + w)) for w in ("first", "noop", "mod_first", "mod_noop"))))
    add("  nft rules: %s at %s CIDRs, %s at %s (iptables: %s at %s CIDRs); nft bytes: size of the nft -f payload"
        % (format(b.info[prefix + "scale%d.rules" % SCALE_POINTS[0]], ","), format(SCALE_POINTS[0], ","),
           format(b.info[top + ".rules"], ","), format(SCALE_POINTS[-1], ","),
           format(b.info.get("scale%d.rules" % SCALE_POINTS[-1], 0), ","), format(SCALE_POINTS[-1], ",")))
    add("  render: in-process, as the module does with these options (the iptables rendering, which every backend")
    add("    returns as commands/restore, plus the nft tables); bare nft: nft -f of the payload, fresh namespace")
    add("  first, no-op: bench/playbooks/rules.yml with these options; mod: the module file alone")
    rows = []
    for what, text in (("bare", "bare"), ("render", "render"), ("mod_first", "mod 1st"), ("mod_noop", "mod no-op"),
                       ("first", "first"), ("noop", "no-op")):
        dummy, nft_added = growth(b, what, prefix)
        dummy, ipt_added = growth(b, what)
        rows.append("%s %s (iptables %s)" % (text, _added(nft_added), _added(ipt_added)))
    first, last = format(SCALE_POINTS[0], ","), format(SCALE_POINTS[-1], ",")
    add("  seconds added from %s to %s CIDRs: %s" % (first, last, ", ".join(rows[:3])))
    add("    %s" % ", ".join(rows[3:]))
    add("")


def nft_goals(b, verdict, big_first_margin, big_noop_margin):
    """The goals of the iptables backend, for the nftables backend: [(goal, measured, verdict)]."""
    out = []
    floor = b.med("floor")
    for key, text, limit in (("vm.noop", "no-op re-run <= 1.3x the floor", 1.3),
                             ("vm.first", "first apply <= 1.5x the floor", 1.5)):
        value = b.med(NFT + key)
        out.append(("nftables: " + text, "%.2f / %.2f s = %.2fx" % (value, floor, value / floor),
                    verdict(value / floor <= limit, value, floor)))
    top = NFT + "scale%d" % SCALE_POINTS[-1]
    label = "nftables: %s CIDRs + %s ports" % (format(SCALE_POINTS[-1], ","), format(SCALE_PORTS, ","))
    first, bare, noop = b.med(top + ".first"), b.med(top + ".bare"), b.med(top + ".noop")
    limit = floor + bare + big_first_margin
    out.append(("%s: first apply <= floor + bare nft -f + %g s" % (label, big_first_margin),
                "%.2f s, limit %.2f + %.2f + %g = %.2f s" % (first, floor, bare, big_first_margin, limit),
                verdict(first <= limit, first, floor, bare)))
    limit = floor + big_noop_margin
    out.append(("%s: no-op <= floor + %g s" % (label, big_noop_margin),
                "%.2f s, limit %.2f + %g = %.2f s" % (noop, floor, big_noop_margin, limit),
                verdict(noop <= limit, noop, floor)))
    # Flat in list size: what 10 -> 10,000 CIDRs add to the nftables
    # backend's first apply and no-op, against what they add to iptables'.
    details, ok, values = [], True, []
    for what, text in (("first", "first"), ("noop", "no-op"), ("mod_first", "module first"),
                       ("mod_noop", "module no-op")):
        dummy, nft_added = growth(b, what, NFT)
        dummy, ipt_added = growth(b, what)
        values += [nft_added, ipt_added]
        ok = ok and nft_added <= NFT_FLAT_LIMIT * max(ipt_added, 0.0)
        details.append("%s %s s (iptables %s s)" % (text, _added(nft_added), _added(ipt_added)))
    out.append(("nftables: %s->%s CIDRs adds <= %g x what it adds to iptables" % (
        format(SCALE_POINTS[0], ","), format(SCALE_POINTS[-1], ","), NFT_FLAT_LIMIT),
        ", ".join(details), verdict(ok, *values)))
    return out
