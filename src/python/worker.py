"""gte-supervisor's bundled WSGI worker (the "gtewire" protocol, version 1).

This module is embedded in the gte-supervisor binary (``include_str!``) and started by the master
as ``python3 -c <source>``, one process per worker.  It is a single file, uses only the standard
library (CPython 3.8+) and does not rely on ``__file__``.

What it does: import the WSGI application named by ``GTE_APP``, bind + listen on the unix socket
``GTE_SOCKET``, report ``READY`` (or ``FAILED`` and a traceback) on ``GTE_STATUS_FD``, then serve
requests that the master has already parsed from HTTP, using the compact binary framing specified
in ``src/python/PROTOCOL.md`` -- the authoritative description; read it before changing anything
here.  Each of the ``GTE_THREADS`` request threads accepts one master connection at a time and
serves the requests on it one after the other.

Layout of this file:

* wire constants and the response status/headers validator;
* ``Input`` (``wsgi.input``) and ``FileWrapper`` (``wsgi.file_wrapper``);
* ``_Handler``: one per request thread -- the per-request loop, ``start_response``/``write``,
  and everything that sends frames;
* process-level code: signals, exits, start-up, ``main()``.
"""

import atexit
import errno
import faulthandler
import gc
import importlib
import io
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback

# ------------------------------------------------------------------------------------------------
# Wire format (PROTOCOL.md)

_REQUEST_HEADER = struct.Struct('!BIQ')  # master -> worker: kind, meta_len, body_len (13 bytes)
_FRAME_HEADER = struct.Struct('!BI')     # worker -> master: kind, payload length (5 bytes)
_pack = _FRAME_HEADER.pack

_KIND_REQUEST = ord('R')
_KIND_PING = ord('P')
_S = ord('S')  # status + headers
_B = ord('B')  # a piece of body (never empty)
_A = ord('A')  # the app failed after S was sent
_E_FRAME = _pack(ord('E'), 0)
_P_FRAME = _pack(_KIND_PING, 0)

# The ten fixed meta fields, in wire order; the rest of the meta are KEY\0VALUE environ pairs.
_FIXED_KEYS = ('REQUEST_METHOD', 'PATH_INFO', 'QUERY_STRING', 'RAW_URI', 'SERVER_PROTOCOL',
               'REMOTE_ADDR', 'REMOTE_PORT', 'SERVER_NAME', 'SERVER_PORT', 'wsgi.url_scheme')

# Body chunks up to this size are copied into one buffer together with their frame header (and
# the S frame / E frame when they go out at the same moment) so that a frame group costs a single
# sendall(); bigger chunks are sent with a sendall() of their own to avoid the copy.
_COALESCE_MAX = 64 * 1024
# Largest B payload we emit; bigger chunks are split (memoryview slices, no copy).  The master
# holds a whole frame before passing it on, so this bounds what one frame costs it: a 20 MiB
# chunk for a slow client is 20 frames under its 4 MiB per-response budget, not one 20 MiB
# buffer (and it refuses frames over 64 MiB outright).
_MAX_B = 1 << 20
_READ_BLOCK = 64 * 1024

# The whole response (S + B + E) sent when the application fails before S went out.
_ERROR_BODY = b'Internal Server Error\n'
_error_head = ('500 Internal Server Error\0Content-Type\0text/plain\0Content-Length\0%d'
               % len(_ERROR_BODY)).encode('latin-1')
_ERROR_RESPONSE = b''.join((_pack(_S, len(_error_head)), _error_head,
                            _pack(_B, len(_ERROR_BODY)), _ERROR_BODY, _E_FRAME))
del _error_head

# Errors of a send on the master connection that mean "the other end is gone".
_PEER_GONE = frozenset(getattr(errno, name) for name in (
    'EPIPE', 'ECONNRESET', 'ENOTCONN', 'ESHUTDOWN', 'ECONNABORTED') if hasattr(errno, name))

# PEP 3333: "applications and middleware are forbidden from using HTTP/1.1 hop-by-hop features or
# headers" (same list as wsgiref.util.is_hop_by_hop).  As gunicorn does, such a header is dropped
# rather than failing the request (apps that ran under gunicorn send them), except Connection,
# which goes to the master: it keeps only a "close" option (closing the client connection after
# this response).
_HOP_BY_HOP = frozenset(('connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
                         'te', 'trailers', 'transfer-encoding', 'upgrade'))

# The S payload, "NNN reason\0Name\0Value\0Name\0Value...", validated in one regex pass: a 3-digit
# status, a space, a reason phrase; header names are RFC 9110 tokens; the reason and header values
# may contain any character except controls (HTAB is allowed).  Latin-1 encodability is checked
# by the encode() that follows, and NULs *inside* a field by counting the separators.
_TEXT = r'[^\x00-\x08\x0a-\x1f\x7f]*'
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_head_match = re.compile(
    r'[1-9][0-9][0-9] ' + _TEXT + r'(?:\x00' + _TOKEN + r'\x00' + _TEXT + r')*\Z').match
_token_match = re.compile(_TOKEN + r'\Z').match
_text_match = re.compile(_TEXT + r'\Z').match
_status_match = re.compile(r'[1-9][0-9][0-9] ' + _TEXT + r'\Z').match

_NO_START_RESPONSE = 'the application did not call start_response() before sending the body'

# The worker's own stderr (the master reads it into its error log).  Captured at start so that
# tracebacks still reach the master if the application later replaces sys.stderr.
_STDERR = sys.stderr


def _log(message):
    """Write one message (possibly several lines) to stderr, in a single write."""
    try:
        _STDERR.write(message if message.endswith('\n') else message + '\n')
        _STDERR.flush()
    except Exception:  # stderr gone (master died): nothing sensible left to do
        pass


def _log_request_error(env, what='Error handling request'):
    """Log the exception being handled, once, with a recognizable first line (never sent to the
    client)."""
    try:
        tb = traceback.format_exc()
        _log('%s %s %s\n%s' % (what, env.get('REQUEST_METHOD', '-'), env.get('RAW_URI', '-'), tb))
    except Exception:
        pass


class ClientDisconnected(ConnectionError):
    """The master connection broke while sending (normally: the HTTP client went away), or it hit
    EOF in the middle of the request body.  Raised into the application by ``write()`` and
    ``wsgi.input``; the worker then stops the response, calls ``close()`` and drops the
    connection."""


class _BrokenFrame(Exception):
    """A B frame whose length was already announced could not be completed (e.g. the file shrank
    during sendfile); the framing of the connection is lost, so it must be closed."""


def _bad_head_error(status, headers):
    """Build a descriptive exception for a start_response() call that failed the fast
    validation (slow path, only runs on errors)."""
    if not isinstance(status, str):
        return TypeError('status must be a str, not %s' % type(status).__name__)
    if not _status_match(status):
        return ValueError('invalid status %r: expected "NNN Reason" (3-digit code, a space, a '
                          'reason phrase without control characters)' % (status,))
    for h in headers:
        if type(h) is not tuple or len(h) != 2:
            return TypeError('each response header must be a (name, value) tuple, not %r' % (h,))
        name, value = h
        if not isinstance(name, str) or not isinstance(value, str):
            return TypeError('response header name and value must be str: %r' % (h,))
        if not _token_match(name):
            return ValueError('invalid response header name %r' % (name,))
        if not _text_match(value):
            return ValueError('invalid character in the value of response header %r: %r'
                              % (name, value))
    try:
        status.encode('latin-1')
        for name, value in headers:
            value.encode('latin-1')
    except UnicodeEncodeError as exc:
        return ValueError('response status and headers must be latin-1 encodable: %s' % exc)
    return ValueError('invalid response status or headers: %r %r' % (status, headers))


# ------------------------------------------------------------------------------------------------
# wsgi.input and wsgi.file_wrapper

class Input:
    """``wsgi.input``: the request body, i.e. exactly the next ``remaining`` bytes of the master
    connection.  Never reads past the body; at the end every read returns ``b""``."""

    __slots__ = ('_rfile', 'remaining')

    def __init__(self, rfile, length):
        self._rfile = rfile
        self.remaining = length

    def read(self, size=-1):
        remaining = self.remaining
        if size is None or size < 0 or size > remaining:
            size = remaining
        if not size:
            return b''
        data = self._rfile.read(size)
        self.remaining = remaining - len(data)
        if len(data) < size:
            raise ClientDisconnected('connection closed in the middle of the request body')
        return data

    def readline(self, size=-1):
        remaining = self.remaining
        if size is None or size < 0 or size > remaining:
            size = remaining
        if not size:
            return b''
        line = self._rfile.readline(size)
        self.remaining = remaining - len(line)
        if len(line) < size and line[-1:] != b'\n':
            raise ClientDisconnected('connection closed in the middle of the request body')
        return line

    def readlines(self, hint=-1):
        if hint is None or hint <= 0:
            hint = 0
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint and total >= hint:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if line:
            return line
        raise StopIteration

    def readable(self):
        return True


# Shared by every request without a body (stateless: reads never touch the connection).
_EMPTY_INPUT = Input(None, 0)


class FileWrapper:
    """``wsgi.file_wrapper`` (PEP 3333, "Optional Platform-Specific File Handling").

    Iterates ``filelike`` in ``blksize`` blocks; ``close()`` is passed through.  When an
    application returns one of these around a regular file, the worker sends it with
    ``os.sendfile`` instead of iterating."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, 'close'):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


_sendfile = getattr(os, 'sendfile', None)


# ------------------------------------------------------------------------------------------------
# Request handling

def _early_hints(headers):
    """environ['wsgi.early_hints'] (gunicorn 23+): apps may call it with a list of (name, value)
    to send a 103 Early Hints response ahead of the real one.  The hints are accepted and
    dropped: RFC 8297 makes them advisory (a client must cope with never getting one), and the
    master's HTTP server cannot send an interim response.  Provided so that code written for
    gunicorn does not fail with a KeyError."""
    return None


def _script_name():
    """The app's mount point, as gunicorn takes it: SCRIPT_NAME from the environment ([app] env
    or the service's own, e.g. systemd's Environment=), without a trailing slash."""
    # As bytes, decoded latin-1 like every environ string (PEP 3333), so that a non-ASCII mount
    # point compares equal to PATH_INFO, which carries the path's bytes the same way.
    return os.environb.get(b'SCRIPT_NAME', b'').decode('latin-1').rstrip('/')


def _mount(env, script_name):
    """Splits PATH_INFO at the mount point SCRIPT_NAME (PEP 3333: SCRIPT_NAME + PATH_INFO is the
    path).  Returns None when the path is under it, else a WSGI app answering 400, as gunicorn
    answers a path outside SCRIPT_NAME ("Configuration problem")."""
    script_name = script_name.rstrip('/')
    env['SCRIPT_NAME'] = script_name
    path = env['PATH_INFO']
    n = len(script_name)
    if path.startswith(script_name) and (len(path) == n or path[n] == '/'):
        env['PATH_INFO'] = path[n:]
        return None
    return _outside_script_name


def _outside_script_name(env, start_response):
    body = ('Bad Request: request path %r is outside SCRIPT_NAME %r\n'
            % (env['PATH_INFO'], env['SCRIPT_NAME'])).encode('latin-1', 'replace')
    start_response('400 Bad Request', [('Content-Type', 'text/plain'),
                                       ('Content-Length', str(len(body)))])
    return [body]


class _Handler:
    """One request thread: accepts a master connection, serves its requests, repeats.

    Per-request state lives in attributes that are reset for each request (``sframe``: the
    encoded S payload once start_response() was called, or None; ``sent``: S already went out),
    so that start_response/write are bound methods created once, not closures per request."""

    __slots__ = ('app', 'base_environ', 'busy', 'sock', 'sendall', 'dead', 'sframe', 'sent',
                 'clen', 'start_response', 'write')

    def __init__(self, app, base_environ):
        self.app = app
        self.base_environ = base_environ
        self.busy = False      # a request is in progress (read by the SIGTERM handler)
        self.sock = None
        self.sendall = None
        self.dead = False      # the connection broke while sending: drop it after this request
        self.sframe = None
        self.sent = False
        self.clen = -1
        self.start_response = self._start_response
        self.write = self._write

    # -- connection level -----------------------------------------------------------------------

    def accept_loop(self, lsock):
        """Accept master connections one at a time until SIGTERM asks us to stop.  With a timeout
        on the listening socket (single-threaded mode) the idle loop also notices a dead master."""
        accept = lsock.accept
        state = _state
        while not state.stopping:
            try:
                conn, _ = accept()
            except socket.timeout:
                if os.getppid() != state.ppid:
                    _master_gone()
                continue
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                # EMFILE/ENFILE/ENOBUFS...: don't spin; the master will see the worker stall
                _log('accept() failed: %s' % exc)
                time.sleep(0.5)
                continue
            conn.settimeout(None)  # blocking even if the app set socket.setdefaulttimeout()
            self.serve(conn)

    def serve(self, conn):
        """Serve the requests arriving on one master connection until EOF, a connection error,
        a protocol error, or a stop request.  Always closes the connection."""
        self.sock = conn
        self.sendall = conn.sendall
        self.dead = False
        rfile = conn.makefile('rb', buffering=_READ_BLOCK)
        one_frame = self.one_frame
        state = _state
        try:
            while one_frame(rfile) and not state.stopping:
                pass
        except OSError:
            return  # recv()/send() error on the connection: drop it, back to accept()
        finally:
            self.busy = False
            self.sock = self.sendall = None
            _close_conn(conn, rfile)

    def one_frame(self, rfile):
        """Read and answer one frame (a request or a ping) of the current connection.  Returns
        True when the connection can carry another one; False on EOF or a protocol error."""
        read = rfile.read
        head = read(13)
        if len(head) != 13:
            return False  # EOF: the master closed the connection
        kind, meta_len, body_len = _REQUEST_HEADER.unpack(head)
        if kind != _KIND_REQUEST:
            if kind == _KIND_PING and not meta_len and not body_len:
                self.sendall(_P_FRAME)
                return True
            _log('gtewire protocol error: unexpected frame %r (meta_len=%d, body_len=%d);'
                 ' closing the connection' % (chr(kind), meta_len, body_len))
            return False
        self.busy = True
        meta = read(meta_len)
        fields = meta.decode('latin-1').split('\0')
        n_fields = len(fields)
        if len(meta) != meta_len or n_fields < 10 or n_fields & 1:
            if len(meta) == meta_len:
                _log('gtewire protocol error: malformed request meta %r; closing the '
                     'connection' % (meta[:200],))
            return False
        env = self.base_environ.copy()
        it = iter(fields)
        env.update(zip(_FIXED_KEYS, it))  # zip stops at the 10th key without overreading
        env.update(zip(it, it))           # then KEY, VALUE pairs
        env['wsgi.input'] = inp = Input(rfile, body_len) if body_len else _EMPTY_INPUT
        self.sframe = None
        self.sent = False
        self.clen = -1
        app = self.app
        script_name = env['SCRIPT_NAME']
        if script_name:
            app = _mount(env, script_name) or app
        if not self.respond(env, app):
            return False
        if inp.remaining:
            # Skip what the app did not read so the next frame starts at the right place.
            if not _discard(read, inp.remaining):
                return False
            inp.remaining = 0  # a late read of the stale input object returns b""
        self.busy = False
        return True

    # -- one request ----------------------------------------------------------------------------

    def respond(self, env, app):
        """Call the application for one request and send its response.  Returns True when the
        connection can carry another request, False when it must be closed.

        The iterable's close() is called before the final E (or 500 / A) goes out, so E means
        "the worker is done with this request" -- the master's timeouts, pings and SIGTERM all
        see clean-up code (close() often runs a framework's teardown) as part of the request."""
        result = None
        tail = None  # the last frame(s), when not the normal end of response
        held = None  # the last body chunk, sent together with E
        try:
            result = app(env, self.start_response)
            rtype = type(result)
            if rtype is list or rtype is tuple:
                # Fast path: [body] or [] -> S + B + E in one buffer, one sendall().
                n = len(result)
                body = result[0] if n == 1 else (b'' if n == 0 else None)
                if type(body) is bytes and not self.sent and len(body) <= _COALESCE_MAX:
                    s = self.sframe
                    if s is None:
                        raise AssertionError(_NO_START_RESPONSE)
                    self.sent = True
                    if body:
                        data = b''.join((_pack(_S, len(s)), s, _pack(_B, len(body)), body,
                                         _E_FRAME))
                    else:
                        data = b''.join((_pack(_S, len(s)), s, _E_FRAME))
                    result = None  # plain lists/tuples have no close()
                    try:
                        self.sendall(data)
                    except OSError:
                        self.dead = True
                        return False
                    return True
            if not (rtype is FileWrapper and self._send_file(result)):
                # General case: stream the iterable chunk by chunk, as it yields.
                # The chunk that completes the declared Content-Length is the last one (more
                # would break the framing): it is held and goes out with the E frame in one
                # send (Flask/werkzeug return a generator, so this is their common case).
                send_chunk = self._send_chunk
                left = self.clen
                for chunk in result:
                    if type(chunk) is not bytes and not isinstance(chunk, bytes):
                        raise TypeError('the application yielded %s, but WSGI body chunks must '
                                        'be bytes' % type(chunk).__name__)
                    if chunk:
                        if held is not None:
                            send_chunk(held)  # more than Content-Length: the master trims it
                            held = None
                        n = len(chunk)
                        if n == left and n <= _COALESCE_MAX:
                            held = chunk
                        else:
                            send_chunk(chunk)
                        left -= n
            if self.sframe is None:
                raise AssertionError(_NO_START_RESPONSE)
        except Exception as exc:
            if self.dead:
                # The connection broke (normally: the HTTP client went away and the master
                # dropped the connection) -- not an application error, unless something else
                # failed on the way (e.g. _BrokenFrame).
                if not isinstance(exc, ClientDisconnected):
                    _log_request_error(env)
            else:
                _log_request_error(env)
                tail = _abort_frame(exc) if self.sent else _ERROR_RESPONSE
        finally:
            # PEP 3333: close() of the result is always called, also on errors and aborts
            # (and also when a BaseException such as SystemExit is propagating).
            if result is not None:
                close = getattr(result, 'close', None)
                if close is not None:
                    try:
                        close()
                    except Exception:
                        _log_request_error(env, 'Error closing the response iterable of')
        if self.dead:
            return False
        if tail is None:
            # [S if not sent yet] + [the held last chunk] + E, in one send.
            if self.sent:
                parts = []
            else:
                s = self.sframe
                parts = [_pack(_S, len(s)), s]
            if held is not None:
                parts += (_pack(_B, len(held)), held)
            parts.append(_E_FRAME)
            tail = b''.join(parts)
        self.sent = True
        try:
            self.sendall(tail)
        except OSError:
            self.dead = True
            return False
        return True

    def _start_response(self, status, headers, exc_info=None):
        """PEP 3333 start_response(): validates and encodes the S payload now (so that a bad
        status/header raises here, in the app), sends it later with the first body bytes."""
        if exc_info:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # avoid a frame <-> traceback reference cycle
        elif self.sframe is not None:
            raise AssertionError('start_response() called a second time without exc_info')
        try:
            if type(headers) is not list:
                raise TypeError
            fields = [status]
            clen = -1
            for h in headers:
                if type(h) is not tuple or len(h) != 2:
                    raise TypeError
                name = h[0].lower()
                if name in _HOP_BY_HOP and name != 'connection':
                    continue
                if name == 'content-length':
                    value = h[1]
                    ok = type(value) is str and value.isascii() and value.isdigit()
                    clen = int(value) if ok else -2
                fields += h
            head = '\0'.join(fields)
            if _head_match(head) is None or head.count('\0') != len(fields) - 1:
                raise ValueError
            sframe = head.encode('latin-1')
        except Exception:
            if type(headers) is not list:
                raise TypeError('response headers must be a list, not %s'
                                % type(headers).__name__) from None
            raise _bad_head_error(status, headers) from None
        self.sframe = sframe
        self.clen = clen
        return self.write

    def _write(self, data):
        """The write() callable returned by start_response(): sends at once."""
        if type(data) is not bytes and not isinstance(data, bytes):
            raise TypeError('write() argument must be bytes, not %s' % type(data).__name__)
        if self.dead:
            raise ClientDisconnected('the connection to the client is gone')
        if data:
            self._send_chunk(data)
        elif not self.sent:
            s = self.sframe
            if s is None:
                raise AssertionError('write() called before start_response()')
            self.sent = True
            self._send(_pack(_S, len(s)) + s)

    # -- sending --------------------------------------------------------------------------------

    def _send(self, data):
        try:
            self.sendall(data)
        except OSError as exc:
            self.dead = True
            raise ClientDisconnected('the connection to the master broke: %s' % exc) from exc

    def _send_chunk(self, chunk):
        """Send one non-empty body chunk as a B frame, preceded by S if not sent yet."""
        n = len(chunk)
        if self.sent:
            prefix = b''
        else:
            s = self.sframe
            if s is None:
                raise AssertionError(_NO_START_RESPONSE)
            self.sent = True
            prefix = _pack(_S, len(s)) + s
        if n <= _COALESCE_MAX:
            self._send(b''.join((prefix, _pack(_B, n), chunk)))
            return
        view = memoryview(chunk)
        while view:
            part = view[:_MAX_B]
            view = view[_MAX_B:]
            self._send(prefix + _pack(_B, len(part)))
            prefix = b''
            self._send(part)

    def _send_file(self, wrapper):
        """Send the body of a FileWrapper result with os.sendfile(): S (if not sent yet), then B
        headers of the known remaining length, each followed by the file bytes; the caller ends
        the exchange.  Returns False, having sent nothing, when the wrapped object is not a
        regular file addressable by fd + offset (the caller then iterates the wrapper)."""
        filelike = wrapper.filelike
        if _sendfile is None or isinstance(filelike, io.TextIOBase):
            return False
        try:
            fd = filelike.fileno()
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            # tell() is the logical position (it accounts for a buffered reader's read-ahead).
            offset = filelike.tell() if hasattr(filelike, 'tell') else os.lseek(fd, 0, 1)
        except (AttributeError, OSError, ValueError, TypeError):
            return False
        size = st.st_size - offset
        if size <= 0:
            return False  # nothing left to send: the iteration path sends S + E
        if self.sent:
            prefix = b''
        else:
            s = self.sframe
            if s is None:
                raise AssertionError(_NO_START_RESPONSE)
            self.sent = True
            prefix = _pack(_S, len(s)) + s
        out = self.sock.fileno()
        while size:
            n = size if size < _MAX_B else _MAX_B
            self._send(prefix + _pack(_B, n))
            prefix = b''
            self._sendfile_exact(out, fd, offset, n)
            offset += n
            size -= n
        return True

    def _sendfile_exact(self, out, fd, offset, n):
        """Send exactly n bytes of fd from offset (the B header is already out).  Falls back to
        pread() + sendall() where sendfile() is not supported for this file."""
        use_sendfile = True
        while n:
            if use_sendfile:
                try:
                    k = _sendfile(out, fd, offset, n)
                except OSError as exc:
                    if exc.errno in _PEER_GONE:
                        self.dead = True
                        raise ClientDisconnected('the connection to the master broke: %s'
                                                 % exc) from exc
                    use_sendfile = False  # EINVAL, ENOSYS, EIO...: retry the same range by hand
                    continue
            else:
                try:
                    data = os.pread(fd, n if n < _READ_BLOCK else _READ_BLOCK, offset)
                except OSError as exc:
                    self.dead = True
                    raise _BrokenFrame('reading the file failed in the middle of a body frame: '
                                       '%s' % exc) from exc
                if data:
                    self._send(data)
                k = len(data)
            if not k:
                self.dead = True
                raise _BrokenFrame('the file shrank while it was being sent')
            offset += k
            n -= k


def _close_conn(conn, rfile):
    try:
        rfile.close()
        conn.close()
    except OSError:
        pass


def _discard(read, n):
    """Read and drop n bytes of the connection; False on EOF."""
    while n > 0:
        chunk = read(n if n < _READ_BLOCK else _READ_BLOCK)
        if not chunk:
            return False
        n -= len(chunk)
    return True


def _abort_frame(exc):
    """The A frame for an exception raised after S was sent (the reason is for the master's log;
    the client never sees it)."""
    try:
        reason = '%s: %s' % (type(exc).__name__, exc)
    except Exception:
        reason = type(exc).__name__
    payload = reason[:200].encode('utf-8', 'replace')
    return _pack(_A, len(payload)) + payload


# ------------------------------------------------------------------------------------------------
# Process level: state shared with the signal handlers, exits

class _state:
    """Process-wide flags (a namespace, never instantiated)."""
    stopping = False   # SIGTERM received: finish the request(s) in progress, then exit
    exiting = False    # _exit_graceful() is running
    ppid = 0           # the master's pid, to notice it dying
    handlers = ()      # the _Handler of every request thread (their .busy flags)
    wake = None        # threading.Event waking the main thread (GTE_THREADS > 1)


def _exit_graceful(code=0):
    """Exit now, after running the application's atexit handlers and flushing stdio.

    os._exit() rather than sys.exit(): interpreter shutdown would wait for any non-daemon thread
    the application started, and would tear modules down under our daemon request threads."""
    _state.exiting = True
    try:
        run_exitfuncs = getattr(atexit, '_run_exitfuncs', None)
        if run_exitfuncs is not None:
            run_exitfuncs()
    except BaseException:
        pass
    _flush_stdio()
    os._exit(code)


def _master_gone():
    _log('gte worker: the master process went away; exiting')
    _exit_graceful(0)


def _on_sigterm(signum, frame):
    """SIGTERM: exit at once when idle, else let the busy request(s) finish first.

    Runs in the main thread, between two bytecodes: with GTE_THREADS=1 possibly in the middle of
    a request, which is why it only sets a flag when a request is in progress."""
    _state.stopping = True
    if _state.exiting:
        return  # a second SIGTERM while the atexit handlers run
    for handler in _state.handlers:
        if handler.busy:
            return
    _exit_graceful(0)


def _on_fast_exit(signum, frame):
    """SIGINT / SIGQUIT: exit now."""
    os._exit(0)


def _run_request_loop(handler, lsock):
    """Body of a request thread (or of the main thread when GTE_THREADS=1)."""
    try:
        handler.accept_loop(lsock)
    except SystemExit as exc:  # sys.exit() called by the application
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            _log(str(code))
            code = 1
        _exit_graceful(code)
    except BaseException:
        _log('gte worker: request loop crashed:\n' + traceback.format_exc())
        _exit_graceful(1)
    if _state.wake is not None:
        _state.wake.set()


# ------------------------------------------------------------------------------------------------
# Start-up

def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _take_status_fd():
    """The status pipe's fd from GTE_STATUS_FD, made non-inheritable (so that processes the app
    spawns cannot hold the pipe open) and removed from the environment.  None when unset."""
    value = os.environ.pop('GTE_STATUS_FD', None)
    if value is None or value == '':
        return None
    try:
        fd = int(value)
        os.set_inheritable(fd, False)
    except (ValueError, OSError) as exc:
        _log('gte worker: bad GTE_STATUS_FD=%r: %s' % (value, exc))
        os._exit(3)
    return fd


def _load_app(spec):
    """Import ``module:callable`` (the callable part may be a dotted attribute path)."""
    module_name, _, attr_path = spec.partition(':')
    module_name = module_name.strip()
    attr_path = attr_path.strip() or 'application'
    if not module_name:
        raise ValueError('GTE_APP=%r: expected "module:callable"' % (spec,))
    obj = importlib.import_module(module_name)
    for part in attr_path.split('.'):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError('GTE_APP=%r: %r has no attribute %r'
                                 % (spec, obj, part)) from None
    if not callable(obj):
        raise TypeError('GTE_APP=%r is not callable (it is a %s)' % (spec, type(obj).__name__))
    return obj


def _listen(path):
    """Bind + listen on the unix socket, replacing a stale socket file."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # non-inheritable by default
    try:
        lsock.bind(path)
        lsock.listen(64)
    except BaseException:
        lsock.close()
        raise
    return lsock


def _import_app():
    """Put the app directory first on sys.path and import ``GTE_APP``; returns (app, threads)."""
    env = os.environ
    spec = env.get('GTE_APP')
    if not spec:
        raise RuntimeError('GTE_APP is not set')
    threads = int(env.get('GTE_THREADS') or '1')
    if threads < 1:
        raise ValueError('GTE_THREADS must be >= 1, not %d' % threads)
    app_dir = env.get('GTE_CHDIR') or os.getcwd()
    if not sys.path or sys.path[0] != app_dir:
        sys.path.insert(0, app_dir)
    return _load_app(spec), threads


def _start():
    """Everything that may fail at start-up; returns (app, listening socket, thread count)."""
    path = os.environ.get('GTE_SOCKET')
    if not path:
        raise RuntimeError('GTE_SOCKET is not set')
    app, threads = _import_app()  # the app is imported before we listen (PROTOCOL.md)
    return app, _listen(path), threads


def _report_failure(status_fd, what='failed to start'):
    """Send FAILED + the current traceback on the status channel (or print it), then exit 3."""
    tb = traceback.format_exc()
    reported = False
    if status_fd is not None:
        try:
            _write_all(status_fd, b'FAILED\n' + tb.encode('utf-8', 'replace'))
            os.close(status_fd)
            reported = True
        except OSError:
            pass
    if not reported:
        # The master prints the traceback it receives once; only without it do we print here.
        _log('gte worker: %s:\n%s' % (what, tb))
    _exit_flush(3)


def _report_ready(status_fd):
    if status_fd is not None:
        try:
            _write_all(status_fd, b'READY\n')
            os.close(status_fd)
        except OSError as exc:  # the master stopped waiting for us
            _log('gte worker: cannot report READY: %s' % exc)
            _exit_flush(3)


def main():
    faulthandler.enable(all_threads=True)  # SIGABRT (request timeout) dumps every thread
    for stream in (sys.stdout, sys.stderr):  # prompt output even without PYTHONUNBUFFERED
        try:
            stream.reconfigure(line_buffering=True)
        except Exception:
            pass
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_fast_exit)
    signal.signal(signal.SIGQUIT, _on_fast_exit)
    _state.ppid = os.getppid()
    status_fd = _take_status_fd()
    if os.environ.get('GTE_MODE') == 'warm':
        _warm_main(status_fd)  # never returns
    try:
        app, lsock, threads = _start()
    except BaseException:
        _report_failure(status_fd)
    _report_ready(status_fd)
    _serve(app, lsock, threads)


def _serve(app, lsock, threads):
    """Run the request loop(s) until SIGTERM (after the requests in progress) or the master's
    death; never returns."""
    base_environ = {
        'SCRIPT_NAME': _script_name(),
        'SERVER_SOFTWARE': 'gte-supervisor',
        'wsgi.version': (1, 0),
        'wsgi.errors': _STDERR,
        'wsgi.multithread': threads > 1,
        'wsgi.multiprocess': True,
        'wsgi.run_once': False,
        'wsgi.input_terminated': True,
        'wsgi.file_wrapper': FileWrapper,
        'wsgi.early_hints': _early_hints,
    }
    handlers = [_Handler(app, base_environ) for _ in range(threads)]
    _state.handlers = handlers

    if threads == 1:
        # The main thread serves; the accept timeout lets it notice a dead master when idle.
        lsock.settimeout(1.0)
        _run_request_loop(handlers[0], lsock)
        _exit_graceful(0)  # only returns on SIGTERM after the request in progress finished

    # N daemon threads block in accept() on the same socket; the main thread only waits for
    # signals, for the end of the last busy request after SIGTERM, and checks the master is alive.
    _state.wake = wake = threading.Event()
    worker_id = os.environ.get('GTE_WORKER_ID', '')
    for i, handler in enumerate(handlers):
        threading.Thread(target=_run_request_loop, args=(handler, lsock), daemon=True,
                         name='gte-worker%s-%d' % (worker_id, i)).start()
    ppid = _state.ppid
    while True:
        wake.wait(1.0)
        wake.clear()
        if _state.stopping and not any(h.busy for h in handlers):
            _exit_graceful(0)
        if os.getppid() != ppid:
            _master_gone()


# ------------------------------------------------------------------------------------------------
# Preload: the warm process (PROTOCOL.md, "Preload")

def _warm_main(status_fd):
    """``GTE_MODE=warm``: import the app once, report READY, then fork a worker for every request
    that arrives on the control socket (``GTE_CONTROL_FD``, SOCK_SEQPACKET).  Each worker is forked
    twice so that it becomes the master's child (the master is a child subreaper), not ours: the
    master reaps, times and kills it like any worker, and it keeps serving if we die.  Exits when
    the master closes the control socket."""
    import ctypes  # imported here, once: the forked workers need prctl()
    try:
        ctl_fd = int(os.environ.pop('GTE_CONTROL_FD'))
        os.set_inheritable(ctl_fd, False)
        ctl = socket.socket(fileno=ctl_fd)
        app, threads = _import_app()
    except BaseException:
        _report_failure(status_fd, 'the warm process failed to import the app')
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        prctl = None
    _warn_threads_at_import()
    # Everything imported so far is moved out of the collector's reach (gc.freeze): a forked
    # worker's collections then never touch -- and so never copy -- the shared pages.
    gc.collect()
    gc.freeze()
    _report_ready(status_fd)
    master_pid = _state.ppid
    fd_size = struct.calcsize('i')
    while True:
        try:
            msg, ancdata, _flags, _addr = ctl.recvmsg(4096, socket.CMSG_SPACE(3 * fd_size))
        except InterruptedError:
            continue
        except OSError as exc:
            _log('gte warm process: control socket failed: %s; exiting' % exc)
            break
        fds = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(data) - len(data) % fd_size
                fds.extend(struct.unpack('%di' % (n // fd_size), data[:n]))
        if not msg:
            break  # the master closed the control socket: nothing more to fork
        fields = msg.decode('utf-8', 'replace').split('\0')
        if len(fields) != 3 or fields[0] != 'F' or len(fds) != 3:
            _log('gte warm process: malformed fork request %r with %d fds; ignored'
                 % (msg[:200], len(fds)))
            for fd in fds:
                os.close(fd)
            continue
        _flush_stdio()  # or the child would write our buffered output again
        pid = os.fork()
        if pid == 0:
            try:
                if os.fork():
                    os._exit(0)  # the intermediate child: its exit hands the worker to the master
                ctl.close()
                _become_worker(app, threads, fields[1], fields[2], fds, master_pid, prctl)
            except BaseException:
                try:
                    _log('gte worker: start after fork failed:\n' + traceback.format_exc())
                finally:
                    os._exit(3)
            os._exit(0)
        for fd in fds:
            os.close(fd)
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
    _exit_graceful(0)


def _warn_threads_at_import():
    """Threads do not survive fork(): warn when the import started some (they will be missing
    in every forked worker: e.g. a thread pool a library started at import time)."""
    try:
        native = len(os.listdir('/proc/self/task'))
    except OSError:
        native = threading.active_count()
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if native > 1 or names:
        _log('gte warm process: WARNING: importing the app started %d thread(s) besides the main '
             'one%s; threads do not survive fork(), so forked workers will not have them. Start '
             'them lazily (on first request) or set preload = false.'
             % (max(native - 1, len(names)), (' (%s)' % ', '.join(names)) if names else ''))


def _become_worker(app, threads, worker_id, sock_path, fds, master_pid, prctl):
    """In the forked worker: wait to be the master's child, die with it, take the stdio and status
    channel the master sent, listen, report PID and READY, serve."""
    status_fd, out_fd, err_fd = fds
    os.set_inheritable(status_fd, False)
    deadline = time.monotonic() + 5.0
    while os.getppid() != master_pid:
        if os.getppid() == 1 or time.monotonic() > deadline:
            os._exit(3)  # the master is gone (or we were never handed to it)
        time.sleep(0.0002)
    if prctl is not None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: never outlive the master
    if os.getppid() != master_pid:
        os._exit(0)  # the master died in between
    os.setpgid(0, 0)  # own process group, like a spawned worker
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (out_fd, err_fd):
        if fd > 2:
            os.close(fd)
    os.environ['GTE_WORKER_ID'] = worker_id
    os.environ['GTE_SOCKET'] = sock_path
    _state.ppid = master_pid
    _write_all(status_fd, b'PID %d\n' % os.getpid())
    try:
        lsock = _listen(sock_path)
    except BaseException:
        _report_failure(status_fd)
    _report_ready(status_fd)
    _serve(app, lsock, threads)


def _flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _exit_flush(code):
    _flush_stdio()
    os._exit(code)


if __name__ == '__main__':
    main()
