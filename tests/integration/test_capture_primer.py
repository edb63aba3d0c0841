"""The capture action's conntrack primer script (plugins/action/capture.py,
PRIMER_SCRIPT) on a real kernel, in a namespace this test creates.

A TCP connection on loopback stands in for the SSH session Ansible holds;
SSH_CONNECTION names its ports, as sshd sets it. The script loads the
primer table only when conntrack has no entry for that session: not when a
rule made the kernel track connections before the session started, also
when SSH_CONNECTION is only in a parent process's environment (as under
sudo, which drops it); and it loads it when nothing tracks the session or
no SSH_CONNECTION can be found.
"""

import subprocess

import pytest

from ansible_collections.meshcapture.sidecar.plugins.action.capture import PRIMER_SCRIPT, PRIMER_TABLE

pytestmark = pytest.mark.netns

PORT = 2222
# A listener and a client on loopback; prints the client's port, then holds
# the connection until stdin closes.
SESSION = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", %d))
server.listen(1)
client = socket.create_connection(("127.0.0.1", %d))
peer, dummy = server.accept()
client.sendall(b"x")
peer.recv(1)
print(client.getsockname()[1], flush=True)
sys.stdin.read()
""" % (PORT, PORT)
# A stateful firewall rule: the kernel tracks connections from then on.
STATEFUL = ["iptables-nft", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"]


def run_primer(ns, ssh_connection, where):
    """PRIMER_SCRIPT's verdict ('primed' or '-') with SSH_CONNECTION in the script's own environment ('shell'),
    only in its parent's ('parent'), or nowhere (None)."""
    env = [] if ssh_connection is None else ["SSH_CONNECTION=%s" % ssh_connection]
    if where == "parent":
        argv = ["env"] + env + ["/bin/sh", "-c", 'env -u SSH_CONNECTION /bin/sh -c "$0"', PRIMER_SCRIPT]
    else:
        argv = ["env", "-u", "SSH_CONNECTION"] + env + ["/bin/sh", "-c", PRIMER_SCRIPT]
    out = ns.run(argv).stdout.split()
    assert out[:2] == ["#meshcapture-file", "primer"], out
    return out[2]


@pytest.mark.parametrize("stateful, where, expected", [
    (False, "shell", "primed"),
    (True, "shell", "-"),
    (True, "parent", "-"),
    (True, None, "primed"),
], ids=["untracked-session", "tracked-session", "tracked-session-env-in-parent", "no-ssh-connection"])
def test_primer_only_for_an_untracked_session(netns_factory, stateful, where, expected):
    ns = netns_factory("primer")
    ns.run(["ip", "link", "set", "lo", "up"])
    if stateful:
        ns.run(STATEFUL)
    # Held open until the namespace is deleted (which kills it).
    session = ns.python_popen(SESSION, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client_port = int(session.stdout.readline())
    ssh_connection = None if where is None else "127.0.0.1 %d 127.0.0.1 %d" % (client_port, PORT)
    assert run_primer(ns, ssh_connection, where or "shell") == expected
    tables = ns.run(["nft", "list", "tables"]).stdout
    assert ("table inet %s" % PRIMER_TABLE in tables) is (expected == "primed"), tables
