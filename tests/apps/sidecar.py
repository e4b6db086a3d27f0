"""Fixture for tests/processes.rs: a `[[process]]` program (stdlib only) that can play a slow
model server, a chat UI, a crasher or a process that ignores SIGTERM.

    python3 sidecar.py --name NAME --port PORT [options]

Options:
  --healthy-after S   GET /health answers 503 until S seconds after start, then 200
  --unhealthy-if F    GET /health answers 500 while file F exists
  --crash-if F        exit 1 at once (before listening) when file F exists
  --events F          append "start|healthy|term|helper NAME PID" lines to F
  --ignore-term       ignore SIGTERM (the master must SIGKILL the process group)
  --helper            fork a helper child that ignores SIGTERM and sleeps
  --notify            send READY=1 to $NOTIFY_SOCKET once healthy (sd_notify)

Endpoints: /health; /crash (answers, then exits 3); /exit0 (answers, then exits 0); /stream
(chunked: 5 pieces "data: i", 300 ms apart); /ws (WebSocket echo: "echo: <msg>"); /env/VAR (the
variable's value); /say/TEXT (prints TEXT on stdout); anything else: 200 "NAME PATH".
"""

import argparse
import base64
import hashlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ARGS = None
STARTED = time.monotonic()
HEALTHY_SEEN = False
LOCK = threading.Lock()


def event(what):
    if ARGS.events:
        with open(ARGS.events, "a") as f:
            f.write("%s %s %d %.3f\n" % (what, ARGS.name, os.getpid(), time.time()))


def healthy():
    if ARGS.unhealthy_if and os.path.exists(ARGS.unhealthy_if):
        return False
    return time.monotonic() - STARTED >= ARGS.healthy_after


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
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", read_exact(f, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exact(f, 8))
    mask = read_exact(f, 4) if b1 & 0x80 else b"\0\0\0\0"
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

    def reply(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        global HEALTHY_SEEN
        path = self.path
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if path == "/health":
            if healthy():
                with LOCK:
                    if not HEALTHY_SEEN:
                        HEALTHY_SEEN = True
                        event("healthy")
                return self.reply(200, "ok\n")
            return self.reply(503 if time.monotonic() - STARTED < ARGS.healthy_after else 500, "not ready\n")
        if path == "/crash":
            self.reply(200, "crashing\n")
            print("%s: crash requested" % ARGS.name, flush=True)
            os._exit(3)
        if path == "/exit0":
            self.reply(200, "exiting\n")
            os._exit(0)
        if path.startswith("/say/"):
            print(path[5:], flush=True)
            return self.reply(200, "said\n")
        if path.startswith("/env/"):
            return self.reply(200, os.environ.get(path[5:], "") + "\n")
        if path == "/stream" or path.endswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                piece = ("data: %d %.3f\n\n" % (i, time.time())).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        return self.reply(200, "%s %s\n" % (ARGS.name, path))

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "").strip().encode()
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
                elif opcode == 0x8:
                    write_frame(self.wfile, 0x8, payload[:2])
                    return
        except (EOFError, ConnectionError, ValueError):
            pass

    def log_message(self, fmt, *args):
        pass


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--healthy-after", type=float, default=0.0)
    p.add_argument("--unhealthy-if")
    p.add_argument("--crash-if")
    p.add_argument("--events")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--helper", action="store_true")
    p.add_argument("--notify", action="store_true")
    ARGS = p.parse_args()
    event("start")
    if ARGS.crash_if and os.path.exists(ARGS.crash_if):
        print("%s: trigger file present, crashing at start" % ARGS.name, flush=True)
        sys.exit(1)
    if ARGS.helper:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(60)
        event("helper")
        if ARGS.events:
            with open(ARGS.events, "a") as f:
                f.write("helperpid %s %d 0\n" % (ARGS.name, pid))
    if ARGS.ignore_term:
        signal.signal(signal.SIGTERM, lambda *a: print("%s: ignoring SIGTERM" % ARGS.name, flush=True))
    else:
        def on_term(*a):
            event("term")
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    print("%s listening on %d" % (ARGS.name, ARGS.port), flush=True)
    sys.stderr.write("%s: a line on stderr\n" % ARGS.name)
    sys.stderr.flush()
    if ARGS.notify:
        def notify():
            time.sleep(ARGS.healthy_after)
            path = os.environ.get("NOTIFY_SOCKET")
            if path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                event("notified")
                s.sendto(b"STATUS=loaded\nREADY=1\n", path)

        threading.Thread(target=notify, daemon=True).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
