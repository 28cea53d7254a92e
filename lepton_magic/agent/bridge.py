"""``python -m lepton_magic.agent.bridge SOCKET``: joins this process's stdin and stdout to an
agent's resume socket. A kernel that comes back to an agent of detached runs runs it over a new
SSH connection: the bytes are the agent's, end to end (the agent checks that the first frame is
signed with its key), so the bridge needs no key and reads nothing."""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.expanduser(argv[0]))
    except OSError as e:
        print(f"lepton bridge: no agent at {argv[0]}: {e}", file=sys.stderr, flush=True)
        return 2
    print("lepton bridge: connected", file=sys.stderr, flush=True)  # the kernel waits for this line
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "agent")
    while True:
        for key, _mask in sel.select():
            if key.data == "in":
                data = os.read(stdin, 1 << 20)
                if not data:
                    return 0  # the kernel's connection ended: so does this one
                sock.sendall(data)
            else:
                data = sock.recv(1 << 20)
                if not data:
                    return 0  # the agent exited
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view):]


if __name__ == "__main__":
    sys.exit(main())
