"""Fixture: small WSGI apps of the usual shapes, each wrapped in wsgiref.validate.validator (the
PEP 3333 checker of the standard library), with its warnings turned into errors. Any breach of
PEP 3333 by the server (the environ, wsgi.input, wsgi.errors, start_response, write(), close()
of the iterable) raises in the app, so the request gets a 500 and the traceback lands in the
error log; the test checks there is none.

  /list...      returns [body]          /gen...      a generator of 3 chunks, no Content-Length
  /write...     uses write() then []    /read...     reads wsgi.input by readline/read(n)/iteration
  /file...      returns wsgi.file_wrapper(a file)
The body always describes the request: "METHOD SCRIPT_NAME|PATH_INFO|QUERY_STRING|RAW_URI len=N".
"""

import io
import warnings
from wsgiref.validate import WSGIWarning, validator

warnings.simplefilter("error", WSGIWarning)


def _describe(environ, body):
    return ("%s %s|%s|%s|%s len=%d\n" % (
        environ["REQUEST_METHOD"], environ.get("SCRIPT_NAME", ""), environ.get("PATH_INFO", ""),
        environ.get("QUERY_STRING", ""), environ.get("RAW_URI", ""), len(body))).encode("latin-1")


def _read(environ):
    inp = environ["wsgi.input"]
    n = int(environ.get("CONTENT_LENGTH") or 0)
    path = environ.get("PATH_INFO", "")
    if not n:
        return b""
    if path.startswith("/read"):
        first = inp.readline(n)
        rest = inp.read(n - len(first))
        return first + rest
    return inp.read(n)


def _app(environ, start_response):
    environ["wsgi.errors"].write("validated app: %s\n" % environ["REQUEST_METHOD"])
    environ["wsgi.errors"].flush()
    body = _read(environ)
    out = _describe(environ, body)
    path = environ.get("PATH_INFO", "")
    if path.startswith("/gen"):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen():
            yield out
            yield b"two\n"
            yield b"three\n"
        return gen()
    if path.startswith("/write"):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(out)
        return []
    if path.startswith("/file"):
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(out)))])
        return environ["wsgi.file_wrapper"](io.BytesIO(out))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


app = validator(_app)
