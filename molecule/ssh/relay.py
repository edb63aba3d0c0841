"""ssh ProxyCommand for the SSH scenario: relay stdin/stdout to HOST:PORT.

    ProxyCommand ip netns exec CTRLNS python3 relay.py %h %p

It runs inside the controller-side namespace (CTRLNS), so ssh's TCP
connection starts there and reaches the VM namespace through its veth, as a
connection from another machine would: the controller itself stays in this
machine's own network namespace, which the scenario never changes. Standard
library only; exits when either side closes.
"""

import os
import selectors
import socket
import sys


def main(host, port):
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
    except OSError as exc:
        sys.stderr.write("relay: cannot connect to %s:%s: %s\n" % (host, port, exc))
        return 255
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "stdin")
    sel.register(sock, selectors.EVENT_READ, "sock")
    while True:
        for key, _events in sel.select():
            if key.data == "stdin":
                data = os.read(0, 65536)
                if data:
                    sock.sendall(data)
                else:
                    sel.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
            else:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view):]


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
