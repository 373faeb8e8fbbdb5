"""CORS on the HTTP port: off by default (a preflight is a 405, no answer carries CORS headers); with
allowed origins (`--cors-origin`), a preflight from one of them is answered on every route family (REST,
OIP, the info routes) without the token, one from any other origin is refused, and only an allowed
origin is echoed in Access-Control-Allow-Origin, on answers and refusals alike."""

from __future__ import annotations

import pytest
from test_serve_surface import raw

from centra.errors import CentraError
from centra.serve.guard import Guard
from centra.serve.metrics import Metrics
from centra.serve.server import CentraServer, ServeOptions

ALLOWED, OTHER = "https://app.example.com", "https://evil.example.net"
ROUTES = [("POST", "/v1/classify"), ("GET", "/v1/tasks"), ("GET", "/openapi.json"), ("POST", "/v2/models/centra/infer"),
          ("GET", "/v2/models/centra"), ("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", "/health"),
          ("GET", "/info"), ("GET", "/metrics")]
BEARER = {"Authorization": "Bearer s3cret"}


def preflight(running, path: str, origin: str, method: str):
    asked = "authorization, content-type, x-centra-head, x-request-id"  # the canary's headers too
    return raw(running, "OPTIONS", path, {"Origin": origin, "Access-Control-Request-Method": method,
                                          "Access-Control-Request-Headers": asked})


@pytest.fixture(scope="module")
def cors(engine):
    from test_rest import Served

    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0, cors_origins=(ALLOWED,)),
                                  guard=Guard(token="s3cret", metrics=Metrics())))
    yield running
    running.close()


def test_cors_is_off_by_default(engine):
    from test_rest import Served

    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        status, headers, _ = preflight(running, "/v1/classify", ALLOWED, "POST")
        assert status == 405 and "Access-Control-Allow-Origin" not in headers
        status, headers, _ = raw(running, "GET", "/health", {"Origin": ALLOWED})
        assert status == 200 and not any(h.startswith("Access-Control") for h in headers), headers
    finally:
        running.close()


@pytest.mark.parametrize("method,path", ROUTES)
def test_preflight_is_answered_for_allowed_origins_only(cors, method, path):
    status, headers, _ = preflight(cors, path, ALLOWED, method)
    assert status == 200, (path, status)
    assert headers["Access-Control-Allow-Origin"] == ALLOWED and headers["Access-Control-Allow-Methods"] == method
    assert {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")} == {
        "authorization", "content-type", "x-centra-head", "x-request-id"}  # the canary's headers too
    assert headers.get("Vary") == "Origin"
    status, headers, body = preflight(cors, path, OTHER, method)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers and b"not allowed" in body, path


def test_only_an_allowed_origin_is_echoed(cors):
    for method, path in ROUTES:
        if method == "GET":
            status, headers, _ = raw(cors, method, path, {"Origin": ALLOWED, **BEARER})
            assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED, (path, status)
            assert "Retry-After" in headers["Access-Control-Expose-Headers"]
            status, headers, _ = raw(cors, method, path, {"Origin": OTHER, **BEARER})
            assert status == 200 and "Access-Control-Allow-Origin" not in headers, path
    # a refusal reaches the page too (the browser shows the 401, not a CORS failure)
    status, headers, _ = raw(cors, "POST", "/v1/classify", {"Origin": ALLOWED})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == ALLOWED
    status, headers, _ = raw(cors, "POST", "/v1/classify", {"Origin": OTHER})
    assert status == 401 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("origins,words", [(("*",), "no wildcard"), (("https://app.example.com/",), "no path"),
                                           (("app.example.com",), "scheme://host"),
                                           (("https://a.example.com", "ftp://b.example.com"), "ftp://")])
def test_origins_are_checked(origins, words):
    with pytest.raises(CentraError, match=words):
        ServeOptions(http_port=0, cors_origins=origins).check()
    ServeOptions(http_port=0, cors_origins=("http://localhost:3000", "https://[::1]:8443")).check()


def test_cors_needs_the_http_port_and_the_cli_names_its_flag(capsys):
    import signal

    from centra.cli import main

    with pytest.raises(CentraError, match="cors_origins needs the HTTP port"):
        ServeOptions(http_port=None, cors_origins=(ALLOWED,)).check()
    hup = signal.getsignal(signal.SIGHUP)
    try:
        assert main(["serve", "--model", "nowhere", "--no-http", "--cors-origin", ALLOWED]) == 2
    finally:
        signal.signal(signal.SIGHUP, hup)  # serve's own, set before its checks
    assert "--cors-origin needs the HTTP port" in capsys.readouterr().err
