"""A fake chat UI, shaped like a Chainlit app (standard library only).

    python3 chat_ui.py --port 8001 --model http://127.0.0.1:8000

GET / serves a one-page chat whose script streams answers from /v1/chat/completions (routed by
gte-supervisor to the model server, so the browser talks to one origin). POST /ask asks the
model server itself (server side, as a Chainlit app calls vLLM) and returns its answer.
GET /health answers 200.
"""

import argparse
import json
import signal
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_URL = ""

PAGE = """<!doctype html>
<meta charset="utf-8"><title>fake chat</title>
<form id="f"><input id="q" size="60" autofocus> <button>Send</button></form>
<pre id="out"></pre>
<script>
document.getElementById("f").onsubmit = async (e) => {
  e.preventDefault();
  const out = document.getElementById("out");
  const q = document.getElementById("q").value;
  out.textContent += "you: " + q + "\\nbot: ";
  const r = await fetch("/v1/chat/completions", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: "fake-llm", stream: true, messages: [{role: "user", content: q}]})});
  const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i; while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 2);
      const data = line.replace(/^data: /, "");
      if (data === "[DONE]") { out.textContent += "\\n"; continue; }
      out.textContent += JSON.parse(data).choices[0].delta.content || "";
    }
  }
};
</script>
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self.send(200, "text/plain", b"ok\n")
        if self.path == "/":
            return self.send(200, "text/html; charset=utf-8", PAGE.encode())
        self.send(404, "text/plain", b"not found\n")

    def do_POST(self):
        if self.path != "/ask":
            return self.send(404, "text/plain", b"not found\n")
        length = int(self.headers.get("Content-Length") or 0)
        question = self.rfile.read(length).decode() or "hello"
        req = urllib.request.Request(
            MODEL_URL + "/v1/chat/completions",
            data=json.dumps({"model": "fake-llm", "messages": [{"role": "user", "content": question}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        self.send(200, "text/plain; charset=utf-8", (answer + "\n").encode())

    def log_message(self, fmt, *args):
        sys.stderr.write("ui: " + (fmt % args) + "\n")


def main():
    global MODEL_URL
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default="http://127.0.0.1:8000")
    args = p.parse_args()
    MODEL_URL = args.model.rstrip("/")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("chat UI on 127.0.0.1:%d, model at %s" % (args.port, MODEL_URL), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
