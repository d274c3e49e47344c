"""A fault-injecting HTTP proxy in front of the moto S3 server, for the storage chaos tests.

Clients (boto3 through ``AWS_ENDPOINT_URL``) talk to the proxy; it forwards each request to
moto over real HTTP, except when a rule matches: then it answers ``500 InternalError``,
answers only after a delay, or reads the request and closes the connection without an
answer (a connection dropped mid-upload), or forwards the request, lets the server apply
it and then closes the connection without passing the answer on (``lost``: the write
happened, the client cannot know), or answers a given S3 error (``error``: status, code). Rules match on the method and on a substring of
the path and query (``uploadId=`` for a multipart part, ``partNumber=``...), fire a given
number of times (or with a probability from a seeded RNG), and count what they did.

    Imported by tests as ``s3_faults`` (tests/ is on sys.path through its conftest).
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_500 = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


def _error(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>{code}</Message></Error>"
    ).encode()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a dropped connection is the point


@dataclasses.dataclass
class Rule:
    kind: str  # "500", "error" (status, code), "slow", "drop", "lost"
    method: str = ""  # "" matches any
    path_has: str = ""  # substring of path + query
    header: str = ""  # a request header that must be present ("If-Match")
    times: int = 1  # fire this many times (0: use probability)
    probability: float = 0.0
    delay_s: float = 0.0
    status: int = 500  # kind "error": the answer's status and S3 error code
    code: str = "InternalError"
    fired: int = 0
    # "lost": the status codes the server answered the requests whose answer was dropped
    applied: list[int] = dataclasses.field(default_factory=list)


class FaultProxy:
    def __init__(self, target: str, seed: int = 0):
        self.target = urlparse(target)
        self.rules: list[Rule] = []
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._match(self.command, self.path, self.headers)
                if rule is not None and rule.kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if rule is not None and rule.kind in ("500", "error"):
                    body = ERROR_500 if rule.kind == "500" else _error(rule.code)
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if rule is not None and rule.kind == "slow":
                    time.sleep(rule.delay_s)
                conn = http.client.HTTPConnection(
                    proxy.target.hostname, proxy.target.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.target.hostname}:{proxy.target.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if rule is not None and rule.kind == "lost":
                    with proxy.lock:
                        rule.applied.append(resp.status)
                    conn.close()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response(resp.status)
                head = self.command == "HEAD"  # its Content-Length is the object's: keep it
                for k, v in resp.getheaders():
                    if k.lower() in ("transfer-encoding", "connection"):
                        continue
                    if k.lower() == "content-length" and not head:
                        continue
                    self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _match(self, method: str, path: str, headers=None) -> Rule | None:
        with self.lock:
            self.requests += 1
            for r in self.rules:
                if r.method and r.method != method:
                    continue
                if r.path_has and r.path_has not in path:
                    continue
                if r.header and (headers is None or r.header not in headers):
                    continue
                if r.times:
                    if r.fired >= r.times:
                        continue
                elif self.rng.random() >= r.probability:
                    continue
                r.fired += 1
                return r
        return None

    def add(self, **kw) -> Rule:
        rule = Rule(**kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
