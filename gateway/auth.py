"""JWT authentication for the sync endpoints (sync-protocol.md §6).

Keys come from three places, all optional:

* ``auth.hs256_secret``: a shared secret, used as an ``oct`` key without ``kid``
  (a wildcard key) for HS256/HS384/HS512;
* ``auth.jwks_file``: a local JWKS (``{"keys": [...]}`` or a single JWK) that may
  hold ``oct`` secrets (``k``, base64url) as well as RSA, EC and OKP public keys;
* ``auth.jwks_url``: a remote JWKS; only RSA, EC and OKP keys are taken from it,
  and a key whose ``use`` is present must say ``"sig"``.

Key selection: a token whose header ``kid`` names a configured key is checked
with that key only (a disallowed ``alg`` is refused). Otherwise every key
without ``kid`` whose type fits the algorithm is tried. When nothing verifies,
the remote JWKS is refreshed (at most once per 30 s) and the token re-checked.

Signatures are checked by pyjwt; claims are checked here so that each failure
maps to its PSYNC code: S2101 (malformed, bad signature, unknown key, missing
``sub``/``iat``/``exp``, ``parameters`` not an object), S2103 (expired), S2104
(lifetime too long), S2105 (audience), S2106 (no/invalid ``Authorization``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt
import orjson

try:
    from jwt.warnings import InsecureKeyLengthWarning as _KeyLengthWarning
except ImportError:  # pyjwt < 2.10 has no key-length warning
    _KeyLengthWarning = UserWarning  # type: ignore[misc,assignment]

from bucketsync.config import AuthSettings, ConfigError
from gateway.errors import (
    CODE_AUTH_INVALID,
    CODE_AUTH_LIFETIME,
    CODE_AUTH_MISSING,
    CODE_AUTH_WRONG_AUDIENCE,
    CODE_TOKEN_EXPIRED,
    ServiceError,
)

__all__ = [
    "JWKS_DROP_AFTER_S",
    "JWKS_MAX_AGE_S",
    "JWKS_MIN_REFRESH_INTERVAL_S",
    "SUPPORTED_ALGORITHMS",
    "AuthError",
    "TokenVerifier",
    "VerifiedToken",
    "parse_authorization",
]

log = logging.getLogger(__name__)

#: Every algorithm a token may use (``none`` never is).
SUPPORTED_ALGORITHMS: Final[frozenset[str]] = frozenset(
    {
        "HS256", "HS384", "HS512",
        "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512",
        "ES256", "ES384", "ES512",
        "EdDSA",
    }
)  # fmt: skip

_HMAC_ALGS: Final = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE: Final[dict[str, str]] = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_SIGNING_CURVES: Final = frozenset({"Ed25519", "Ed448"})
_REMOTE_KTYS: Final = frozenset({"RSA", "EC", "OKP"})
#: JWK members that hold private key material; dropped so only public keys remain.
_PRIVATE_MEMBERS: Final[dict[str, tuple[str, ...]]] = {
    "RSA": ("d", "p", "q", "dp", "dq", "qi", "oth"),
    "EC": ("d",),
    "OKP": ("d",),
}

#: Earliest re-fetch of the remote JWKS after the previous attempt (unknown-kid refreshes).
JWKS_MIN_REFRESH_INTERVAL_S: Final = 30.0
#: Age after which a remote JWKS in use is refreshed (in the background).
JWKS_MAX_AGE_S: Final = 300.0
#: Age after which remote keys without a successful refresh are no longer trusted.
JWKS_DROP_AFTER_S: Final = 3600.0
_JWKS_FETCH_TIMEOUT_S: Final = 10.0
_JWKS_MAX_BYTES: Final = 1_048_576

_EXPECTED_SCHEME = "expected 'Authorization: Token <jwt>' or 'Authorization: Bearer <jwt>'"


class AuthError(ServiceError):
    """A 401 authentication failure (``name`` ``AuthorizationError``)."""

    def __init__(self, code: str, description: str, details: Any = None) -> None:
        super().__init__(401, code, description, name="AuthorizationError", details=details)


class _NoVerifyingKey(AuthError):
    """No configured key verified the token; a JWKS refresh may help."""

    def __init__(self, description: str) -> None:
        super().__init__(CODE_AUTH_INVALID, description)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature and claims passed every check."""

    #: The ``sub`` claim as in the token (string or integer).
    sub: str | int
    #: The whole verified payload.
    payload: dict[str, Any]
    #: Expiry, seconds since the epoch (rounded down).
    exp: int
    #: Issued-at, seconds since the epoch (rounded down).
    iat: int
    #: ``kid`` of the key that verified the signature (``None`` for a key without kid).
    key_id: str | None

    @property
    def user_id_str(self) -> str:
        """``sub`` as text (used for write-checkpoint keys)."""
        return str(self.sub)

    @property
    def parameters(self) -> dict[str, Any]:
        """The legacy ``parameters`` claim (``{}`` when absent)."""
        params = self.payload.get("parameters")
        return params if isinstance(params, dict) else {}

    def expires_in(self, now: float | None = None) -> int:
        """Whole seconds until expiry, never negative (the ``token_expires_in`` value)."""
        now = time.time() if now is None else now
        return max(0, math.ceil(self.exp - now))


@dataclass(slots=True, eq=False)
class _Key:
    """One verification key (public part only, or a shared secret)."""

    kid: str | None
    kty: str
    #: The key's explicit ``alg`` (the only one it accepts), or ``None``.
    alg: str | None
    #: Public JWK members (private members removed).
    jwk: dict[str, Any]
    #: Where the key came from, for messages.
    source: str
    allowed: frozenset[str] = frozenset()
    _prepared: dict[str, jwt.PyJWK] = field(default_factory=dict)

    def accepts(self, alg: str) -> bool:
        return alg in self.allowed

    def pyjwk(self, alg: str) -> jwt.PyJWK:
        prepared = self._prepared.get(alg)
        if prepared is None:
            prepared = jwt.PyJWK(self.jwk, algorithm=alg)
            self._prepared[alg] = prepared
        return prepared


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _algorithms_for(jwk: dict[str, Any]) -> frozenset[str]:
    """Algorithms the key type allows (before an explicit ``alg`` narrows them)."""
    kty = jwk.get("kty")
    if kty == "oct":
        return _HMAC_ALGS
    if kty == "RSA":
        return _RSA_ALGS
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_ALG_BY_CURVE:
            raise ValueError(
                f"EC curve {crv!r} is not supported (use one of {', '.join(_EC_ALG_BY_CURVE)})"
            )
        return frozenset({_EC_ALG_BY_CURVE[crv]})
    if kty == "OKP":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _OKP_SIGNING_CURVES:
            raise ValueError(f"OKP curve {crv!r} is not a signing curve (use Ed25519 or Ed448)")
        return frozenset({"EdDSA"})
    raise ValueError(f"key type (kty) {kty!r} is not supported (use oct, RSA, EC or OKP)")


def _make_key(raw: Any, source: str, *, allowed_ktys: Iterable[str] | None = None) -> _Key | None:
    """Build a key from one JWK; ``None`` for a key that is not for signatures.

    Raises ``ValueError`` with a description for an unusable key.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a JWK must be a JSON object, got {type(raw).__name__}")
    kty = raw.get("kty")
    if not isinstance(kty, str):
        raise ValueError("a JWK needs a string 'kty' (oct, RSA, EC or OKP)")
    if allowed_ktys is not None and kty not in allowed_ktys:
        raise ValueError(f"key type (kty) {kty!r} is not accepted from this source")
    use = raw.get("use")
    if use is not None and use != "sig":
        return None
    kid = raw.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError(f"kid must be a string, got {type(kid).__name__}")
    allowed = _algorithms_for(raw)
    alg = raw.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in allowed:
            raise ValueError(
                f"alg {alg!r} does not fit a {kty} key (allowed: {', '.join(sorted(allowed))})"
            )
        allowed = frozenset({alg})
    public = {k: v for k, v in raw.items() if k not in _PRIVATE_MEMBERS.get(kty, ())}
    key = _Key(kid=kid, kty=kty, alg=alg, jwk=public, source=source, allowed=allowed)
    _check_key_material(key)
    return key


def _check_key_material(key: _Key) -> None:
    """Load the key now so a broken key is reported once, up front (``ValueError``)."""
    try:
        prepared = key.pyjwk(min(key.allowed))
        prepared.Algorithm.prepare_key(prepared.key)
    except jwt.PyJWTError as exc:
        raise ValueError(f"key material is invalid: {exc}") from exc
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"key material is invalid: {exc!r}") from exc


def _jwk_list(doc: Any) -> list[Any]:
    if isinstance(doc, dict) and "keys" in doc:
        keys = doc["keys"]
        if not isinstance(keys, list):
            raise ValueError("'keys' must be a JSON array")
        return keys
    if isinstance(doc, dict) and "kty" in doc:
        return [doc]
    raise ValueError('expected a JWKS object {"keys": [...]} or a single JWK')


def _fmt_time(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} (epoch seconds)"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_authorization(header: str | None) -> str:
    """The JWT from an ``Authorization`` header value ``Token <jwt>`` or ``Bearer <jwt>``.

    The scheme is case-insensitive. Raises :class:`AuthError` ``PSYNC_S2106`` otherwise.
    """
    if header is None or not header.strip():
        raise AuthError(CODE_AUTH_MISSING, f"missing Authorization header; {_EXPECTED_SCHEME}")
    scheme, _, rest = header.strip().partition(" ")
    token = rest.strip()
    if scheme.lower() not in ("token", "bearer"):
        shown = scheme if len(scheme) <= 20 and scheme.isprintable() else scheme[:20] + "..."
        raise AuthError(
            CODE_AUTH_MISSING,
            f"Authorization header uses scheme {shown!r}; {_EXPECTED_SCHEME}",
        )
    if not token or " " in token:
        raise AuthError(
            CODE_AUTH_MISSING,
            f"Authorization header has no single token after {scheme!r}; {_EXPECTED_SCHEME}",
        )
    return token


def refuse_unusable_auth(auth: AuthSettings) -> None:
    """A gateway whose settings can accept no token at all is refused at start (it would run
    and answer every client 401): no key source, or no audience."""
    if not (auth.hs256_secret or auth.jwks_file or auth.jwks_url):
        raise ConfigError(
            "no token verification key: set auth.hs256_secret, auth.jwks_file or auth.jwks_url"
        )
    if not auth.audience:
        raise ConfigError("auth.audience is empty: every token would be refused")


class TokenVerifier:
    """Verifies client JWTs against the configured keys and claim rules.

    ``base_dir`` resolves a relative ``auth.jwks_file`` (default: the working
    directory). ``clock`` (wall time, for claims) and ``monotonic`` (for JWKS
    refresh timing) exist for tests. Problems with the local configuration
    (unreadable JWKS file, invalid key) raise :class:`ConfigError` at construction.

    Use one verifier per event loop; call :meth:`aclose` at shutdown to cancel a
    background JWKS refresh.
    """

    def __init__(
        self,
        auth: AuthSettings,
        *,
        base_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audience = frozenset(auth.audience)
        self._audience_text = ", ".join(repr(a) for a in auth.audience)
        self._max_lifetime_s = auth.max_lifetime_s
        self._leeway_s = auth.leeway_s
        self._clock = clock
        self._monotonic = monotonic
        self._local_keys: list[_Key] = []
        if auth.hs256_secret:
            secret = auth.hs256_secret.encode("utf-8")
            key = _Key(
                kid=None,
                kty="oct",
                alg=None,
                jwk={"kty": "oct", "k": _b64url(secret)},
                source="auth.hs256_secret",
                allowed=_HMAC_ALGS,
            )
            try:
                _check_key_material(key)
            except ValueError as exc:
                raise ConfigError(f"auth.hs256_secret cannot be used: {exc}") from None
            if len(secret) < 32:
                log.warning(
                    "auth.hs256_secret is %d bytes; use at least 32 random bytes in production",
                    len(secret),
                )
            self._local_keys.append(key)
        if auth.jwks_file:
            self._local_keys.extend(self._load_jwks_file(auth.jwks_file, base_dir))

        self._jwks_url = auth.jwks_url or None
        if self._jwks_url is not None and not self._jwks_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"auth.jwks_url must be an http:// or https:// URL, got {self._jwks_url!r}"
            )
        self._remote_keys: list[_Key] = []
        self._remote_ok_at: float | None = None  # monotonic time of the last successful fetch
        self._remote_tried_at: float | None = None  # monotonic time of the last attempt
        self._remote_error: str | None = None
        self._refresh_task: asyncio.Task[bool] | None = None
        #: token text -> (the key that verified it, its payload); LRU, auth.token_cache_entries
        self._cache_max = auth.token_cache_entries
        self._cache: OrderedDict[str, tuple[_Key, dict[str, Any]]] = OrderedDict()

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _load_jwks_file(jwks_file: str, base_dir: Path | None) -> list[_Key]:
        path = Path(jwks_file).expanduser()
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"auth.jwks_file {path} not found") from None
        except OSError as exc:
            raise ConfigError(f"auth.jwks_file {path} cannot be read: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"auth.jwks_file {path} is not valid JSON: {exc}") from None
        try:
            raws = _jwk_list(doc)
        except ValueError as exc:
            raise ConfigError(f"auth.jwks_file {path}: {exc}") from None
        keys: list[_Key] = []
        seen: set[str] = set()
        for i, raw in enumerate(raws):
            label = f"key #{i}" + (
                f" (kid {raw['kid']!r})" if isinstance(raw, dict) and "kid" in raw else ""
            )
            try:
                key = _make_key(raw, f"auth.jwks_file {path}")
            except ValueError as exc:
                raise ConfigError(f"auth.jwks_file {path}, {label}: {exc}") from None
            if key is None:
                log.warning("auth.jwks_file %s, %s: skipped (use is not 'sig')", path, label)
                continue
            if key.kid is not None:
                if key.kid in seen:
                    raise ConfigError(f"auth.jwks_file {path}: kid {key.kid!r} appears twice")
                seen.add(key.kid)
            keys.append(key)
        if not keys:
            log.warning("auth.jwks_file %s holds no usable signing key", path)
        return keys

    def _remote_usable(self) -> list[_Key]:
        if not self._remote_keys or self._remote_ok_at is None:
            return []
        if self._monotonic() - self._remote_ok_at > JWKS_DROP_AFTER_S:
            log.warning(
                "dropping keys from auth.jwks_url %s: no successful refresh for over %d s (%s)",
                self._jwks_url,
                int(JWKS_DROP_AFTER_S),
                self._remote_error or "no error recorded",
            )
            self._remote_keys = []
            return []
        return self._remote_keys

    def _all_keys(self) -> list[_Key]:
        return [*self._local_keys, *self._remote_usable()]

    @property
    def key_count(self) -> int:
        """How many keys are currently usable (local plus fetched)."""
        return len(self._all_keys())

    # --------------------------------------------------------------- JWKS URL

    async def refresh_jwks(self) -> bool:
        """Fetch ``auth.jwks_url`` now (no rate limit); ``True`` on success.

        Concurrent callers share one fetch. Without a JWKS URL this is a no-op
        returning ``True``. On failure the previous keys stay in use.
        """
        if self._jwks_url is None:
            return True
        task = self._refresh_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch_jwks(self._jwks_url))
            self._refresh_task = task
        return await asyncio.shield(task)

    async def _refresh_if_allowed(self) -> bool:
        """Refresh unless the last attempt is under 30 s old.

        ``True`` when a fetch (this one or one already in flight) succeeded, so a
        failed verification is worth retrying.
        """
        if self._jwks_url is None:
            return False
        task = self._refresh_task
        if task is not None and not task.done():
            return await asyncio.shield(task)
        tried = self._remote_tried_at
        if tried is not None and self._monotonic() - tried < JWKS_MIN_REFRESH_INTERVAL_S:
            return False
        return await self.refresh_jwks()

    async def _ensure_remote(self) -> None:
        """Fetch before first use; refresh in the background when older than 5 minutes."""
        if self._jwks_url is None:
            return
        if self._remote_ok_at is None:
            await self._refresh_if_allowed()
            return
        now = self._monotonic()
        if now - self._remote_ok_at <= JWKS_MAX_AGE_S:
            return
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        if (
            self._remote_tried_at is not None
            and now - self._remote_tried_at < JWKS_MIN_REFRESH_INTERVAL_S
        ):
            return
        if not self._remote_usable():
            await self._refresh_if_allowed()
            return
        self._refresh_task = asyncio.get_running_loop().create_task(
            self._fetch_jwks(self._jwks_url)
        )

    async def _fetch_jwks(self, url: str) -> bool:
        self._remote_tried_at = self._monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=_JWKS_FETCH_TIMEOUT_S)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, headers={"Accept": "application/json"}) as resp,
            ):
                if resp.status != 200:
                    raise ValueError(f"HTTP status {resp.status}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(65_536):
                    size += len(chunk)
                    if size > _JWKS_MAX_BYTES:
                        raise ValueError(f"response larger than {_JWKS_MAX_BYTES} bytes")
                    chunks.append(chunk)
            body = b"".join(chunks)
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"response is not JSON: {exc}") from None
            if not (isinstance(doc, dict) and isinstance(doc.get("keys"), list)):
                raise ValueError('response is not a JWKS object {"keys": [...]}')
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._remote_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("fetching auth.jwks_url %s failed: %s", url, self._remote_error)
            return False
        except Exception as exc:
            self._remote_error = f"{type(exc).__name__}: {exc}"
            log.exception("fetching auth.jwks_url %s failed unexpectedly", url)
            return False
        keys: list[_Key] = []
        for i, raw in enumerate(doc["keys"]):
            kid = raw.get("kid") if isinstance(raw, dict) else None
            label = f"key #{i}" + (f" (kid {kid!r})" if kid is not None else "")
            try:
                key = _make_key(raw, f"auth.jwks_url {url}", allowed_ktys=_REMOTE_KTYS)
            except ValueError as exc:
                log.warning("auth.jwks_url %s, %s skipped: %s", url, label, exc)
                continue
            if key is None:
                log.info("auth.jwks_url %s, %s skipped: use is not 'sig'", url, label)
                continue
            keys.append(key)
        if not keys:
            log.warning("auth.jwks_url %s holds no usable signing key", url)
        self._remote_keys = keys
        self._remote_ok_at = self._monotonic()
        self._remote_error = None
        log.debug("loaded %d key(s) from auth.jwks_url %s", len(keys), url)
        return True

    async def aclose(self) -> None:
        """Cancel a JWKS fetch still running in the background."""
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------- verification

    async def verify_header(self, header: str | None) -> VerifiedToken:
        """Verify the JWT of an ``Authorization`` header (``Token``/``Bearer`` scheme)."""
        return await self.verify(parse_authorization(header))

    async def verify(self, token: str) -> VerifiedToken:
        """Verify ``token``; raises :class:`AuthError` (a :class:`ServiceError`) on failure."""
        await self._ensure_remote()
        try:
            return self._verify(token)
        except _NoVerifyingKey:
            if not await self._refresh_if_allowed():
                raise
        return self._verify(token)

    def verify_sync(self, token: str) -> VerifiedToken:
        """Like :meth:`verify` without network access: remote keys as last fetched."""
        return self._verify(token)

    def _verify(self, token: str) -> VerifiedToken:
        cache = self._cache
        hit = cache.get(token)
        if hit is not None:
            key, payload = hit
            if any(k is key for k in self._all_keys()):
                cache.move_to_end(token)
                try:
                    return self._check_claims(payload, key)  # the clock moved: check again
                except AuthError:
                    del cache[token]
                    raise
            del cache[token]  # its key is gone (rotated, JWKS dropped): verify afresh
        alg, kid = self._read_header(token)
        payload, key = self._check_signature(token, alg, kid)
        verified = self._check_claims(payload, key)
        if self._cache_max:
            cache[token] = (key, payload)
            if len(cache) > self._cache_max:
                cache.popitem(last=False)
        return verified

    def _read_header(self, token: str) -> tuple[str, str | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(CODE_AUTH_INVALID, f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError(CODE_AUTH_INVALID, "malformed token: header has no 'alg'")
        if alg.lower() == "none":
            raise AuthError(CODE_AUTH_INVALID, "unsigned tokens (alg 'none') are not accepted")
        if alg not in SUPPORTED_ALGORITHMS:
            raise AuthError(
                CODE_AUTH_INVALID,
                f"algorithm {alg[:20]!r} is not accepted "
                f"(accepted: {', '.join(sorted(SUPPORTED_ALGORITHMS))})",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(CODE_AUTH_INVALID, "malformed token: header 'kid' is not a string")
        return alg, kid

    def _check_signature(
        self, token: str, alg: str, kid: str | None
    ) -> tuple[dict[str, Any], _Key]:
        keys = self._all_keys()
        candidates: Sequence[_Key]
        if kid is not None and (named := [k for k in keys if k.kid == kid]):
            candidates = [k for k in named if k.accepts(alg)]
            if not candidates:
                accepted = sorted({a for k in named for a in k.allowed})
                raise AuthError(
                    CODE_AUTH_INVALID,
                    f"key {kid!r} does not accept algorithm {alg} (it accepts {', '.join(accepted)})",
                )
            kid_matched = True
        else:
            candidates = [k for k in keys if k.kid is None and k.accepts(alg)]
            kid_matched = False
            if not candidates:
                what = f"no key has kid {kid!r}" if kid is not None else "the token has no kid"
                raise _NoVerifyingKey(
                    f"{what} and no key without kid accepts algorithm {alg}{self._remote_note()}"
                )
        for key in candidates:
            try:
                with warnings.catch_warnings():
                    # short shared secrets are the operator's choice (warned at start-up)
                    warnings.simplefilter("ignore", _KeyLengthWarning)
                    payload = jwt.decode(
                        token,
                        key=key.pyjwk(alg),
                        algorithms=[alg],
                        options={
                            "verify_signature": True,
                            "verify_exp": False,
                            "verify_nbf": False,
                            "verify_iat": False,
                            "verify_aud": False,
                            "verify_iss": False,
                            "verify_sub": False,
                            "verify_jti": False,
                            "require": [],
                        },
                    )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise AuthError(CODE_AUTH_INVALID, f"malformed token: {exc}") from None
            return payload, key
        if kid_matched:
            raise AuthError(CODE_AUTH_INVALID, f"signature does not verify with key {kid!r}")
        n = len(candidates)
        scope = f"the {n} keys without kid" if n > 1 else "the key without kid"
        what = f"no key has kid {kid!r}; " if kid is not None else ""
        raise _NoVerifyingKey(
            f"{what}signature does not verify with {scope} that accept{'' if n > 1 else 's'} "
            f"algorithm {alg}{self._remote_note()}"
        )

    def _remote_note(self) -> str:
        if self._jwks_url is not None and self._remote_error is not None:
            return f" (the JWKS at auth.jwks_url could not be fetched: {self._remote_error})"
        return ""

    def _check_claims(self, payload: dict[str, Any], key: _Key) -> VerifiedToken:
        invalid = CODE_AUTH_INVALID
        if "sub" not in payload:
            raise AuthError(invalid, "token has no 'sub' claim (the user id)")
        sub = payload["sub"]
        if isinstance(sub, bool) or not isinstance(sub, str | int):
            raise AuthError(
                invalid, f"'sub' claim must be a string or integer, got {type(sub).__name__}"
            )
        if sub == "":
            raise AuthError(invalid, "'sub' claim is empty")
        for claim in ("iat", "exp"):
            if claim not in payload:
                raise AuthError(invalid, f"token has no {claim!r} claim")
            if not _is_number(payload[claim]):
                raise AuthError(invalid, f"{claim!r} claim must be a number (epoch seconds)")
        iat: float = payload["iat"]
        exp: float = payload["exp"]
        params = payload.get("parameters", {})
        if not isinstance(params, dict):
            raise AuthError(
                invalid, f"'parameters' claim must be a JSON object, got {type(params).__name__}"
            )

        now = self._clock()
        leeway = self._leeway_s
        if now >= exp + leeway:
            raise AuthError(
                CODE_TOKEN_EXPIRED, f"token expired at {_fmt_time(exp)} ({leeway} s leeway)"
            )
        if iat > now + leeway:
            raise AuthError(
                invalid, f"token is issued in the future: iat {_fmt_time(iat)} ({leeway} s leeway)"
            )
        if "nbf" in payload:
            nbf = payload["nbf"]
            if not _is_number(nbf):
                raise AuthError(invalid, "'nbf' claim must be a number (epoch seconds)")
            if nbf > now + leeway:
                raise AuthError(
                    invalid, f"token is not valid before {_fmt_time(nbf)} ({leeway} s leeway)"
                )
        lifetime = exp - iat
        if lifetime > self._max_lifetime_s:
            raise AuthError(
                CODE_AUTH_LIFETIME,
                f"token lifetime (exp - iat) is {lifetime:g} s; at most {self._max_lifetime_s} s "
                "is allowed",
            )
        self._check_audience(payload)
        return VerifiedToken(
            sub=sub,
            payload=payload,
            exp=math.floor(exp),
            iat=math.floor(iat),
            key_id=key.kid,
        )

    def _check_audience(self, payload: dict[str, Any]) -> None:
        code = CODE_AUTH_WRONG_AUDIENCE
        if not self._audience:
            raise AuthError(
                code, "no audience is configured (auth.audience); every token is refused"
            )
        if "aud" not in payload:
            raise AuthError(
                code, f"token has no 'aud' claim; expected one of: {self._audience_text}"
            )
        aud = payload["aud"]
        values = aud if isinstance(aud, list) else [aud]
        if not values or not all(isinstance(v, str) for v in values):
            raise AuthError(code, "'aud' claim must be a string or a list of strings")
        if not self._audience.intersection(values):
            shown = ", ".join(repr(v[:100]) for v in values[:5]) + (
                ", ..." if len(values) > 5 else ""
            )
            raise AuthError(
                code,
                f"token audience {shown} is not allowed; expected one of: {self._audience_text}",
            )
