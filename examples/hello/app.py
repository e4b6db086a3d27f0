"""The smallest gte-supervisor example: a standard-library-only WSGI app.

Run it from the repository root with:

    cargo run --release -- -c examples/hello/workers.toml
    curl http://127.0.0.1:8000/

`GET /` (and `HEAD /`) answer ``Hello, world!`` as text/plain; any other path
is 404 and any other method on ``/`` is 405. For HEAD the server drops the body.
"""

HELLO = b"Hello, world!\n"
NOT_FOUND = b"Not Found\n"
NOT_ALLOWED = b"Method Not Allowed\n"


def app(environ, start_response):
    """WSGI entry point (``wsgi = "app:app"`` in workers.toml)."""
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "") or "/"

    if path != "/":
        status, body, extra = "404 Not Found", NOT_FOUND, []
    elif method not in ("GET", "HEAD"):
        status, body, extra = "405 Method Not Allowed", NOT_ALLOWED, [("Allow", "GET, HEAD")]
    else:
        status, body, extra = "200 OK", HELLO, []

    headers = [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
    ] + extra
    start_response(status, headers)
    return [body]


if __name__ == "__main__":
    # Handy without gte-supervisor: `python3 app.py` serves on 127.0.0.1:8000.
    from wsgiref.simple_server import make_server

    with make_server("127.0.0.1", 8000, app) as server:
        print("serving on http://127.0.0.1:8000/")
        server.serve_forever()
