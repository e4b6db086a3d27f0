"""A fake OpenAI-compatible model server, shaped like `vllm serve` (standard library only).

    python3 model_server.py --port 8000 [--load-seconds 3]

It "loads a model" for a few seconds (GET /health answers 503 meanwhile, as vLLM does while
loading), then serves:

  GET  /health                 200 once loaded
  GET  /v1/models              the one model
  POST /v1/chat/completions    echoes the last user message back word by word; with
                               "stream": true as server-sent events (data: {...}), one chunk per
                               word, ending with data: [DONE]
"""

import argparse
import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-llm"
LOADED_AT = 0.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            if time.monotonic() < LOADED_AT:
                return self.send_json(503, {"status": "loading"})
            return self.send_json(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        self.send_json(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self.send_json(404, {"error": "not found"})
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        messages = req.get("messages") or [{"role": "user", "content": ""}]
        words = ("You said: " + str(messages[-1].get("content", ""))).split()
        if not req.get("stream"):
            return self.send_json(200, {
                "object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "finish_reason": "stop"}],
            })
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data):
            piece = ("data: %s\n\n" % data).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()

        for i, w in enumerate(words):
            delta = {"content": (" " if i else "") + w}
            chunk(json.dumps({"object": "chat.completion.chunk", "model": MODEL,
                              "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
            time.sleep(0.1)  # "generating"
        chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, fmt, *args):
        sys.stderr.write("model: " + (fmt % args) + "\n")


def main():
    global LOADED_AT
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--load-seconds", type=float, default=3.0)
    args = p.parse_args()
    LOADED_AT = time.monotonic() + args.load_seconds
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("model server on 127.0.0.1:%d, loading for %.1fs" % (args.port, args.load_seconds), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
