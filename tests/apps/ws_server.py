"""Fixture for tests/nginx.rs: a `command` worker (stdlib only) speaking HTTP/1.1 and WebSocket.

    python3 ws_server.py PORT      # listens on 127.0.0.1:PORT

GET with `Upgrade: websocket` does the RFC 6455 handshake, then echoes every text or binary
message back as "echo: <message>" (unmasked, as a server must), answers ping with pong and a
close frame with a close frame. Any other request gets 200 "ws-server <pid>".
"""

import base64
import hashlib
import os
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_exact(f, n):
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise EOFError("connection closed mid-frame")
        data += chunk
    return data


def read_frame(f):
    b0, b1 = read_exact(f, 2)
    opcode = b0 & 0x0F
    masked = b1 & 0x80
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", read_exact(f, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exact(f, 8))
    if not masked:
        raise ValueError("client frames must be masked (RFC 6455 5.1)")
    mask = read_exact(f, 4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(read_exact(f, length)))
    return opcode, payload


def write_frame(f, opcode, payload):
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    f.write(head + payload)
    f.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        body = ("ws-server %d\n" % os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "").strip().encode()
        if not key or self.headers.get("Sec-WebSocket-Version") != "13":
            self.send_error(400, "bad websocket handshake")
            return
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            while True:
                opcode, payload = read_frame(self.rfile)
                if opcode in (0x1, 0x2):
                    write_frame(self.wfile, opcode, b"echo: " + payload)
                elif opcode == 0x9:
                    write_frame(self.wfile, 0xA, payload)
                elif opcode == 0x8:
                    write_frame(self.wfile, 0x8, payload[:2])
                    return
        except (EOFError, ConnectionError, ValueError) as e:
            sys.stderr.write("ws_server: %s\n" % e)

    def log_message(self, fmt, *args):
        sys.stderr.write("ws_server: " + (fmt % args) + "\n")


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
