"""JWT authentication (sync-protocol.md §2.1 auth rows, §6): gateway/auth.py, gateway/errors.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from bucketsync.config import AuthSettings, ConfigError
from gateway.auth import (
    JWKS_MAX_AGE_S,
    AuthError,
    TokenVerifier,
    VerifiedToken,
    parse_authorization,
)
from gateway.errors import ServiceError

SECRET = "a-test-secret-that-is-long-enough-for-hs512-" + "x" * 24
AUD = "bucketsync"


# ------------------------------------------------------------------ helpers


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + 3600, "aud": AUD}
    for name, value in overrides.items():
        if value is ...:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def hs_token(
    payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256", **headers: Any
) -> str:
    return jwt.encode(payload, secret, algorithm=alg, headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def auth_settings(**kw: Any) -> AuthSettings:
    values: dict[str, Any] = {"audience": [AUD], "hs256_secret": SECRET}
    values.update(kw)
    return AuthSettings(**values)


def verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier(auth_settings(**kw))


async def expect(v: TokenVerifier, token: str, code: str, fragment: str = "") -> AuthError:
    with pytest.raises(AuthError) as info:
        await v.verify(token)
    err = info.value
    assert err.code == code, err.description
    assert err.status == 401
    assert fragment.lower() in err.description.lower(), err.description
    return err


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private: Any, **members: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.update(members)
    return jwk


def write_jwks(tmp_path: Path, keys: list[dict[str, Any]], name: str = "jwks.json") -> str:
    (tmp_path / name).write_text(json.dumps({"keys": keys}))
    return name


def file_verifier(tmp_path: Path, keys: list[dict[str, Any]], **kw: Any) -> TokenVerifier:
    kw.setdefault("hs256_secret", None)
    return TokenVerifier(
        auth_settings(jwks_file=write_jwks(tmp_path, keys), **kw), base_dir=tmp_path
    )


# --------------------------------------------------------- S2106 header


@pytest.mark.parametrize("header", [None, "", "   "])
async def test_missing_authorization_header_is_s2106(header: str | None) -> None:
    with pytest.raises(AuthError) as info:
        await verifier().verify_header(header)
    assert info.value.code == "PSYNC_S2106"
    assert "missing Authorization header" in info.value.description


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "JWT abc.def.ghi", "abc.def.ghi", "Token", "Bearer  "]
)
async def test_wrong_authorization_scheme_is_s2106(header: str) -> None:
    with pytest.raises(AuthError) as info:
        await verifier().verify_header(header)
    assert info.value.code == "PSYNC_S2106"
    assert "Token <jwt>" in info.value.description


@pytest.mark.parametrize("scheme", ["Token", "Bearer", "token", "BEARER"])
async def test_token_and_bearer_schemes_accepted_case_insensitively(scheme: str) -> None:
    token = hs_token(claims())
    result = await verifier().verify_header(f"{scheme} {token}")
    assert result.sub == "user-1"
    assert parse_authorization(f"  {scheme}   {token} ") == token


# ------------------------------------------------------------- S2101


async def test_bad_signature_is_s2101() -> None:
    token = hs_token(claims(), secret="another-secret-that-is-also-32-bytes-long")
    await expect(verifier(), token, "PSYNC_S2101", "signature does not verify")


async def test_tampered_payload_is_s2101() -> None:
    header, _, sig = hs_token(claims()).split(".")
    forged = b64(orjson.dumps(claims(sub="admin")))
    await expect(verifier(), f"{header}.{forged}.{sig}", "PSYNC_S2101", "signature")


async def test_unknown_kid_is_s2101(tmp_path: Path) -> None:
    known, other = rsa_key(), rsa_key()
    v = file_verifier(tmp_path, [public_jwk(known, kid="k1")])
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "k2"})
    await expect(v, token, "PSYNC_S2101", "no key has kid 'k2'")


async def test_kid_less_token_without_wildcard_key_is_s2101(tmp_path: Path) -> None:
    key = rsa_key()
    v = file_verifier(tmp_path, [public_jwk(key, kid="k1")])
    token = jwt.encode(claims(), key, algorithm="RS256")
    await expect(v, token, "PSYNC_S2101", "the token has no kid")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "abc.def.ghi",
        "",
        b64(b'{"alg":"HS256"}') + "." + b64(b"not json") + ".",
        b64(b"[1,2]") + "." + b64(b"{}") + "." + b64(b"sig"),
    ],
)
async def test_malformed_token_is_s2101(token: str) -> None:
    await expect(verifier(), token, "PSYNC_S2101")


async def test_payload_not_json_object_is_s2101() -> None:
    # correctly signed, but the payload is a JSON array
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(b"[1,2,3]")
    sig = jwt.api_jws.PyJWS().encode(b"[1,2,3]", SECRET, algorithm="HS256").split(".")[2]
    await expect(verifier(), f"{header}.{body}.{sig}", "PSYNC_S2101", "malformed")


@pytest.mark.parametrize("claim", ["sub", "iat", "exp"])
async def test_missing_required_claim_is_s2101(claim: str) -> None:
    token = hs_token(claims(**{claim: ...}))
    await expect(verifier(), token, "PSYNC_S2101", f"no '{claim}' claim")


@pytest.mark.parametrize(
    ("claim", "value"),
    [("sub", None), ("sub", True), ("sub", ["a"]), ("sub", ""), ("iat", "now"), ("exp", "later")],
)
async def test_invalid_required_claim_is_s2101(claim: str, value: Any) -> None:
    token = hs_token(claims(**{claim: value}))
    await expect(verifier(), token, "PSYNC_S2101", f"'{claim}' claim")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_s2101(alg: str) -> None:
    header = b64(orjson.dumps({"alg": alg, "typ": "JWT"}))
    body = b64(orjson.dumps(claims()))
    await expect(verifier(), f"{header}.{body}.", "PSYNC_S2101", "alg 'none'")


async def test_unsupported_alg_is_s2101() -> None:
    header = b64(orjson.dumps({"alg": "ES256K", "typ": "JWT"}))
    body = b64(orjson.dumps(claims()))
    await expect(verifier(), f"{header}.{body}.{b64(b'x')}", "PSYNC_S2101", "not accepted")


@pytest.mark.parametrize("params", [[1, 2], "text", 5, None])
async def test_parameters_claim_not_an_object_is_s2101(params: Any) -> None:
    token = hs_token(claims(parameters=params))
    await expect(verifier(), token, "PSYNC_S2101", "'parameters' claim must be a JSON object")


async def test_parameters_object_is_accepted() -> None:
    result = await verifier().verify(hs_token(claims(parameters={"team": "t1"})))
    assert result.parameters == {"team": "t1"}


async def test_disallowed_alg_for_key_with_explicit_alg_is_s2101(tmp_path: Path) -> None:
    key = rsa_key()
    v = file_verifier(tmp_path, [public_jwk(key, kid="k1", alg="RS256")])
    ok = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
    assert (await v.verify(ok)).key_id == "k1"
    wrong = jwt.encode(claims(), key, algorithm="RS384", headers={"kid": "k1"})
    await expect(v, wrong, "PSYNC_S2101", "does not accept algorithm RS384")


async def test_hmac_token_naming_an_rsa_key_is_s2101(tmp_path: Path) -> None:
    # classic alg confusion: HS256 "signed" with the RSA public key's JWK text
    key = rsa_key()
    jwk = public_jwk(key, kid="k1")
    v = file_verifier(tmp_path, [jwk])
    signing_input = (
        f"{b64(orjson.dumps({'alg': 'HS256', 'kid': 'k1'}))}.{b64(orjson.dumps(claims()))}"
    )
    mac = hmac.new(json.dumps(jwk).encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    await expect(v, token, "PSYNC_S2101", "does not accept algorithm HS256")


async def test_rsa_token_against_hmac_only_config_is_s2101() -> None:
    token = jwt.encode(claims(), rsa_key(), algorithm="RS256")
    await expect(verifier(), token, "PSYNC_S2101", "no key without kid accepts algorithm RS256")


async def test_issued_in_the_future_is_s2101() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now + 600, exp=now + 1200))
    await expect(verifier(), token, "PSYNC_S2101", "issued in the future")


async def test_not_before_in_the_future_is_s2101() -> None:
    token = hs_token(claims(nbf=int(time.time()) + 600))
    await expect(verifier(), token, "PSYNC_S2101", "not valid before")


# ------------------------------------------------------------- S2103


async def test_expired_beyond_leeway_is_s2103() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now - 3600, exp=now - 61))
    err = await expect(verifier(), token, "PSYNC_S2103", "token expired at")
    assert "(60 s leeway)" in err.description


async def test_expiry_message_names_the_time() -> None:
    clock = FakeClock(1_795_669_200 + 3600)  # 2026-11-26T05:00:00Z + 1 h
    v = TokenVerifier(auth_settings(), clock=clock)
    token = hs_token(claims(iat=1_795_669_200 - 600, exp=1_795_669_200))
    err = await expect(v, token, "PSYNC_S2103")
    assert err.description == "token expired at 2026-11-26T05:00:00Z (60 s leeway)"


async def test_expired_within_leeway_is_accepted() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now - 3600, exp=now - 30))
    result = await verifier().verify(token)
    assert result.exp == now - 30
    assert result.expires_in() == 0


async def test_leeway_is_configurable() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now - 3600, exp=now - 30))
    await expect(verifier(leeway_s=0), token, "PSYNC_S2103", "(0 s leeway)")


# ------------------------------------------------------------- S2104


async def test_lifetime_too_long_is_s2104() -> None:
    now = int(time.time())
    token = hs_token(claims(iat=now, exp=now + 86_401))
    await expect(verifier(), token, "PSYNC_S2104", "86401 s; at most 86400 s")


async def test_lifetime_at_the_limit_is_accepted() -> None:
    now = int(time.time())
    assert await verifier().verify(hs_token(claims(iat=now, exp=now + 86_400)))
    await expect(
        verifier(max_lifetime_s=600), hs_token(claims(iat=now, exp=now + 601)), "PSYNC_S2104"
    )


# ------------------------------------------------------------- S2105


async def test_missing_aud_is_s2105() -> None:
    await expect(verifier(), hs_token(claims(aud=...)), "PSYNC_S2105", "no 'aud' claim")


async def test_wrong_aud_is_s2105() -> None:
    err = await expect(verifier(), hs_token(claims(aud="other")), "PSYNC_S2105", "'other'")
    assert "expected one of: 'bucketsync'" in err.description


async def test_aud_list_without_match_is_s2105() -> None:
    await expect(verifier(), hs_token(claims(aud=["a", "b"])), "PSYNC_S2105", "not allowed")


@pytest.mark.parametrize("aud", [123, [], [AUD, 5]])
async def test_invalid_aud_type_is_s2105(aud: Any) -> None:
    await expect(verifier(), hs_token(claims(aud=aud)), "PSYNC_S2105")


async def test_aud_list_with_one_match_is_accepted() -> None:
    v = verifier(audience=["app", "bucketsync"])
    assert (await v.verify(hs_token(claims(aud=["other", "app"])))).sub == "user-1"
    assert (await v.verify(hs_token(claims(aud="bucketsync")))).sub == "user-1"


async def test_no_audience_configured_rejects_everything() -> None:
    await expect(
        verifier(audience=[]), hs_token(claims()), "PSYNC_S2105", "no audience is configured"
    )


# ------------------------------------------------------- success paths


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hs_secret_success(alg: str) -> None:
    payload = claims(sub=42, parameters={"a": 1}, extra=True)
    result = await verifier().verify(hs_token(payload, alg=alg, kid="whatever"))
    assert isinstance(result, VerifiedToken)
    assert result.sub == 42
    assert result.user_id_str == "42"
    assert result.payload["extra"] is True
    assert result.exp == payload["exp"] and result.iat == payload["iat"]
    assert result.key_id is None
    assert 3590 <= result.expires_in() <= 3600


async def test_no_hs_secret_means_no_hmac() -> None:
    v = verifier(hs256_secret=None)
    await expect(v, hs_token(claims()), "PSYNC_S2101", "no key without kid accepts algorithm HS256")


@pytest.mark.parametrize(
    ("make_key", "alg"),
    [
        (rsa_key, "RS256"),
        (rsa_key, "RS512"),
        (rsa_key, "PS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
        (ed448.Ed448PrivateKey.generate, "EdDSA"),
    ],
)
async def test_asymmetric_keys_from_jwks_file(tmp_path: Path, make_key: Any, alg: str) -> None:
    key = make_key()
    decoy = rsa_key()
    v = file_verifier(tmp_path, [public_jwk(decoy, kid="decoy"), public_jwk(key, kid="k1")])
    token = jwt.encode(claims(sub="u-9"), key, algorithm=alg, headers={"kid": "k1"})
    result = await v.verify(token)
    assert result.sub == "u-9"
    assert result.key_id == "k1"
    # and a key without kid is a wildcard for tokens without (or with an unknown) kid
    v2 = file_verifier(tmp_path, [public_jwk(decoy, kid="decoy"), public_jwk(key)])
    for headers in (None, {"kid": "unknown"}):
        token = jwt.encode(claims(), key, algorithm=alg, headers=headers)
        assert (await v2.verify(token)).key_id is None


async def test_rs256_es256_eddsa_side_by_side(tmp_path: Path) -> None:
    keys: dict[str, Any] = {
        "rsa": rsa_key(),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }
    v = file_verifier(tmp_path, [public_jwk(k, kid=kid) for kid, k in keys.items()])
    for kid, alg in (("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")):
        token = jwt.encode(claims(sub=kid), keys[kid], algorithm=alg, headers={"kid": kid})
        assert (await v.verify(token)).sub == kid
    # a token naming one key but signed by another fails
    forged = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "ec"})
    await expect(v, forged, "PSYNC_S2101", "does not accept algorithm RS256")


async def test_ec_key_accepts_only_its_curve_algorithm(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    v = file_verifier(tmp_path, [public_jwk(key, kid="k1")])
    header = b64(orjson.dumps({"alg": "ES384", "kid": "k1"}))
    await expect(v, f"{header}.{b64(orjson.dumps(claims()))}.{b64(b'x')}", "PSYNC_S2101", "ES384")


async def test_oct_key_in_jwks_file(tmp_path: Path) -> None:
    secret = b"file-secret-long-enough-for-hs512-" + b"y" * 32
    v = file_verifier(tmp_path, [{"kty": "oct", "kid": "s1", "k": b64(secret), "alg": "HS512"}])
    token = jwt.encode(claims(), secret, algorithm="HS512", headers={"kid": "s1"})
    assert (await v.verify(token)).key_id == "s1"
    token = jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "s1"})
    await expect(v, token, "PSYNC_S2101", "does not accept algorithm HS256")


async def test_private_members_in_jwks_file_are_ignored(tmp_path: Path) -> None:
    key = rsa_key()
    private_jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    private_jwk["kid"] = "k1"
    v = file_verifier(tmp_path, [private_jwk])
    token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
    assert (await v.verify(token)).key_id == "k1"


async def test_jwks_file_single_jwk_and_absolute_path(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "one.json"
    path.write_text(json.dumps(public_jwk(key, kid="e1")))
    v = TokenVerifier(auth_settings(jwks_file=str(path)))
    token = jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": "e1"})
    assert (await v.verify(token)).key_id == "e1"
    # the HS secret keeps working next to the file keys
    assert (await v.verify(hs_token(claims()))).key_id is None


def test_verify_sync() -> None:
    v = verifier()
    assert v.verify_sync(hs_token(claims(sub="s"))).sub == "s"
    with pytest.raises(AuthError) as info:
        v.verify_sync(hs_token(claims(aud="nope")))
    assert info.value.code == "PSYNC_S2105"


# --------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "not found"),
        ("{", "not valid JSON"),
        ('{"keys": 5}', "'keys' must be a JSON array"),
        ('{"keys": [{"kty": "XYZ"}]}', "not supported"),
        ('{"keys": [{"kty": "RSA", "n": "AQAB"}]}', "key material is invalid"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "RS256"}]}', "does not fit"),
        ('{"keys": [{"kty": "OKP", "crv": "X25519", "x": "AAAA"}]}', "not a signing curve"),
        (
            '{"keys": [{"kty": "oct", "k": "YQ", "kid": "a"}, {"kty": "oct", "k": "Yg", "kid": "a"}]}',
            "appears twice",
        ),
    ],
)
def test_bad_jwks_file_is_a_config_error(
    tmp_path: Path, content: str | None, fragment: str
) -> None:
    if content is not None:
        (tmp_path / "jwks.json").write_text(content)
    with pytest.raises(ConfigError) as info:
        TokenVerifier(auth_settings(jwks_file="jwks.json"), base_dir=tmp_path)
    assert fragment in str(info.value)
    assert "auth.jwks_file" in str(info.value)


def test_enc_keys_in_jwks_file_are_skipped(tmp_path: Path) -> None:
    v = file_verifier(
        tmp_path,
        [public_jwk(rsa_key(), kid="enc", use="enc"), public_jwk(rsa_key(), kid="sig", use="sig")],
    )
    assert v.key_count == 1


def test_jwks_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwks_url"):
        verifier(jwks_url="file:///etc/jwks.json")


# ---------------------------------------------------------- error bodies


async def test_auth_error_json_body_and_response() -> None:
    with pytest.raises(ServiceError) as info:
        await verifier().verify_header(None)
    err = info.value
    assert err.to_json() == {
        "error": {
            "name": "AuthorizationError",
            "code": "PSYNC_S2106",
            "status": 401,
            "description": err.description,
        }
    }
    resp = err.http_response()
    assert resp.status == 401
    assert resp.content_type == "application/json"
    assert isinstance(resp.body, bytes)
    assert orjson.loads(resp.body) == err.to_json()


def test_service_error_shape() -> None:
    err = ServiceError(400, "PSYNC_S2001", "body fails validation", details={"field": "buckets"})
    assert err.to_json() == {
        "error": {
            "name": "ValidationError",
            "code": "PSYNC_S2001",
            "status": 400,
            "description": "body fails validation",
            "details": {"field": "buckets"},
        }
    }
    assert ServiceError(503, "PSYNC_S2003", "shutting down").name == "ServiceError"
    assert ServiceError(404, "PSYNC_S2002", "no route", name="Custom").name == "Custom"
    assert str(err) == "[PSYNC_S2001] body fails validation"
    resp = ServiceError(500, "PSYNC_S2302", "x", details=object()).http_response(
        headers={"X-A": "1"}
    )
    assert resp.status == 500 and resp.headers["X-A"] == "1"
    assert resp.content_type == "application/json"


# ------------------------------------------------------------ JWKS URL


class JwksServer:
    def __init__(self) -> None:
        self.doc: Any = {"keys": []}
        self.status = 200
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response(self.doc, status=self.status)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    try:
        yield server
    finally:
        await runner.cleanup()


def url_verifier(server: JwksServer, mono: FakeClock) -> TokenVerifier:
    return TokenVerifier(auth_settings(hs256_secret=None, jwks_url=server.url), monotonic=mono)


async def test_jwks_url_success_and_refresh_on_unknown_kid(jwks_server: JwksServer) -> None:
    k1, k2 = rsa_key(), ec.generate_private_key(ec.SECP256R1())
    jwks_server.doc = {"keys": [public_jwk(k1, kid="k1", use="sig", alg="RS256")]}
    mono = FakeClock()
    v = url_verifier(jwks_server, mono)
    try:
        t1 = jwt.encode(claims(), k1, algorithm="RS256", headers={"kid": "k1"})
        assert (await v.verify(t1)).key_id == "k1"
        assert jwks_server.hits == 1
        assert (await v.verify(t1)).key_id == "k1"
        assert jwks_server.hits == 1  # cached

        # rotate: the server now only publishes k2
        jwks_server.doc = {"keys": [public_jwk(k2, kid="k2")]}
        t2 = jwt.encode(claims(), k2, algorithm="ES256", headers={"kid": "k2"})

        # within 30 s of the last fetch the unknown kid does not trigger a fetch
        mono.now += 10
        await expect(v, t2, "PSYNC_S2101", "no key has kid 'k2'")
        assert jwks_server.hits == 1

        # later, the unknown kid triggers a refresh and the new key is picked up
        mono.now += 25
        assert (await v.verify(t2)).key_id == "k2"
        assert jwks_server.hits == 2

        # the old key is gone; asking for it again soon after is rate limited
        await expect(v, t1, "PSYNC_S2101", "no key has kid 'k1'")
        assert jwks_server.hits == 2
        mono.now += 31
        await expect(v, t1, "PSYNC_S2101", "no key has kid 'k1'")
        assert jwks_server.hits == 3
    finally:
        await v.aclose()


async def test_jwks_url_concurrent_first_use_fetches_once(jwks_server: JwksServer) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.doc = {"keys": [public_jwk(key, kid="e1")]}
    v = url_verifier(jwks_server, FakeClock())
    token = jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": "e1"})
    results = await asyncio.gather(*(v.verify(token) for _ in range(5)))
    assert all(r.key_id == "e1" for r in results)
    assert jwks_server.hits == 1


async def test_jwks_url_refreshes_every_five_minutes_in_use(jwks_server: JwksServer) -> None:
    key = rsa_key()
    jwks_server.doc = {"keys": [public_jwk(key, kid="k1")]}
    mono = FakeClock()
    v = url_verifier(jwks_server, mono)
    try:
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
        await v.verify(token)
        mono.now += JWKS_MAX_AGE_S - 1
        await v.verify(token)
        assert jwks_server.hits == 1
        mono.now += 2
        await v.verify(token)  # served from the cache; a background refresh starts
        for _ in range(200):
            if jwks_server.hits == 2:
                break
            await asyncio.sleep(0.01)
        assert jwks_server.hits == 2
    finally:
        await v.aclose()


async def test_jwks_url_only_asymmetric_signing_keys(jwks_server: JwksServer) -> None:
    secret = b"remote-secret-of-at-least-thirty-two-bytes"
    enc_key, good = rsa_key(), rsa_key()
    jwks_server.doc = {
        "keys": [
            {"kty": "oct", "kid": "s1", "k": b64(secret)},
            public_jwk(enc_key, kid="enc", use="enc"),
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "not a key",
            public_jwk(good, kid="good"),
        ]
    }
    v = url_verifier(jwks_server, FakeClock())
    try:
        assert (
            await v.verify(jwt.encode(claims(), good, "RS256", headers={"kid": "good"}))
        ).key_id == "good"
        assert v.key_count == 1
        await expect(v, jwt.encode(claims(), secret, "HS256", headers={"kid": "s1"}), "PSYNC_S2101")
        await expect(
            v, jwt.encode(claims(), enc_key, "RS256", headers={"kid": "enc"}), "PSYNC_S2101"
        )
    finally:
        await v.aclose()


async def test_jwks_url_unreachable_is_s2101_with_reason(jwks_server: JwksServer) -> None:
    jwks_server.status = 500
    v = url_verifier(jwks_server, FakeClock())
    key = rsa_key()
    err = await expect(v, jwt.encode(claims(), key, "RS256", headers={"kid": "k1"}), "PSYNC_S2101")
    assert "could not be fetched" in err.description and "500" in err.description
    assert await v.refresh_jwks() is False


async def test_jwks_url_keeps_keys_when_a_refresh_fails(jwks_server: JwksServer) -> None:
    key = rsa_key()
    jwks_server.doc = {"keys": [public_jwk(key, kid="k1")]}
    v = url_verifier(jwks_server, FakeClock())
    token = jwt.encode(claims(), key, "RS256", headers={"kid": "k1"})
    assert await v.refresh_jwks() is True
    jwks_server.doc = "garbage"
    assert await v.refresh_jwks() is False
    assert (await v.verify(token)).key_id == "k1"
    # verify_sync uses the keys as last fetched, without network access
    assert v.verify_sync(token).key_id == "k1"


async def test_jwks_url_large_document_and_size_limit(jwks_server: JwksServer) -> None:
    key = rsa_key()
    jwk = public_jwk(key)
    jwks_server.doc = {"keys": [{**jwk, "kid": f"k{i}"} for i in range(400)]}  # ~170 KB
    v = url_verifier(jwks_server, FakeClock())
    token = jwt.encode(claims(), key, "RS256", headers={"kid": "k399"})
    assert (await v.verify(token)).key_id == "k399"
    assert v.key_count == 400
    jwks_server.doc = {"keys": [{**jwk, "kid": f"k{i}"} for i in range(3000)]}  # > 1 MiB
    assert await v.refresh_jwks() is False
    assert v.key_count == 400


async def test_jwks_url_keys_dropped_after_an_hour_without_refresh(
    jwks_server: JwksServer,
) -> None:
    key = rsa_key()
    jwks_server.doc = {"keys": [public_jwk(key, kid="k1")]}
    mono = FakeClock()
    v = url_verifier(jwks_server, mono)
    token = jwt.encode(claims(), key, "RS256", headers={"kid": "k1"})
    assert (await v.verify(token)).key_id == "k1"
    jwks_server.status = 503
    mono.now += 3601
    err = await expect(v, token, "PSYNC_S2101", "no key has kid 'k1'")
    assert "could not be fetched" in err.description
    assert v.key_count == 0
    jwks_server.status = 200
    mono.now += 31
    assert (await v.verify(token)).key_id == "k1"


# ------------------------------------------------------------------ verified-token cache


async def test_cached_token_claims_are_checked_again_on_every_use() -> None:
    clock = FakeClock(now=time.time())
    v = TokenVerifier(auth_settings(), clock=clock)
    payload = claims(exp=int(clock.now) + 100)
    token = hs_token(payload)
    first = await v.verify(token)
    assert (await v.verify(token)) == first  # served from the cache: the same claims
    clock.now += 100 + 60  # past exp + leeway: refused although it was verified before
    await expect(v, token, "PSYNC_S2103")
    clock.now -= 100 + 60
    assert (await v.verify(token)).sub == "user-1"  # verified afresh


async def test_cached_token_of_a_key_that_left_the_key_set_is_verified_afresh() -> None:
    v = verifier()
    token = hs_token(claims())
    await v.verify(token)
    v._local_keys = []  # the key is gone (rotation): the cached verification must not count
    await expect(v, token, "PSYNC_S2101")


async def test_a_different_token_text_is_never_a_cache_hit() -> None:
    v = verifier()
    good = hs_token(claims())
    await v.verify(good)
    head, _body, sig = good.split(".")
    forged = f"{head}.{b64(orjson.dumps(claims(sub='admin')))}.{sig}"
    await expect(v, forged, "PSYNC_S2101")


def test_token_cache_is_bounded() -> None:
    v = verifier(token_cache_entries=3)
    tokens = [hs_token(claims(sub=f"u{i}")) for i in range(10)]
    for t in tokens:
        v.verify_sync(t)
    assert list(v._cache) == tokens[-3:]
    off = verifier(token_cache_entries=0)
    off.verify_sync(tokens[0])
    assert not off._cache
