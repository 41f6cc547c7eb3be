"""Registry auth as challenge-response (the shape of ``httpx.Auth``), with cached bearer tokens.

A request first goes anonymous, or with a token cached for its scopes. A 401's
``WWW-Authenticate`` then selects ``Basic`` (credentials sent up front from then on) or
``Bearer realm,service,scope``: a token is fetched from the realm with the basic credentials (or
an identity token as an OAuth2 refresh token), its body size-capped, and cached per scope until
shortly before it expires; a second 401 on a token refreshes it. Credentials never go to a
plain-HTTP realm of a TLS registry.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from msgspec import Struct

from ...errors import RegistryAuthError, StoreError, without_secrets
from ..credentials import Credentials
from ..descriptor import parse_json
from ..reference import is_loopback
from .errors import error_for_response, translated
from .threaded import WireAnswer, with_query
from .timeouts import Timeouts

__all__ = ["Authenticator", "TokenSend", "parse_challenge"]

#: How the authenticator sends a token request: ``(method, url, headers, form body, cap)`` ->
#: the answer with at most ``cap + 1`` bytes of body (no redirects followed; network errors raise).
TokenSend = Callable[[str, str, Mapping[str, str], bytes | None, int], Awaitable[WireAnswer]]

_MAX_TOKEN_BODY = 1 << 20  # a token response is a few KiB; refuse to buffer more than 1 MiB
_TOKEN_MARGIN = 10.0  # refresh a token this many seconds before it expires
_DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default when expires_in is absent
#: Longer is taken for this long (an infinite or 400-digit expires_in overflowed the clock).
_MAX_TOKEN_LIFETIME = 86_400


def _lifetime(expires_in: Any) -> int:
    """A token's ``expires_in`` as seconds, at most :data:`_MAX_TOKEN_LIFETIME`; ValueError or
    TypeError when it is no number."""
    try:
        return min(int(expires_in), _MAX_TOKEN_LIFETIME)
    except OverflowError:  # inf (JSON 1e999, Infinity)
        return _MAX_TOKEN_LIFETIME


# A parameter (``name=value``, the value quoted or not) or, not followed by ``=``, a scheme that
# starts the next challenge (RFC 7235: one header may hold several, and repeated headers are
# read joined by ", ").
_ITEM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))|([^\s,=]+)')
#: The schemes we can answer, the most wanted first (as docker's client: a token over Basic).
_PREFERRED = ("bearer", "basic")


def _challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """Split ``Bearer realm="...",service="...", Basic realm="..."`` into
    ``[("bearer", {"realm": ..., "service": ...}), ("basic", {"realm": ...})]``."""
    found: list[tuple[str, dict[str, str]]] = []
    for m in _ITEM.finditer(header):
        if m.group(4) is not None:
            found.append((m.group(4).lower(), {}))
        elif found:
            value = m.group(2) if m.group(2) is not None else m.group(3) or ""
            found[-1][1][m.group(1).lower()] = value.replace('\\"', '"')
    return found


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """The challenge of ``header`` to answer: the most wanted scheme it offers (see
    :data:`_PREFERRED`; a bearer one only with its realm), else its first; ``("", {})`` for an
    empty header."""
    found = _challenges(header)
    for scheme in _PREFERRED:
        for challenge in found:
            if challenge[0] == scheme and (scheme != "bearer" or challenge[1].get("realm")):
                return challenge
    return found[0] if found else ("", {})


class _Token(Struct):
    value: str
    expires_at: float


def _scope_key(scopes: Iterable[str]) -> str:
    return " ".join(sorted(set(scopes)))


class Authenticator:
    """The auth state of one registry host: which scheme it wants, and the tokens fetched so far."""

    def __init__(
        self,
        host: str,
        credentials: Credentials | None,
        *,
        plain_http: bool,
        send: TokenSend,
        timeouts: Timeouts,
    ) -> None:
        self.host = host
        self.credentials = credentials
        #: Plain HTTP to the registry: a plain-HTTP token realm is acceptable then.
        self.plain_http = plain_http
        self._send = send
        self._timeouts = timeouts
        self._basic = False  # the registry asked for Basic: send it up front from now on
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}

    def header(self, scopes: list[str]) -> str | None:
        """The ``Authorization`` value to send for ``scopes`` now, if any."""
        token = self._cached_token(scopes)
        if token is not None:
            return f"Bearer {token}"
        if self._basic and self.credentials is not None and self.credentials.username:
            return self._basic_header()
        return None

    async def answer(self, challenge: str, scopes: list[str], sent: str | None, action: str) -> bool:
        """Meet a 401's ``WWW-Authenticate`` challenge; True when the request should be sent again.

        False when there is nothing (new) to offer: the caller maps the 401 to an auth error.
        """
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            creds = self.credentials
            if creds is None or not creds.username or (sent is not None and sent.startswith("Basic ")):
                return False
            self._basic = True
            return True
        if scheme == "bearer" and params.get("realm"):
            wanted = scopes or ([params["scope"]] if params.get("scope") else [])
            # A token we sent was refused (expired or revoked): fetch a fresh one.
            stale = sent if sent and sent.startswith("Bearer ") else None
            await self._fetch_token(params["realm"], params.get("service", ""), wanted, action, stale)
            return True
        return False

    def _cached_token(self, scopes: list[str]) -> str | None:
        keys = [_scope_key(scopes)]
        # A pull,push token also serves pulls of the same repository.
        if len(scopes) == 1 and scopes[0].endswith(":pull"):
            keys.append(_scope_key([scopes[0] + ",push"]))
        now = time.monotonic()
        for key in keys:
            token = self._tokens.get(key)
            if token is not None and token.expires_at > now:
                return token.value
        return None

    def _basic_header(self) -> str:
        assert self.credentials is not None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def secrets(self) -> list[str]:
        """What no message may show: the password, the identity token, the Basic header's value
        and every token fetched (a registry, or a proxy before it, may echo a request)."""
        found = [token.value for token in self._tokens.values()]
        if self.credentials is not None:
            creds = self.credentials
            found += [creds.password, creds.identity_token or "", self._basic_header().removeprefix("Basic ")]
        return [secret for secret in found if secret]

    def error(self, answer: WireAnswer, action: str, place: str = "") -> StoreError:
        """The error for ``answer`` from this registry or (``place``) its token realm: what it
        said goes in without any credential it echoes (:meth:`secrets`)."""
        return error_for_response(
            answer,
            host=self.host,
            credentials=self.credentials,
            action=action,
            secrets=self.secrets(),
            place=place,
        )

    def _check_realm(self, realm: str) -> None:
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https"):
            shown = without_secrets(realm, self.secrets())
            raise RegistryAuthError(f"registry {self.host} sent an unusable token realm {shown!r}")
        if parts.scheme == "http" and not (self.plain_http or is_loopback(parts.netloc)):
            shown = without_secrets(realm, self.secrets())
            raise RegistryAuthError(
                f"registry {self.host} wants credentials sent to a plain-HTTP realm {shown}; refusing"
            )

    def _token_request(
        self, realm: str, service: str, scopes: list[str]
    ) -> tuple[str, str, dict[str, str], bytes | None]:
        """Method, URL, headers and body of the token request (the token spec, or OAuth2 with an
        identity token as the refresh token)."""
        query = [("service", service)] if service else []
        query.extend(("scope", s) for s in scopes)
        creds = self.credentials
        if creds is not None and creds.identity_token:
            form = dict(query)
            form.update(
                grant_type="refresh_token", refresh_token=creds.identity_token, client_id="remote-cache"
            )
            form["scope"] = " ".join(scopes)
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            return "POST", realm, headers, urlencode(form).encode()
        headers = {"Authorization": self._basic_header()} if creds is not None and creds.username else {}
        return "GET", with_query(realm, query) if query else realm, headers, None

    async def _fetch_token(
        self, realm: str, service: str, scopes: list[str], action: str, stale: str | None
    ) -> None:
        key = _scope_key(scopes)
        async with self._token_locks.setdefault(key, asyncio.Lock()):
            current = self._tokens.get(key)
            if (
                current is not None
                and current.expires_at > time.monotonic()
                and stale != f"Bearer {current.value}"
            ):
                return  # another task fetched or refreshed it while we waited
            self._tokens.pop(key, None)
            self._check_realm(realm)
            method, url, headers, form = self._token_request(realm, service, scopes)
            realm_host = urlsplit(realm).netloc
            with translated(f"{self.host} (token realm {realm_host})", self._timeouts):
                answer = await self._send(method, url, headers, form, _MAX_TOKEN_BODY)
            if answer.status_code != 200:
                raise self.error(answer, action, f"the token realm {realm_host} of registry {self.host}")
            value, expires_in = self._parse_token(answer.body)
            lifetime = max(expires_in - _TOKEN_MARGIN, 1.0)
            self._tokens[key] = _Token(value, time.monotonic() + lifetime)

    def _parse_token(self, body: bytes) -> tuple[str, int]:
        if len(body) > _MAX_TOKEN_BODY:
            raise RegistryAuthError(f"the token realm of registry {self.host} sent an oversized answer")
        try:
            data: Any = parse_json(body)
            value = data.get("token") or data.get("access_token")
            expires_in = _lifetime(data.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryAuthError(f"the token realm of registry {self.host} sent no usable token") from exc
        if not isinstance(value, str) or not value:
            raise RegistryAuthError(f"the token realm of registry {self.host} sent no usable token")
        return value, expires_in
