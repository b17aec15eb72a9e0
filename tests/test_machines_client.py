"""Unit tests of the Machines API client: error paths through respx, retries on a fake clock."""

from __future__ import annotations

import json
import logging
import pickle
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import respx

from django_flyworkers.machines import (
    Conflict,
    Lease,
    LeaseHeld,
    Machine,
    MachineEvent,
    MachineNotFound,
    MachinesAPIError,
    MachinesClient,
    MachineState,
    PreconditionFailed,
    RateLimited,
    RetryPolicy,
    StartResult,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from django_flyworkers.machines import errors as fly_errors
from django_flyworkers.machines.client import authorization_header
from django_flyworkers.machines.errors import error_from_response

BASE = "http://fly.test"
API = f"{BASE}/v1"
APP = "app"
TOKEN = "FlyV1 fm2_lJPECAAAAAAAAsecretsecretsecretsecret"
MACHINES = f"/apps/{APP}/machines"
M1 = f"{MACHINES}/m1"


class FakeClock:
    """A monotonic clock that only moves when something sleeps (or a test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy(clock: FakeClock) -> RetryPolicy:
    # rand=1.0 with jitter 0.5 gives the lower bound: delays 0.25, 0.5, 1, 2, 2.5, 2.5 ...
    return RetryPolicy(
        max_elapsed=10.0,
        base_delay=0.5,
        max_delay=5.0,
        sleep=clock.sleep,
        clock=clock.time,
        rand=lambda: 1.0,
    )


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=API, assert_all_called=False)


@pytest.fixture
def client(router: respx.Router, policy: RetryPolicy) -> Iterator[MachinesClient]:
    with MachinesClient(
        BASE, TOKEN, APP, transport=httpx.MockTransport(router.handler), retry=policy
    ) as c:
        yield c


def machine_json(machine_id: str = "m1", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": machine_id,
        "name": f"name-{machine_id}",
        "state": "started",
        "region": "ams",
        "instance_id": "01HEPA330HZ37A78TK080NAK1M",
        "private_ip": "fdaa::2",
        "config": {"image": "img:1", "metadata": {"flyworkers_queue": "default"}},
        "created_at": "2023-10-31T02:30:10Z",
        "updated_at": "2023-10-31T02:35:26Z",
        "events": [],
    }
    data.update(extra)
    return data


def err(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": message})


RATE_LIMITED = err(429, "resource_exhausted: rate limit exceeded")


# -- authentication, construction -------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "header"),
    [
        ("abc123", "Bearer abc123"),
        ("FlyV1 fm2_xyz,fm2_abc", "FlyV1 fm2_xyz,fm2_abc"),
        ("fm2_xyz", "FlyV1 fm2_xyz"),
        ("fm1r_xyz", "FlyV1 fm1r_xyz"),
        ("fm1a_xyz", "FlyV1 fm1a_xyz"),
        ("  abc123\n".strip(), "Bearer abc123"),
    ],
)
def test_authorization_header(token: str, header: str) -> None:
    assert authorization_header(token) == header


def test_sends_auth_user_agent_and_v1_prefix(router: respx.Router, policy: RetryPolicy) -> None:
    route = router.get(M1).mock(return_value=httpx.Response(200, json=machine_json()))
    for base in (BASE, BASE + "/", BASE + "/v1"):
        with MachinesClient(
            base, "fm2_abc", APP, transport=httpx.MockTransport(router.handler), retry=policy
        ) as c:
            c.get("m1")
    for call in route.calls:
        assert call.request.url.path == f"/v1{M1}"
        assert call.request.headers["authorization"] == "FlyV1 fm2_abc"
        assert call.request.headers["user-agent"].startswith("django-flyworkers/")


def test_rejects_bad_arguments(client: MachinesClient) -> None:
    with pytest.raises(ValueError):
        MachinesClient(BASE, "", APP)
    with pytest.raises(ValueError, match="line break") as info:
        MachinesClient(BASE, "secret-token\n", APP)
    assert "secret-token" not in str(info.value)
    with pytest.raises(ValueError):
        MachinesClient("ftp://x", TOKEN, APP)
    with pytest.raises(ValueError):
        client.get("")  # would otherwise become a list call


# -- retries ----------------------------------------------------------------------------


def test_429_storm_then_success(
    client: MachinesClient, router: respx.Router, clock: FakeClock, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_flyworkers.machines")
    route = router.get(M1).mock(
        side_effect=[RATE_LIMITED] * 5 + [httpx.Response(200, json=machine_json())]
    )
    machine = client.get("m1")
    assert machine.id == "m1"
    assert route.call_count == 6
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 2.5]
    assert sum(clock.sleeps) <= client.retry_policy.max_elapsed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert "429" in warnings[0].getMessage()
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 6


def test_429_forever_raises_rate_limited_at_the_deadline(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    route = router.get(M1).mock(return_value=RATE_LIMITED)
    with pytest.raises(RateLimited) as info:
        client.get("m1")
    assert info.value.attempts == route.call_count > 3
    # Never sleeps past the deadline: the last sleep is cut to what is left.
    assert sum(clock.sleeps) == pytest.approx(10.0)
    assert "after" in str(info.value)


def test_no_retries_with_never_policy(router: respx.Router) -> None:
    route = router.get(M1).mock(return_value=RATE_LIMITED)
    transport = httpx.MockTransport(router.handler)
    c = MachinesClient(BASE, TOKEN, APP, transport=transport, retry=RetryPolicy.never())
    with c, pytest.raises(RateLimited):
        c.get("m1")
    assert route.call_count == 1


def test_500_then_200_on_get(client: MachinesClient, router: respx.Router) -> None:
    route = router.get(M1).mock(
        side_effect=[err(500, "internal: boom"), httpx.Response(200, json=machine_json())]
    )
    assert client.get("m1").state == MachineState.STARTED
    assert route.call_count == 2


def test_400_is_not_retried(client: MachinesClient, router: respx.Router) -> None:
    route = router.get(M1).mock(return_value=err(400, "invalid_argument: bad"))
    with pytest.raises(MachinesAPIError) as info:
        client.get("m1")
    assert type(info.value) is MachinesAPIError
    assert info.value.code == "invalid_argument"
    assert route.call_count == 1


def test_read_timeout_becomes_transport_error(client: MachinesClient, router: respx.Router) -> None:
    route = router.get(M1).mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(TransportError) as info:
        client.get("m1")
    assert info.value.ambiguous
    assert info.value.status is None
    assert "ReadTimeout" in info.value.message
    assert route.call_count > 1  # a GET is idempotent, so it was retried
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_connect_error_then_success(client: MachinesClient, router: respx.Router) -> None:
    router.get(M1).mock(
        side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json=machine_json())]
    )
    assert client.get("m1").id == "m1"


def test_update_is_not_retried_after_ambiguous_failure(
    client: MachinesClient, router: respx.Router
) -> None:
    route = router.post(M1).mock(return_value=err(503, "unavailable: try later"))
    with pytest.raises(MachinesAPIError) as info:
        client.update("m1", {"image": "img:2"})
    assert info.value.status == 503
    assert route.call_count == 1


def test_update_is_retried_on_429(client: MachinesClient, router: respx.Router) -> None:
    route = router.post(M1).mock(
        side_effect=[RATE_LIMITED, httpx.Response(200, json=machine_json(state="replacing"))]
    )
    machine = client.update("m1", {"image": "img:2"}, current_version="v1", nonce="n1")
    assert machine.state == "replacing"
    body = json.loads(route.calls.last.request.content)
    assert body == {"config": {"image": "img:2"}, "current_version": "v1"}
    assert route.calls.last.request.headers["fly-machine-lease-nonce"] == "n1"


# -- create: never blindly retried --------------------------------------------------------


def test_create_500_then_found_by_name(client: MachinesClient, router: respx.Router) -> None:
    post = router.post(MACHINES).mock(return_value=err(500, "internal: oops"))
    listing = router.get(MACHINES).mock(
        return_value=httpx.Response(
            200,
            json=[
                machine_json("other"),
                machine_json("m9", name="worker-1", config={"metadata": {"q": "default"}}),
            ],
        )
    )
    machine = client.create({"image": "img:1", "metadata": {"q": "default"}}, name="worker-1")
    assert machine.id == "m9"
    assert post.call_count == 1
    assert listing.call_count == 1
    # The look-up narrows by the config's metadata.
    assert listing.calls.last.request.url.params["metadata.q"] == "default"


def test_create_500_not_found_retries_once(client: MachinesClient, router: respx.Router) -> None:
    post = router.post(MACHINES).mock(
        side_effect=[
            err(500, "internal: oops"),
            httpx.Response(200, json=machine_json("m2", state="created")),
        ]
    )
    router.get(MACHINES).mock(return_value=httpx.Response(200, json=[]))
    machine = client.create({"image": "img:1"}, name="worker-1", region="ams", skip_launch=True)
    assert machine.id == "m2"
    assert post.call_count == 2
    first, second = (json.loads(call.request.content) for call in post.calls)
    assert first == second
    assert first == {
        "name": "worker-1",
        "config": {"image": "img:1"},
        "region": "ams",
        "skip_launch": True,
    }


def test_create_generates_a_name(client: MachinesClient, router: respx.Router) -> None:
    post = router.post(MACHINES).mock(return_value=httpx.Response(200, json=machine_json()))
    client.create({"image": "img:1"}, lease_ttl=60)
    body = json.loads(post.calls.last.request.content)
    assert re.fullmatch(r"flyworkers-[0-9a-f]{12}", body["name"])
    assert body["lease_ttl"] == 60


def test_create_read_timeout_checks_by_name(client: MachinesClient, router: respx.Router) -> None:
    post = router.post(MACHINES).mock(side_effect=httpx.ReadTimeout("timed out"))

    def listing(request: httpx.Request) -> httpx.Response:
        name = json.loads(post.calls.last.request.content)["name"]
        return httpx.Response(200, json=[machine_json("m3", name=name)])

    router.get(MACHINES).mock(side_effect=listing)
    assert client.create({"image": "img:1"}).id == "m3"
    assert post.call_count == 1


def test_create_ambiguous_and_check_fails_raises_original(
    client: MachinesClient, router: respx.Router
) -> None:
    post = router.post(MACHINES).mock(side_effect=httpx.ReadTimeout("timed out"))
    router.get(MACHINES).mock(return_value=err(401, "unauthorized"))
    with pytest.raises(TransportError) as info:
        client.create({"image": "img:1"}, name="w")
    assert isinstance(info.value.__cause__, Unauthorized)
    assert post.call_count == 1


def test_create_name_taken_after_ambiguous_attempt_is_found(
    client: MachinesClient, router: respx.Router
) -> None:
    # The first POST landed late: the check misses it, the retry hits "name taken".
    post = router.post(MACHINES).mock(
        side_effect=[
            httpx.ReadTimeout("timed out"),
            httpx.Response(422, json={"error": "name already exists", "status": "name_taken"}),
        ]
    )
    router.get(MACHINES).mock(
        side_effect=[
            httpx.Response(200, json=[]),
            httpx.Response(200, json=[machine_json("m4", name="w")]),
        ]
    )
    assert client.create({"image": "img:1"}, name="w").id == "m4"
    assert post.call_count == 2


def test_create_429_and_connect_error_retry_without_check(
    client: MachinesClient, router: respx.Router
) -> None:
    post = router.post(MACHINES).mock(
        side_effect=[
            RATE_LIMITED,
            httpx.ConnectError("refused"),
            httpx.Response(200, json=machine_json("m5")),
        ]
    )
    listing = router.get(MACHINES).mock(return_value=httpx.Response(200, json=[]))
    assert client.create({"image": "img:1"}).id == "m5"
    assert post.call_count == 3
    assert listing.call_count == 0


def test_create_412_is_not_retried(client: MachinesClient, router: respx.Router) -> None:
    post = router.post(MACHINES).mock(
        return_value=err(412, "failed_precondition: no capacity available")
    )
    with pytest.raises(PreconditionFailed):
        client.create({"image": "img:1"})
    assert post.call_count == 1


# -- malformed responses ----------------------------------------------------------------


def test_malformed_json_is_a_machines_api_error(
    client: MachinesClient, router: respx.Router
) -> None:
    router.get(M1).mock(return_value=httpx.Response(200, content=b'{"id": "m1", '))
    with pytest.raises(MachinesAPIError) as info:
        client.get("m1")
    assert not isinstance(info.value, json.JSONDecodeError)
    assert info.value.code == "invalid_response"
    assert "malformed JSON" in info.value.message


@pytest.mark.parametrize(
    "payload", [b"[1, 2]", b'{"name": "no id"}', b'"text"', b"\xff\xfe not utf-8"]
)
def test_unexpected_shapes_are_invalid_response(
    client: MachinesClient, router: respx.Router, payload: bytes
) -> None:
    router.get(M1).mock(return_value=httpx.Response(200, content=payload))
    router.get(MACHINES).mock(return_value=httpx.Response(200, content=payload))
    with pytest.raises(MachinesAPIError, match="invalid_response"):
        client.get("m1")
    if payload != b"[1, 2]":
        with pytest.raises(MachinesAPIError, match="invalid_response"):
            client.list()


# -- error parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "cls", "code", "message"),
    [
        (
            412,
            b'{"error": "failed_precondition: machine still active, refusing to start"}',
            PreconditionFailed,
            "failed_precondition",
            "machine still active, refusing to start",
        ),
        (
            409,
            b'{"status": "error", "message": "machine ID 3d8d lease currently held by '
            b'hello@fly.io, expires at 2022-10-20 19:59:06 +0000 UTC", "code": "invalid"}',
            LeaseHeld,
            "invalid",
            "machine ID 3d8d lease currently held by hello@fly.io, expires at "
            "2022-10-20 19:59:06 +0000 UTC",
        ),
        (
            409,
            b'{"error": "aborted: machine ID 784 lease currently held by x@tokens.fly.io"}',
            LeaseHeld,
            "aborted",
            "machine ID 784 lease currently held by x@tokens.fly.io",
        ),
        (
            409,
            b'{"error": "aborted: machine is replacing: concurrent update in progress"}',
            Conflict,
            "aborted",
            "machine is replacing: concurrent update in progress",
        ),
        (404, b"404 page not found\n", MachineNotFound, None, "404 page not found"),
        (404, b'{"error": "machine not found"}', MachineNotFound, None, "machine not found"),
        (401, b'{"error": "unauthorized"}', Unauthorized, None, "unauthorized"),
        (403, b"", Unauthorized, None, "Forbidden"),
        (
            429,
            b'{"error": "failed to launch VM: resource_exhausted: rate limit exceeded"}',
            RateLimited,
            "resource_exhausted",
            "failed to launch VM: resource_exhausted: rate limit exceeded",
        ),
        (429, b"rate limit exceeded", RateLimited, None, "rate limit exceeded"),
        (
            408,
            b'{"error": "deadline_exceeded: machine failed to reach desired state, started, '
            b'currently stopped"}',
            WaitTimeout,
            "deadline_exceeded",
            "machine failed to reach desired state, started, currently stopped",
        ),
        (
            422,
            b'{"error": "could not reserve name", "status": "name_taken", "details": {}}',
            MachinesAPIError,
            "name_taken",
            "could not reserve name",
        ),
        (
            400,
            b'{"error": "invalid_argument: invalid WaitMachineRequest.Timeout: value must be '
            b'inside range [1s, 1m0s]"}',
            MachinesAPIError,
            "invalid_argument",
            "invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]",
        ),
        (
            500,
            b'{"message": "internal: db down"}',
            MachinesAPIError,
            "internal",
            "db down",
        ),
        (503, b"", MachinesAPIError, None, "Service Unavailable"),
        (502, b"<html>Bad Gateway</html>", MachinesAPIError, None, "<html>Bad Gateway</html>"),
        (500, b'{"error": ', MachinesAPIError, None, '{"error":'),
        (500, b'["a"]', MachinesAPIError, None, '["a"]'),
        (
            503,
            b'{"error": "unavailable: deploys to this host are temporarily disabled"}',
            MachinesAPIError,
            "unavailable",
            "deploys to this host are temporarily disabled",
        ),
    ],
)
def test_error_shapes(
    status: int, body: bytes, cls: type[MachinesAPIError], code: str | None, message: str
) -> None:
    reason = httpx.codes.get_reason_phrase(status)
    error = error_from_response(
        status, body, reason=reason, request_id="req-1", method="GET", path="/v1/x"
    )
    assert type(error) is cls
    assert (error.status, error.code, error.message) == (status, code, message)
    assert error.request_id == "req-1"
    assert "fly-request-id=req-1" in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is cls and str(clone) == str(error)


def test_error_carries_request_id_from_response(
    client: MachinesClient, router: respx.Router
) -> None:
    router.get(M1).mock(
        return_value=httpx.Response(
            404, json={"error": "machine not found"}, headers={"fly-request-id": "01ABC"}
        )
    )
    with pytest.raises(MachineNotFound) as info:
        client.get("m1")
    assert info.value.request_id == "01ABC"
    assert info.value.path == f"/v1{M1}"
    assert str(info.value) == f"404 machine not found (GET /v1{M1}, fly-request-id=01ABC)"


# -- token redaction --------------------------------------------------------------------


def test_token_never_leaks(router: respx.Router, policy: RetryPolicy, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "fm2_lJPECAAAAAAAAtopsecretmacaroon"

    def echo(request: httpx.Request) -> httpx.Response:
        # A hostile proxy that echoes the Authorization header back.
        return httpx.Response(500, text=f"bad: {request.headers['authorization']}")

    router.post(MACHINES).mock(side_effect=httpx.ReadTimeout(f"timed out {secret}"))
    router.get(MACHINES).mock(side_effect=echo)
    router.get(M1).mock(side_effect=echo)
    router.post(f"{M1}/start").mock(side_effect=httpx.ConnectError(f"refused {secret}"))
    transport = httpx.MockTransport(router.handler)
    errors: list[BaseException] = []
    with MachinesClient(BASE, secret, APP, transport=transport, retry=policy) as c:
        assert secret not in repr(c) and "fm2_" not in repr(c)
        assert repr(c) == f"MachinesClient(base_url='{BASE}', app='{APP}')"
        calls: list[Callable[[], object]] = [
            lambda: c.create({"image": "img"}),
            lambda: c.get("m1"),
            lambda: c.start("m1"),
        ]
        for call in calls:
            with pytest.raises(MachinesAPIError) as info:
                call()
            errors.append(info.value)
    for error in errors:
        texts = [str(error), repr(error), "".join(traceback.format_exception(error))]
        if error.__cause__ is not None:
            texts.append(str(error.__cause__))
        for text in texts:
            assert secret not in text
    assert secret not in caplog.text
    assert "[redacted]" in str(errors[1])


def test_every_error_class_str_and_repr_omit_headers() -> None:
    for cls in (
        MachinesAPIError,
        Unauthorized,
        MachineNotFound,
        WaitTimeout,
        Conflict,
        LeaseHeld,
        PreconditionFailed,
        RateLimited,
        TransportError,
    ):
        error = cls(418, "code", "msg", "rid", "GET", "/v1/apps/a/machines")
        assert "authorization" not in str(error).lower()
        assert repr(error).startswith(cls.__name__ + "(")
        assert isinstance(pickle.loads(pickle.dumps(error)), cls)


# -- start / stop / suspend / destroy ---------------------------------------------------


def test_start_absorbs_still_active_412(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    route = router.post(f"{M1}/start").mock(
        side_effect=[
            err(412, "failed_precondition: machine still active, refusing to start"),
            err(412, "failed_precondition: unable to start machine from current state: 'stopping'"),
            httpx.Response(
                200, json={"previous_state": "stopped", "migrated": False, "new_host": ""}
            ),
        ]
    )
    result = client.start("m1", nonce="n")
    assert result == StartResult(previous_state="stopped")
    assert route.call_count == 3
    assert len(clock.sleeps) == 2
    assert route.calls.last.request.headers["fly-machine-lease-nonce"] == "n"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200), StartResult()),
        (httpx.Response(200, text="ok"), StartResult()),
        (
            httpx.Response(200, json={"previous_state": "started"}),
            StartResult(previous_state="started", already_started=True),
        ),
        (
            err(412, "failed_precondition: unable to start machine from current state: 'started'"),
            StartResult(previous_state="started", already_started=True),
        ),
    ],
)
def test_start_success_shapes(
    client: MachinesClient, router: respx.Router, response: httpx.Response, expected: StartResult
) -> None:
    router.post(f"{M1}/start").mock(return_value=response)
    assert client.start("m1") == expected


def test_start_other_412_and_status_error(client: MachinesClient, router: respx.Router) -> None:
    route = router.post(f"{M1}/start").mock(
        return_value=err(412, "failed_precondition: could not reserve resource for machine")
    )
    with pytest.raises(PreconditionFailed):
        client.start("m1")
    assert route.call_count == 1
    route.mock(return_value=httpx.Response(200, json={"status": "error", "message": "no"}))
    with pytest.raises(MachinesAPIError, match="no"):
        client.start("m1")


def test_stop_body_and_already_stopped(client: MachinesClient, router: respx.Router) -> None:
    route = router.post(f"{M1}/stop").mock(return_value=httpx.Response(200, json={"ok": True}))
    client.stop("m1", signal="term", timeout=10)
    assert json.loads(route.calls.last.request.content) == {"signal": "SIGTERM", "timeout": "10s"}
    client.stop("m1", timeout=1.5)
    assert json.loads(route.calls.last.request.content) == {"timeout": "1500ms"}
    client.stop("m1")
    assert route.calls.last.request.content == b""
    route.mock(return_value=err(412, "failed_precondition: current state: 'stopped'"))
    client.stop("m1")
    route.mock(return_value=err(412, "failed_precondition: machine is being destroyed"))
    with pytest.raises(PreconditionFailed):
        client.stop("m1")


def test_suspend(client: MachinesClient, router: respx.Router) -> None:
    route = router.post(f"{M1}/suspend").mock(return_value=httpx.Response(200, json={"ok": True}))
    client.suspend("m1", nonce="n")
    assert route.call_count == 1
    assert route.calls.last.request.content == b""
    assert route.calls.last.request.headers["fly-machine-lease-nonce"] == "n"
    for state in ("suspended", "suspending"):
        route.mock(return_value=err(412, f"failed_precondition: current state: '{state}'"))
        client.suspend("m1")  # already (being) suspended: a no-op, as stop's twin
    route.mock(return_value=httpx.Response(200, json={"status": "error", "message": "nope"}))
    with pytest.raises(MachinesAPIError, match="nope"):
        client.suspend("m1")


@pytest.mark.parametrize(
    ("response", "error_class"),
    [
        (
            err(
                412, "failed_precondition: unable to suspend machine from current state: 'stopped'"
            ),
            PreconditionFailed,
        ),
        (err(412, "failed_precondition: machine is being destroyed"), PreconditionFailed),
        (
            err(400, "invalid_argument: machine has 4096 MB of memory; suspend needs 2048 or less"),
            MachinesAPIError,
        ),
        (err(400, "invalid_argument: machines with swap cannot be suspended"), MachinesAPIError),
    ],
)
def test_suspend_refusals_raise_at_once(
    client: MachinesClient,
    router: respx.Router,
    clock: FakeClock,
    response: httpx.Response,
    error_class: type[MachinesAPIError],
) -> None:
    route = router.post(f"{M1}/suspend").mock(return_value=response)
    with pytest.raises(error_class) as info:
        client.suspend("m1")
    assert type(info.value) is error_class
    assert info.value.status == response.status_code
    assert route.call_count == 1 and clock.sleeps == []


@pytest.mark.parametrize(
    "first",
    [
        RATE_LIMITED,
        err(503, "unavailable: try again"),
        err(500, "internal: boom"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("refused"),
    ],
)
def test_suspend_retries_like_stop(
    client: MachinesClient, router: respx.Router, clock: FakeClock, first: Any
) -> None:
    for action, call in (("suspend", client.suspend), ("stop", client.stop)):
        route = router.post(f"{M1}/{action}").mock(
            side_effect=[first, httpx.Response(200, json={"ok": True})]
        )
        call("m1")
        assert route.call_count == 2, action
    assert len(clock.sleeps) == 2


def test_wait_for_suspended(client: MachinesClient, router: respx.Router, clock: FakeClock) -> None:
    route = router.get(f"{M1}/wait").mock(
        side_effect=long_poll(
            clock, [err(408, "deadline_exceeded: not yet"), httpx.Response(200, json={"ok": True})]
        )
    )
    client.wait("m1", "suspended", timeout=90)
    params = route.calls.last.request.url.params
    assert params.get_list("state") == ["suspended"]
    # Unlike "stopped", no instance_id is needed (and none was fetched: no GET route).
    assert "instance_id" not in params
    assert route.call_count == 2


def test_start_resumes_and_retries_while_suspending(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    route = router.post(f"{M1}/start").mock(
        side_effect=[
            err(412, "failed_precondition: unable to start machine from current state: "
                "'suspending'"),
            httpx.Response(200, json={"previous_state": "suspended"}),
        ]
    )  # fmt: skip
    result = client.start("m1")
    assert result == StartResult(previous_state="suspended")
    assert route.call_count == 2 and len(clock.sleeps) == 1


def test_destroy(client: MachinesClient, router: respx.Router) -> None:
    route = router.delete(M1).mock(return_value=httpx.Response(200, json={"ok": True}))
    client.destroy("m1", force=True, nonce="n")
    request = route.calls.last.request
    assert request.url.params["force"] == "true" and request.url.params["kill"] == "true"
    assert request.headers["fly-machine-lease-nonce"] == "n"
    client.destroy("m1")
    assert "force" not in route.calls.last.request.url.params
    # An ambiguous first attempt that actually destroyed the Machine.
    route.mock(side_effect=[err(503, "unavailable: x"), err(404, "machine not found")])
    client.destroy("m1")
    route.mock(return_value=err(404, "machine not found"))
    with pytest.raises(MachineNotFound):
        client.destroy("m1")


# -- wait -------------------------------------------------------------------------------


def long_poll(clock: FakeClock, outcomes: list[httpx.Response]) -> Callable[..., httpx.Response]:
    """A wait handler that takes the requested timeout of fake time, then answers."""

    def handler(request: httpx.Request) -> httpx.Response:
        response = outcomes.pop(0) if outcomes else err(408, "deadline_exceeded: not yet")
        if response.status_code == 408:
            clock.now += int(request.url.params["timeout"])
        return response

    return handler


def test_wait_loops_over_408_until_deadline(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    route = router.get(f"{M1}/wait").mock(side_effect=long_poll(clock, []))
    start = clock.now
    with pytest.raises(WaitTimeout) as info:
        client.wait("m1", "started", timeout=150)
    assert [int(c.request.url.params["timeout"]) for c in route.calls] == [60, 60, 30]
    assert clock.now - start == 150
    assert "within 150s" in info.value.message and "not yet" in info.value.message
    assert clock.sleeps == []


def test_wait_returns_after_some_408s(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    outcomes = [err(408, "deadline_exceeded: x"), httpx.Response(200, json={"ok": True})]
    route = router.get(f"{M1}/wait").mock(side_effect=long_poll(clock, outcomes))
    client.wait("m1", ["started", "stopped"], instance_id="v1", timeout=300)
    request = route.calls.last.request
    assert request.url.params.get_list("state") == ["started", "stopped"]
    assert request.url.params["instance_id"] == "v1"
    # The HTTP read timeout outlives the long-poll.
    assert request.extensions["timeout"]["read"] > int(request.url.params["timeout"])


@pytest.mark.parametrize(("timeout", "first"), [(0.2, 1), (0, 1), (59.5, 60), (500, 60)])
def test_wait_timeout_is_clamped(
    client: MachinesClient, router: respx.Router, clock: FakeClock, timeout: float, first: int
) -> None:
    route = router.get(f"{M1}/wait").mock(side_effect=long_poll(clock, []))
    with pytest.raises(WaitTimeout):
        client.wait("m1", instance_id="v", timeout=timeout)
    polls = [int(c.request.url.params["timeout"]) for c in route.calls]
    assert polls[0] == first
    assert all(1 <= p <= 60 for p in polls)


def test_wait_quick_408s_do_not_spin(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    route = router.get(f"{M1}/wait").mock(return_value=err(408, "deadline_exceeded: x"))
    with pytest.raises(WaitTimeout):
        client.wait("m1", timeout=5)
    assert 1 < route.call_count < 30
    assert sum(clock.sleeps) <= 5


def test_wait_stopped_fetches_instance_id(client: MachinesClient, router: respx.Router) -> None:
    router.get(M1).mock(return_value=httpx.Response(200, json=machine_json(instance_id="v7")))
    route = router.get(f"{M1}/wait").mock(return_value=httpx.Response(200, json={"ok": True}))
    client.wait("m1", "stopped")
    assert route.calls.last.request.url.params["instance_id"] == "v7"


def test_wait_404(client: MachinesClient, router: respx.Router) -> None:
    router.get(f"{M1}/wait").mock(return_value=err(404, "machine not found"))
    client.wait("m1", "destroyed")
    with pytest.raises(MachineNotFound):
        client.wait("m1", "started")


def test_wait_retries_429_within_deadline(
    client: MachinesClient, router: respx.Router, clock: FakeClock
) -> None:
    route = router.get(f"{M1}/wait").mock(
        side_effect=[RATE_LIMITED, RATE_LIMITED, httpx.Response(200, json={"ok": True})]
    )
    client.wait("m1", timeout=10)
    assert route.call_count == 3
    route.mock(return_value=RATE_LIMITED)
    with pytest.raises(WaitTimeout, match="rate limit exceeded") as info:
        client.wait("m1", timeout=3)
    assert isinstance(info.value.__cause__, RateLimited)
    with pytest.raises(MachinesAPIError, match="invalid_argument"):
        route.mock(return_value=err(400, "invalid_argument: bad"))
        client.wait("m1", timeout=3)


# -- list -------------------------------------------------------------------------------


def test_list_filters(client: MachinesClient, router: respx.Router) -> None:
    route = router.get(MACHINES).mock(
        return_value=httpx.Response(
            200,
            json=[
                machine_json("a"),
                machine_json("b", state="stopped"),
                machine_json("c", region="ord"),
                machine_json("d", config={"image": "x", "metadata": {"flyworkers_queue": "o"}}),
            ],
        )
    )
    machines = client.list(
        metadata={"flyworkers_queue": "default"}, region="ams", state=["started", "created"]
    )
    # The server ignored the filters here; the client re-applies them.
    assert [m.id for m in machines] == ["a"]
    params = route.calls.last.request.url.params
    assert params["metadata.flyworkers_queue"] == "default"
    assert params["state"] == "started,created"
    assert params["region"] == "ams"
    assert "include_deleted" not in params
    assert len(client.list(include_deleted=True)) == 4
    assert route.calls.last.request.url.params["include_deleted"] == "true"


# -- leases -----------------------------------------------------------------------------


def test_leases(client: MachinesClient, router: respx.Router) -> None:
    lease_body = {
        "status": "success",
        "data": {
            "nonce": "5c35f65c9f95",
            "expires_at": 1708569778,
            "owner": "hello@fly.io",
            "description": "scaler",
            "version": "01HQ",
        },
    }
    route = router.post(f"{M1}/lease").mock(return_value=httpx.Response(201, json=lease_body))
    lease = client.acquire_lease("m1", ttl=60, description="scaler")
    assert lease == Lease(
        nonce="5c35f65c9f95",
        expires_at=datetime.fromtimestamp(1708569778, UTC),
        owner="hello@fly.io",
        description="scaler",
        version="01HQ",
    )
    assert json.loads(route.calls.last.request.content) == {"ttl": 60, "description": "scaler"}
    route.mock(return_value=httpx.Response(201, json=lease_body["data"]))  # flat form
    assert client.acquire_lease("m1").nonce == "5c35f65c9f95"
    route.mock(return_value=httpx.Response(409, json={"error": "aborted: conflict"}))
    with pytest.raises(LeaseHeld):
        client.acquire_lease("m1")
    route.mock(return_value=httpx.Response(200, json={"status": "error", "message": "x"}))
    with pytest.raises(MachinesAPIError, match="invalid_response"):
        client.acquire_lease("m1")

    release = router.delete(f"{M1}/lease").mock(
        return_value=httpx.Response(200, json={"status": "success", "data": {"ok": True}})
    )
    client.release_lease("m1", "5c35f65c9f95")
    assert release.calls.last.request.headers["fly-machine-lease-nonce"] == "5c35f65c9f95"
    release.mock(return_value=err(404, "lease not found"))
    client.release_lease("m1", "5c35f65c9f95")


# -- models -----------------------------------------------------------------------------

GET_EXAMPLE = {
    "id": "a5c5de9ce64ca12",
    "name": "aged-wind-2649",
    "state": "stopped",
    "region": "ord",
    "image_ref": {"registry": "registry-1.docker.io", "repository": "rebelthor/sleep"},
    "instance_id": "1RREBN3T5K95DK9IVP4XHTTPEY2",
    "private_ip": "fdaa:0:18:a7b:196:e274:9ce1:2",
    "created_at": "2023-10-31T02:30:10Z",
    "updated_at": "2023-10-31T02:35:26.123456789Z",
    "config": {
        "image": "rebelthor/sleep:latest",
        "env": {"SECRET": "hunter2"},
        "metadata": {"flyworkers_queue": "default"},
        "init": {"cmd": ["sleep", "inf"]},
    },
    "events": [
        {"type": "launch", "status": "created", "source": "user", "timestamp": 1698719723203},
        {
            "type": "exit",
            "status": "stopped",
            "source": "flyd",
            "timestamp": 1698719730000,
            "request": {"exit_event": {"exit_code": 3, "requested_stop": False}},
        },
        {"type": "start", "status": "started", "source": "flyd", "timestamp": 1698719726615},
    ],
    "some_future_field": {"x": [1, 2]},
}


def test_machine_from_api() -> None:
    m = Machine.from_api(GET_EXAMPLE)
    assert (m.id, m.name, m.state, m.region) == (
        "a5c5de9ce64ca12",
        "aged-wind-2649",
        "stopped",
        "ord",
    )
    assert m.image == "rebelthor/sleep:latest"
    assert m.metadata == {"flyworkers_queue": "default"}
    assert m.created_at == datetime(2023, 10, 31, 2, 30, 10, tzinfo=UTC)
    assert m.updated_at is not None and m.updated_at.microsecond == 123456
    assert [e.type for e in m.events] == ["exit", "start", "launch"]  # newest first
    assert m.last_exit_code == 3
    assert m.last_exit_event is not None and not m.last_exit_event.requested_stop
    assert not m.is_running and not m.is_transient and not m.is_gone
    assert m.raw["some_future_field"]["x"] == (1, 2)
    assert "hunter2" not in repr(m)
    with pytest.raises(TypeError):
        m.config["image"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        m.config["init"]["cmd"] += ("x",)
    copy = m.config_copy()
    copy["init"]["cmd"].append("x")
    assert copy["init"]["cmd"] == ["sleep", "inf", "x"]
    assert m.config["init"]["cmd"] == ("sleep", "inf")
    assert hash(m) == hash(Machine.from_api(GET_EXAMPLE))
    assert m == Machine.from_api(GET_EXAMPLE)


def test_machine_from_api_tolerates_missing_and_unknown() -> None:
    m = Machine.from_api({"id": "x", "state": "hibernating", "events": "nope", "config": None})
    assert m.state == "hibernating" and m.name == "" and m.config == {}
    assert m.events == () and m.last_exit_code is None and m.created_at is None
    m = Machine.from_api(
        {
            "id": "y",
            "host_status": "unreachable",
            "incomplete_config": {"image": "i"},
            "version": "v2",
            "nonce": "n",
            "created_at": "garbage",
        }
    )
    assert (m.image, m.instance_id, m.nonce, m.host_status) == ("i", "v2", "n", "unreachable")
    with pytest.raises(ValueError):
        Machine.from_api({"name": "no id"})


def test_machine_event_monitor_exit_and_states() -> None:
    event = MachineEvent.from_api(
        {
            "type": "exit",
            "status": "stopped",
            "timestamp": 0,
            "request": {"MonitorEvent": {"exit_event": {"exit_code": 0, "requested_stop": True}}},
        }
    )
    assert event.exit_code == 0 and event.requested_stop
    assert event.timestamp == datetime(1970, 1, 1, tzinfo=UTC)
    assert MachineState.REPLACING in MachineState.transient()
    assert MachineState("started") == "started"
    assert Machine.from_api({"id": "z", "state": "destroying"}).is_gone


def test_client_accepts_frozen_config(client: MachinesClient, router: respx.Router) -> None:
    machine = Machine.from_api(GET_EXAMPLE)
    route = router.post(f"{MACHINES}/{machine.id}").mock(
        return_value=httpx.Response(200, json=GET_EXAMPLE)
    )
    client.update(machine.id, machine.config, skip_launch=True)
    assert json.loads(route.calls.last.request.content) == {
        "config": GET_EXAMPLE["config"],
        "skip_launch": True,
    }


# -- retry policy -----------------------------------------------------------------------


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=5.0, jitter=0.0)
    assert [policy.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(10_000) == 5.0
    low = RetryPolicy(jitter=0.5, rand=lambda: 0.999999)
    high = RetryPolicy(jitter=0.5, rand=lambda: 0.0)
    assert low.delay(0) == pytest.approx(0.25, rel=1e-3) and high.delay(0) == 0.5
    assert RetryPolicy.never().max_elapsed == 0
    assert RetryPolicy().with_budget(3).max_elapsed == 3
    for bad in ({"jitter": 2.0}, {"max_elapsed": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_backoff_never_sleeps_past_deadline(clock: FakeClock) -> None:
    policy = RetryPolicy(
        max_elapsed=3.0, base_delay=2.0, jitter=0.0, sleep=clock.sleep, clock=clock.time
    )
    backoff = policy.start()
    delays = []
    while (delay := backoff.next_delay()) is not None:
        delays.append(delay)
        backoff.sleep(delay)
    assert delays == [2.0, 1.0]
    assert backoff.attempts == 3


# -- what Fly's messages mean --------------------------------------------------------------

_PREDICATES = {
    "still_active": fly_errors.is_still_active,
    "started": fly_errors.is_already_started,
    "stopped": fly_errors.is_already_stopped,
    "suspended": fly_errors.is_already_suspended,
}


@pytest.mark.parametrize(
    ("status", "message", "true_for", "state"),
    [
        (412, "failed_precondition: machine still active, refusing to start", {"still_active"},
         None),
        (412, "failed_precondition: machine getting replaced, refusing to start",
         {"still_active"}, None),
        (412, "failed_precondition: unable to start machine from current state: 'created'",
         {"still_active"}, "created"),
        (412, "failed_precondition: unable to start machine from current state: 'replacing'",
         {"still_active"}, "replacing"),
        (412, "failed_precondition: unable to start machine from current state: 'stopping'",
         {"still_active", "stopped"}, "stopping"),
        (412, "failed_precondition: unable to start machine from current state: 'suspending'",
         {"still_active", "suspended"}, "suspending"),
        (412, "failed_precondition: unable to start machine from current state: 'started'",
         {"started"}, "started"),
        (412, "failed_precondition: current state: 'starting'", {"started"}, "starting"),
        (412, "failed_precondition: machine already running", {"started"}, None),
        (412, "failed_precondition: current state: 'stopped'", {"stopped"}, "stopped"),
        (412, "failed_precondition: machine already stopped", {"stopped"}, None),
        (412, "failed_precondition: current state: 'suspended'", {"suspended"}, "suspended"),
        (412, "failed_precondition: machine already suspended", {"suspended"}, None),
        (412, "failed_precondition: unable to suspend machine from current state: 'stopped'",
         {"stopped"}, "stopped"),
        (412, "failed_precondition: could not reserve resource for machine", set(), None),
        (412, "failed_precondition: machine is being destroyed", set(), None),
        # The same words under another status are not a state refusal.
        (409, "aborted: current state: 'stopped'", set(), "stopped"),
        (500, "internal: machine still active", set(), None),
    ],
)  # fmt: skip
def test_state_predicates(status: int, message: str, true_for: set[str], state: str | None) -> None:
    error = error_from_response(status, json.dumps({"error": message}).encode())
    assert {name for name, check in _PREDICATES.items() if check(error)} == true_for
    assert fly_errors.current_state(error) == state


@pytest.mark.parametrize(
    ("status", "body", "taken"),
    [
        (409, {"error": "already_exists: a machine named 'x' already exists"}, True),
        (422, {"error": "machine name is already taken", "status": "name_taken"}, True),
        (400, {"error": "name must be unique"}, True),
        (409, {"error": "aborted: concurrent update"}, False),
    ],
)
def test_name_taken_predicate(status: int, body: dict[str, str], taken: bool) -> None:
    error = error_from_response(status, json.dumps(body).encode())
    assert fly_errors.is_name_taken(error) is taken


def test_suspend_states_are_classified() -> None:
    assert MachineState.SUSPENDING in MachineState.transient()
    assert MachineState.SUSPENDED not in MachineState.transient()
    assert MachineState.startable() == {"created", "stopped", "suspended"}
    suspended = Machine.from_api(machine_json(state="suspended"))
    assert suspended.is_suspended and suspended.is_startable
    assert not suspended.is_running and not suspended.is_transient and not suspended.is_gone
    suspending = Machine.from_api(machine_json(state="suspending"))
    assert suspending.is_transient and not suspending.is_startable
    assert not suspending.is_suspended and not suspending.is_running
    started = Machine.from_api(machine_json())
    assert started.is_running and not started.is_startable


# -- package boundaries -----------------------------------------------------------------


def test_public_surface() -> None:
    import django_flyworkers.machines as machines

    assert sorted(machines.__all__) == sorted(
        [
            "DEFAULT_BASE_URL",
            "Conflict",
            "Lease",
            "LeaseHeld",
            "Machine",
            "MachineEvent",
            "MachineNotFound",
            "MachineState",
            "MachinesAPIError",
            "MachinesClient",
            "PreconditionFailed",
            "RateLimited",
            "Redactor",
            "RetryPolicy",
            "StartResult",
            "TransportError",
            "Unauthorized",
            "WaitTimeout",
            "local_api_socket",
            "redact",
        ]
    )
    for name in machines.__all__:
        assert getattr(machines, name) is not None


def test_imports_nothing_from_django() -> None:
    code = (
        "import sys, django_flyworkers.machines\n"
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_debug_line_per_request(client: MachinesClient, router: respx.Router, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="django_flyworkers.machines")
    router.get(M1).mock(
        return_value=httpx.Response(200, json=machine_json(), headers={"fly-request-id": "R1"})
    )
    client.get("m1")
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG
    text = record.getMessage()
    for part in ("method=GET", f"path=/v1{M1}", "status=200", "elapsed=", "fly_request_id=R1"):
        assert part in text
