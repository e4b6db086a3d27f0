"""Fixture WSGI app for tests/logs.rs (standard library only).

Every response carries X-Pid (the worker's pid). Routes:
  /env         JSON {"remote_addr": REMOTE_ADDR, "pid": pid}
  /headers...  "ok" with X-Resp: out-7 (and Content-Type text/plain)
  /missing     404 "nope"
  anything else 200 "hello"
"""

import json
import os


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    pid = str(os.getpid())
    if path == "/env":
        body = json.dumps({"remote_addr": environ.get("REMOTE_ADDR"), "pid": os.getpid()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("X-Pid", pid),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path.startswith("/headers"):
        body = b"ok"
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Resp", "out-7"),
                                  ("X-Pid", pid), ("Content-Length", "2")])
        return [body]
    if path == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("X-Pid", pid),
                                         ("Content-Length", "4")])
        return [b"nope"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", pid),
                              ("Content-Length", "5")])
    return [b"hello"]
