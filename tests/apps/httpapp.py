"""Fixture for `command` workers: a tiny HTTP/1.1 server (stdlib) on 127.0.0.1:<argv[1]>.

GET /pid answers "command-app <pid>"; GET /hop lists the request headers it got and sends
hop-by-hop headers of its own; GET /204 answers 204 with a Content-Length; any other path answers "command-app".
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/hop":
            # The request headers it received, and hop-by-hop headers of its own.
            body = "\n".join(sorted("%s: %s" % (k.lower(), v) for k, v in self.headers.items()))
            body = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "keep-alive, X-Hop")
            self.send_header("X-Hop", "for the proxy only")
            self.send_header("Keep-Alive", "timeout=99")
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/204":
            # A length on a 204 (RFC 9110 forbids it): the master must not pass it on.
            self.send_response(204)
            self.send_header("Content-Length", "5")
            self.end_headers()
            return
        body = ("command-app %d" % os.getpid() if self.path == "/pid" else "command-app").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("httpapp: " + (fmt % args) + "\n")


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
