"""scripts/vm/vmcheck.py: the nft listing compared across a reboot."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "vm"))
from vmcheck import canonical_ruleset  # noqa: E402  pylint: disable=wrong-import-position

BEFORE = """table ip mangle {
\tchain ISTIO_DIVERT {
\t\tcounter packets 0 bytes 0 meta mark set 0x539
\t}
\tchain MESHCAPTURE_OWNED {
\t\t counter packets 0 bytes 0
\t}
}
table ip nat {
\tchain ISTIO_INBOUND {
\t\ttcp dport 15008 counter packets 0 bytes 0 return
\t}
}
"""
# The same tables after a boot-time restore: chains created in another order,
# and the warning newer nft versions print above a table iptables-nft made.
AFTER = """# Warning: table ip nat is managed by iptables-nft, do not touch!
table ip nat {
\tchain ISTIO_INBOUND {
\t\ttcp dport 15008 counter packets 0 bytes 0 return
\t}
}
# Warning: table ip mangle is managed by iptables-nft, do not touch!
table ip mangle {
\tchain MESHCAPTURE_OWNED {
\t\t counter packets 0 bytes 0
\t}
\tchain ISTIO_DIVERT {
\t\tcounter packets 0 bytes 0 meta mark set 0x539
\t}
}
"""


def test_chain_and_table_order_and_nft_warnings_do_not_count():
    assert canonical_ruleset(AFTER) == canonical_ruleset(BEFORE)


def test_rule_order_counts():
    swapped = BEFORE.replace("\t\ttcp dport 15008 counter packets 0 bytes 0 return\n",
                             "\t\ttcp dport 15009 counter packets 0 bytes 0 return\n")
    assert canonical_ruleset(swapped) != canonical_ruleset(BEFORE)
