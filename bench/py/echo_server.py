#!/usr/bin/env python3
"""Python socketserver echo server for the benchmark: the reference point.

Usage: echo_server.py threading|forking [PORT]

Serves on 127.0.0.1:PORT (0 picks a free port) with ThreadingTCPServer or
ForkingTCPServer and a StreamRequestHandler that echoes until EOF, and prints
`listening on 127.0.0.1:PORT` on stderr once it accepts, like `host serve`.
"""

import socketserver
import sys

# The same listen backlog as `host serve` (LISTEN_BACKLOG in host/src/lib.rs).
BACKLOG = 1024
CHUNK = 64 * 1024


class EchoHandler(socketserver.StreamRequestHandler):
    # The host and the native server set TCP_NODELAY; so does this one.
    disable_nagle_algorithm = True

    def handle(self):
        while True:
            data = self.rfile.read1(CHUNK)
            if not data:
                return
            self.wfile.write(data)


class ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = BACKLOG


class ForkingServer(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = BACKLOG
    # max_children stays at socketserver's default, 40, like the host's.


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("threading", "forking"):
        sys.exit("usage: echo_server.py threading|forking [PORT]")
    port = int(sys.argv[2]) if len(sys.argv) == 3 else 0
    cls = ThreadingServer if sys.argv[1] == "threading" else ForkingServer
    with cls(("127.0.0.1", port), EchoHandler) as server:
        host, port = server.server_address[:2]
        print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
