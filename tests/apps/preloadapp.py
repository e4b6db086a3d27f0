"""Fixture for the preload tests (tests/preload.rs).

At import it appends one line "<pid> <version>" to imports.log (beside this file), reads its
version from version.txt (if there) and builds a 48 MiB read-only blob, the stand-in for a
model's weights that forked workers share copy-on-write.

Routes: /who -> "import_pid pid ppid version"; /stuck?s=N (sleeps in stuck_in_model_call, for the
timeout traceback); /exit (os._exit mid-request). If import_fails exists beside this file, the
import raises.
"""
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.exists(os.path.join(HERE, "import_fails")):
    raise RuntimeError("preloadapp: import disabled by the test's trigger file")

IMPORT_PID = os.getpid()
try:
    with open(os.path.join(HERE, "version.txt")) as f:
        VERSION = f.read().strip()
except FileNotFoundError:
    VERSION = "1"
with open(os.path.join(HERE, "imports.log"), "a") as f:
    f.write("%d %s\n" % (IMPORT_PID, VERSION))
BLOB = bytes(range(256)) * (48 << 12)  # 48 MiB, every page written once


def stuck_in_model_call(seconds):
    time.sleep(seconds)


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/stuck":
        q = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
        stuck_in_model_call(float(q.get("s", "30")))
    elif path == "/exit":
        os._exit(7)
    body = ("%d %d %d %s %d" % (IMPORT_PID, os.getpid(), os.getppid(), VERSION, BLOB[1000])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
