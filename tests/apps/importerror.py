"""Fixture: an app module that fails at import time (exit code 3 expected).

The marker is assembled at run time so that it appears in the traceback only as the exception
message, not again in the quoted source line.
"""

raise RuntimeError("fixture-import-" + "failure-7f3a")


def app(environ, start_response):  # never reached
    start_response("200 OK", [])
    return [b""]
