"""The etcd backend's requests: POSTs to the JSON gateway of the first endpoint that answers (etcd3gw's HTTP
sessions), with authentication and TLS, and every client error translated once into the project's.

Endpoints are tried in order; a connection error moves on to the next, and a request that may have reached
a server is not sent again. With a user and password the gateway's token is fetched by ``Authenticate`` and
sent with every request (fetched again once when the server says it expired).
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from ..errors import BackendUnavailable, ConfigError
from .etcd_wire import Code, code_of, message_of, translate


def parse_endpoints(hosts: str, url: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` (port 2379 when left out); ConfigError naming ``url`` for a bad one."""
    endpoints = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "2379")
        try:
            endpoints.append((host.strip("[]") or "127.0.0.1", int(port)))
        except ValueError:
            raise ConfigError(f"bad endpoint {item!r}", source=url) from None
    return endpoints


class Gateway:
    """One HTTP session per endpoint, opened on first use; ``post`` is the backend's one request path."""

    def __init__(self, endpoints: list[tuple[str, int]], url: str, *, auth: tuple[str, str] | None,
                 connect_timeout: float, timeout: float, tls: bool, ca_cert: str | None, cert_cert: str | None,
                 cert_key: str | None) -> None:
        self.endpoints = endpoints
        self.url = url  # redacted
        self.auth = auth
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.tls, self.ca_cert, self.cert_cert, self.cert_key = tls, ca_cert, cert_cert, cert_key
        self.clients: dict[int, Etcd3Client] = {}
        self.current = 0  # index of the endpoint in use

    def client(self, index: int) -> Etcd3Client:
        """The session of endpoint ``index`` (authenticated when a user was given)."""
        if index not in self.clients:
            host, port = self.endpoints[index]
            client = Etcd3Client(host=host, port=port, protocol="https" if self.tls else "http",
                                 ca_cert=self.ca_cert, cert_key=self.cert_key, cert_cert=self.cert_cert,
                                 timeout=(self.connect_timeout, self.timeout),  # type: ignore[arg-type]
                                 api_path="/v3/")
            if self.auth is not None:
                self._authenticate(client)
            self.clients[index] = client
        return self.clients[index]

    def _authenticate(self, client: Etcd3Client) -> None:
        assert self.auth is not None
        client.session.headers.pop("Authorization", None)
        name, password = self.auth
        reply = client.post(client.get_url("/auth/authenticate"), json={"name": name, "password": password})
        client.session.headers["Authorization"] = str(reply["token"])

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers; client errors translated here, once."""
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            index = self.current
            try:
                client = self.client(index)
                try:
                    reply: dict[str, Any] = client.post(client.get_url(path), json=body)
                except etcd_exc.Etcd3Exception as exc:
                    if self.auth is None or code_of(exc) != Code.UNAUTHENTICATED:
                        raise
                    self._authenticate(client)  # the token expired: once more with a new one
                    reply = client.post(client.get_url(path), json=body)
                return reply
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                last = exc
                self.clients.pop(index, None)
                self.current = (index + 1) % len(self.endpoints)
                text = exc.detail_text or ""
                if "NewConnectionError" not in text and "ConnectTimeout" not in text:
                    break  # the request may have been applied: let the caller decide, do not resend
            except etcd_exc.Etcd3Exception as exc:
                raise translate(code_of(exc), message_of(exc), self.url,
                                server_error=isinstance(exc, etcd_exc.InternalServerError)) from exc
        raise BackendUnavailable(f"etcd unreachable at {self.url}: {message_of(last)}") from last

    def watch_target(self) -> tuple[str, int, ssl.SSLContext | None, str | None]:
        """Host, port, TLS context and authorization token for a watch stream to the endpoint in use."""
        host, port = self.endpoints[self.current]
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_cert)
            if self.cert_cert and self.cert_key:
                context.load_cert_chain(self.cert_cert, self.cert_key)
        auth = self.client(self.current).session.headers.get("Authorization")
        return host, port, context, str(auth) if auth else None

    def post_together(self, path: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST every body at once, each on a connection of its own to the endpoint in use, then read the
        answers in order: the server works on them side by side. No failover and no re-authentication
        (``post`` does both): any failure raises, and the caller may go on with ``post``."""
        host, port, context, auth = self.watch_target()
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        timeout = max(self.connect_timeout, self.timeout)
        conns: list[http.client.HTTPConnection] = []
        try:
            for body in bodies:
                conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=context) if context
                        else http.client.HTTPConnection(host, port, timeout=timeout))
                conns.append(conn)
                conn.request("POST", f"/v3{path}", json.dumps(body), headers)
            replies = []
            for conn in conns:
                answer = conn.getresponse()
                data = answer.read()
                if answer.status != 200:
                    text = data.decode("utf-8", "replace")
                    raise translate(code_of(_Failed(text)), message_of(_Failed(text)), self.url,
                                    server_error=answer.status >= 500)
                replies.append(json.loads(data))
            return replies
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise BackendUnavailable(f"etcd at {self.url}: {path}: {exc}") from exc
        finally:
            for conn in conns:
                conn.close()

    def close(self) -> None:
        """Close every HTTP session."""
        for client in self.clients.values():
            client.session.close()
        self.clients.clear()


class _Failed(Exception):
    """A gateway error body, shaped as etcd3gw's exceptions are for ``code_of`` and ``message_of``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.detail_text = text
