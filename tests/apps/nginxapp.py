"""Fixture for tests/nginx.rs: a WSGI app (stdlib only) that reports what the proxies told it.

Every request is answered with a JSON object: the client address the app sees (REMOTE_ADDR), the
forwarding headers as they arrived, the URL scheme, the path and the size of the request body it
read. With NGINXAPP_IMPORT_DELAY=<seconds> in the environment the import sleeps that long first,
so a test can watch the master report "no worker ready" (503) before the workers are loaded.
"""

import json
import os
import time

_delay = float(os.environ.get("NGINXAPP_IMPORT_DELAY", "0") or 0)
if _delay > 0:
    time.sleep(_delay)


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    report = {
        "remote_addr": environ.get("REMOTE_ADDR"),
        "x_forwarded_for": environ.get("HTTP_X_FORWARDED_FOR"),
        "x_real_ip": environ.get("HTTP_X_REAL_IP"),
        "x_forwarded_proto": environ.get("HTTP_X_FORWARDED_PROTO"),
        "scheme": environ.get("wsgi.url_scheme"),
        "host": environ.get("HTTP_HOST"),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "body_len": len(body),
        "pid": os.getpid(),
    }
    out = (json.dumps(report, sort_keys=True) + "\n").encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(out)))],
    )
    return [out]
