"""The internet host's "what is my address" service.

Answers every HTTP GET with the caller's IPv4 address as plain text and
nothing else, so a worker behind the master's NAT sees the master's public
address -- the proof that NAT works.  Run by the lab inside the internet
namespace::

    python -m homeclust.lab whoami ADDRESS PORT
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WhoamiHandler(BaseHTTPRequestHandler):
    server_version = "homeclust-lab-whoami"

    def do_GET(self) -> None:
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()


def serve(address: str, port: int) -> None:
    server = ThreadingHTTPServer((address, port), WhoamiHandler)
    server.daemon_threads = True
    server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m homeclust.lab whoami ADDRESS PORT", file=sys.stderr)
        return 2
    serve(argv[0], int(argv[1]))
    return 0
