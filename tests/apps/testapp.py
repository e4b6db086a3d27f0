"""Fixture WSGI app for the gte-supervisor integration tests (standard library only).

Routes (anything else is 404):
  /                  plain "hello from testapp"
  /echo              the request body back as JSON: length, body (latin-1), CONTENT_LENGTH, keys
  /sum               JSON of the request body's length and zlib.adler32 (for large uploads)
  /env, /env/...     JSON of selected environ keys (PEP 3333 checks)
  /big               1 MiB deterministic bytes ((i*31+7) % 251) with Content-Length;
                     ?stream=1 yields it in 64 KiB pieces without Content-Length; ?mib=N
                     sends it N times over
  /gen?parts=N&size=S&extra=E  a generator of N parts of S bytes with Content-Length = N*S
                     (Flask's shape), then E more bytes beyond it (a broken app); &fail=1
                     raises after them; &nolen=1 declares no Content-Length
  /stream?dir=D      yields "first-chunk\n", waits (bounded) for the file D/release, then yields
                     "released\n" (or "timed-out\n"); &fail=1 raises instead
  /endless?dir=D     an event stream: "tick N\n" every 20 ms for up to 60 s; when the
                     generator is closed early, writes D/closed ("closed after N ticks")
  /block?dir=D       writes D/started (its pid), waits (bounded) for D/release, answers
                     "released <pid>" (or "timed-out <pid>")
  /slow?ms=N         sleeps N ms, answers its pid
  /error             raises (the worker must answer a short 500)
  /exit              os._exit(1) in the middle of the request
  /pid               its pid
  /whoami            "<pid> <GTE_WORKER_ID>"
  /readlines?mode=M  reads wsgi.input with readline() (M=readline), readlines() or iteration
  /write             uses the write() callable, then returns an iterable
  /stdout?m=X        prints stdout-marker-X to stdout and stderr-marker-X to stderr
"""

import json
import os
import sys
import time
import zlib
from urllib.parse import parse_qs

_PATTERN = bytes((i * 31 + 7) % 251 for i in range(251))
_BIG = None

SELECTED = (
    "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SCRIPT_NAME", "CONTENT_TYPE",
    "CONTENT_LENGTH", "REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME", "SERVER_PORT",
    "SERVER_PROTOCOL", "wsgi.url_scheme", "wsgi.multithread", "wsgi.multiprocess",
    "wsgi.run_once",
)


def big():
    global _BIG
    if _BIG is None:
        n = 1 << 20
        _BIG = (_PATTERN * (n // len(_PATTERN) + 1))[:n]
    return _BIG


def qs(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def respond(start_response, body, status="200 OK", ctype="text/plain; charset=utf-8"):
    if isinstance(body, str):
        body = body.encode("utf-8")
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def as_json(start_response, obj):
    return respond(start_response, json.dumps(obj), ctype="application/json")


def read_body(environ):
    cl = environ.get("CONTENT_LENGTH")
    inp = environ["wsgi.input"]
    return inp.read(int(cl)) if cl else inp.read()


def wait_for(path, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


def stream(d, fail=False):
    yield b"first-chunk\n"
    released = wait_for(os.path.join(d, "release"), 15)
    if fail:
        raise RuntimeError("fixture failure mid-stream")
    yield b"released\n" if released else b"timed-out\n"


def endless(d):
    n = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            yield b"tick %d\n" % n
            n += 1
            time.sleep(0.02)
    finally:
        if time.monotonic() < deadline:
            with open(os.path.join(d, "closed.tmp"), "w") as f:
                f.write("closed after %d ticks" % n)
            os.rename(os.path.join(d, "closed.tmp"), os.path.join(d, "closed"))


def big_stream(times=1):
    data = big()
    for _ in range(times):
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    q = qs(environ)
    pid = str(os.getpid())

    if path == "/":
        return respond(start_response, "hello from testapp\n")

    if path == "/echo":
        body = read_body(environ)
        return as_json(start_response, {
            "method": environ["REQUEST_METHOD"],
            "length": len(body),
            "body": body.decode("latin-1"),
            "content_length": environ.get("CONTENT_LENGTH"),
            "content_type": environ.get("CONTENT_TYPE"),
            "keys": sorted(k for k in environ),
        })

    if path == "/sum":
        body = read_body(environ)
        return as_json(start_response, {"length": len(body), "adler32": zlib.adler32(body)})

    if path == "/env" or path.startswith("/env/"):
        out = {k: environ[k] for k in SELECTED if k in environ}
        out.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        out["wsgi.version"] = list(environ.get("wsgi.version", ()))
        out["has_wsgi.input"] = "wsgi.input" in environ
        out["has_wsgi.errors"] = "wsgi.errors" in environ
        out["early_hints"] = repr(environ["wsgi.early_hints"]([("Link", "</a.css>; rel=preload")]))
        return as_json(start_response, out)

    if path == "/big":
        if q.get("stream"):
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return big_stream(int(q.get("mib", "1")))
        return respond(start_response, big() * int(q.get("mib", "1")),
                       ctype="application/octet-stream")

    if path == "/gen":
        parts, size = int(q.get("parts", "1")), int(q.get("size", "10"))
        extra = int(q.get("extra", "0"))
        short = int(q.get("short", "0"))  # declare this many bytes more than are sent
        status = {"204": "204 No Content", "304": "304 Not Modified"}.get(q.get("code"), "200 OK")
        headers = [("Content-Type", "application/octet-stream")]
        if not q.get("nolen"):
            headers.append(("Content-Length", str(parts * size + short)))
        start_response(status, headers)

        def gen():
            for i in range(parts):
                yield bytes([97 + i % 26]) * size
            if extra:
                yield b"!" * extra
            if q.get("fail"):
                raise RuntimeError("fixture failure after the body's start")
        return gen()

    if path == "/hop":
        # Hop-by-hop headers, as some apps send them under gunicorn (PEP 3333 forbids them).
        body = b"hop\n"
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body))),
                                  ("Connection", q.get("conn", "keep-alive")),
                                  ("Keep-Alive", "timeout=5"),
                                  ("Transfer-Encoding", "identity"),
                                  ("Upgrade", "h2c")])
        return [body]

    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return stream(q["dir"], bool(q.get("fail")))

    if path == "/endless":
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return endless(q["dir"])

    if path == "/block":
        d = q["dir"]
        with open(os.path.join(d, "started.tmp"), "w") as f:
            f.write(pid)
        os.rename(os.path.join(d, "started.tmp"), os.path.join(d, "started"))
        ok = wait_for(os.path.join(d, "release"), 20)
        return respond(start_response, ("released " if ok else "timed-out ") + pid)

    if path == "/slow":
        time.sleep(int(q.get("ms", "100")) / 1000.0)
        return respond(start_response, pid)

    if path == "/error":
        raise RuntimeError("fixture-secret-detail in /srv/secret/path.py")

    if path == "/exit":
        sys.stdout.flush()
        os._exit(1)

    if path == "/pid":
        return respond(start_response, pid)

    if path == "/whoami":
        return respond(start_response, "%s %s" % (pid, os.environ.get("GTE_WORKER_ID", "")))

    if path == "/readlines":
        inp = environ["wsgi.input"]
        mode = q.get("mode", "readline")
        if mode == "readline":
            lines = []
            while True:
                line = inp.readline()
                if not line:
                    break
                lines.append(line)
        elif mode == "readlines":
            lines = inp.readlines()
        else:
            lines = [line for line in inp]
        return as_json(start_response, {"lines": [l.decode("latin-1") for l in lines]})

    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written-part;")
        return [b"returned-part"]

    if path == "/stdout":
        m = q.get("m", "x")
        print("stdout-marker-" + m)
        print("stderr-marker-" + m, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        return respond(start_response, "%s %s" % (pid, os.environ.get("GTE_WORKER_ID", "")))

    return respond(start_response, "not found\n", status="404 Not Found")
