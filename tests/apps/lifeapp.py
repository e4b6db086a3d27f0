"""Fixture for the worker-lifecycle tests: recycling, timeouts, health, memory, crashes.

Routes: /pid, /stuck?s=N (sleeps inside stuck_in_model_call, so the timeout traceback names it),
/health (200, or 500 once /sicken was called in this process), /sicken, /alloc?mb=N (holds N MiB),
/exit?s=N (sleeps N seconds, default 0, then os._exit mid-request); any route with mark=PATH
first writes its pid to PATH. If the file named by $LIFEAPP_FAIL_IMPORT exists, import fails.
If $LIFEAPP_GATE_IMPORT names a file, every worker but worker 1 (every one, with
$LIFEAPP_GATE_ALL) waits (at most 30 s) for it to exist before its import finishes.
"""
import os
import time

if os.environ.get("LIFEAPP_FAIL_IMPORT") and os.path.exists(os.environ["LIFEAPP_FAIL_IMPORT"]):
    raise RuntimeError("lifeapp: import disabled by the test's trigger file")

if os.environ.get("LIFEAPP_GATE_IMPORT") and (
        os.environ.get("LIFEAPP_GATE_ALL") or os.environ.get("GTE_WORKER_ID") != "1"):
    _until = time.monotonic() + 30
    while not os.path.exists(os.environ["LIFEAPP_GATE_IMPORT"]) and time.monotonic() < _until:
        time.sleep(0.01)

SICK = False
HELD = []


def stuck_in_model_call(seconds):
    time.sleep(seconds)


def respond(start_response, body, status="200 OK"):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def app(environ, start_response):
    global SICK
    path = environ["PATH_INFO"]
    q = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
    pid = str(os.getpid())
    if "mark" in q:  # tell the test the request is inside the app (a path, percent-decoded)
        from urllib.parse import unquote
        with open(unquote(q["mark"]), "w") as f:
            f.write(pid)
    if path == "/pid":
        return respond(start_response, pid)
    if path == "/stuck":
        stuck_in_model_call(float(q.get("s", "30")))
        return respond(start_response, pid)
    if path == "/health":
        return respond(start_response, "sick" if SICK else "ok", "500 Internal Server Error" if SICK else "200 OK")
    if path == "/sicken":
        SICK = True
        return respond(start_response, pid)
    if path == "/alloc":
        HELD.append(bytearray(int(q.get("mb", "100")) << 20))
        for i in range(0, len(HELD[-1]), 4096):
            HELD[-1][i] = 1
        return respond(start_response, pid)
    if path == "/envvar":
        return respond(start_response, os.environ.get(q.get("name", ""), "<unset>"))
    if path == "/exit":
        time.sleep(float(q.get("s", "0")))
        os._exit(7)
    return respond(start_response, "not found", "404 Not Found")
