"""The token never leaks, whatever a server echoes: the Redactor, and the client that uses it.

Unit cases run the :class:`Redactor` on text as a server, a proxy or a truncation leaves it;
client cases send that text through respx (a server cannot be made to echo our header on
demand) and look at everything a user sees: ``str``, ``repr``, ``args``, tracebacks,
pickles and log records.
"""

from __future__ import annotations

import logging
import pickle
import random
import string
import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import respx

from django_flyworkers.machines import (
    MachinesAPIError,
    MachinesClient,
    RateLimited,
    Redactor,
    RetryPolicy,
    Unauthorized,
    redact,
)
from django_flyworkers.machines.redaction import MIN_FRAGMENT, REPLACEMENT

BASE = "http://fly.test"
APP = "app"
MACHINES = f"/apps/{APP}/machines"
M1 = f"{MACHINES}/m1"

_B64 = string.ascii_letters + string.digits + "+/"
_rng = random.Random(20240619)


def _macaroon(length: int) -> str:
    return "fm2_lJPE" + "".join(_rng.choice(_B64) for _ in range(length)) + "=="


FIRST, SECOND = _macaroon(180), _macaroon(140)
TOKEN = f"FlyV1 {FIRST},{SECOND}"
"""A deploy token shaped like Fly's: two comma-separated fm2_ macaroons under FlyV1."""


def fragments(token: str = TOKEN) -> set[str]:
    """Every run of MIN_FRAGMENT characters of the token: none may appear in shown text."""
    return {token[i : i + MIN_FRAGMENT] for i in range(len(token) - MIN_FRAGMENT + 1)}


def leaked(text: str, token: str = TOKEN) -> list[str]:
    return sorted(gram for gram in fragments(token) if gram in text)


# -- the Redactor on its own --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "echo"),
    [
        ("whole token", TOKEN),
        ("authorization header", f"Authorization: {TOKEN}"),
        ("token without scheme", f"{FIRST},{SECOND}"),
        ("first macaroon", FIRST),
        ("second macaroon", SECOND),
        ("first macaroon without fm2_", FIRST.removeprefix("fm2_")),
        ("second macaroon without fm2_", SECOND.removeprefix("fm2_")),
        ("macaroons space-separated", f"{FIRST} {SECOND}"),
        ("percent-encoded", quote(TOKEN, safe="")),
        ("percent-encoded macaroon", quote(SECOND, safe="")),
        ("twice", f"{SECOND} and again {SECOND}"),
    ],
)
def test_every_spelling_of_the_token_is_removed(name: str, echo: str) -> None:
    text = f'{{"error": "unauthenticated: bad token {echo} (check it)"}}'
    cleaned = Redactor(TOKEN)(text)
    assert leaked(cleaned) == [], name
    assert REPLACEMENT in cleaned
    assert cleaned.startswith('{"error": "unauthenticated: bad token ')
    assert cleaned.endswith(' (check it)"}')


@pytest.mark.parametrize("keep", [MIN_FRAGMENT, 9, 20, 100, len(FIRST) - 1])
def test_a_head_cut_off_by_truncation_is_removed(keep: int) -> None:
    # errors are cut at 500 (with "…") or 120 (inside a repr) characters.
    for text in (f"bad token {FIRST[:keep]}…", f"body: 'bad token {FIRST[:keep]}'"):
        assert leaked(Redactor(TOKEN)(text)) == [], text
    assert leaked(Redactor(TOKEN)(f"bad token {FIRST[:keep]}")) == []


@pytest.mark.parametrize("keep", [MIN_FRAGMENT, 9, 50, len(SECOND) - 1])
def test_a_tail_cut_off_at_the_front_is_removed(keep: int) -> None:
    for text in (SECOND[-keep:] + " was rejected", "…" + SECOND[-keep:] + "'"):
        assert leaked(Redactor(TOKEN)(text)) == [], text


def test_a_head_of_the_whole_header_is_removed() -> None:
    # Cut 12 characters into "FlyV1 fm2_...": only 6 of them belong to the macaroon.
    text = "header was " + TOKEN[:12]
    assert leaked(Redactor(TOKEN)(text)) == []


def test_pieces_shorter_than_eight_characters_are_kept() -> None:
    text = f"bad token {FIRST[: MIN_FRAGMENT - 1]}"
    assert Redactor(TOKEN)(text) == text


def test_readable_names_survive_a_readable_placeholder_token() -> None:
    # The test token shares a head with Machine names; a name is not an echo of it.
    redactor = Redactor("flyworkers-test-token")
    message = "a machine named 'flyworkers-default-1a2b3c4d' already exists in app 'app'"
    assert redactor(message) == message
    assert redactor("echo: flyworkers-test-token") == f"echo: {REPLACEMENT}"
    assert redactor("echo: flyworkers-test-tok") == f"echo: {REPLACEMENT}"


def test_short_or_missing_tokens_change_nothing() -> None:
    assert Redactor("T")("a T b") == "a T b"
    assert Redactor(None)("anything") == "anything"
    assert not Redactor("short") and Redactor(TOKEN)
    assert redact("x " + SECOND, TOKEN) == f"x {REPLACEMENT}"


def test_redactor_repr_and_bytes() -> None:
    redactor = Redactor(TOKEN)
    assert leaked(repr(redactor)) == [] and "fm2_" not in repr(redactor)
    body = f'{{"error": "{SECOND}"}}'.encode()
    assert leaked(redactor.redact_bytes(body).decode()) == []
    untouched = b'{"error": "nothing here"}'
    assert redactor.redact_bytes(untouched) is untouched


# -- the client: errors and logs ------------------------------------------------------------


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=f"{BASE}/v1", assert_all_called=False)


@pytest.fixture
def client(router: respx.Router) -> Iterator[MachinesClient]:
    fake = {"now": 0.0}

    def sleep(seconds: float) -> None:
        fake["now"] += seconds

    policy = RetryPolicy(max_elapsed=5.0, sleep=sleep, clock=lambda: fake["now"], rand=lambda: 1.0)
    with MachinesClient(
        BASE, TOKEN, APP, transport=httpx.MockTransport(router.handler), retry=policy
    ) as c:
        yield c


def shown(error: BaseException) -> list[str]:
    """Everything of an error a user or a log can see."""
    texts = [str(error), repr(error), "".join(traceback.format_exception(error))]
    texts += [str(arg) for arg in error.args]
    texts.append(repr(pickle.loads(pickle.dumps(error)).__dict__))
    texts.append(repr(error.__dict__))
    if error.__cause__ is not None:
        texts.append(str(error.__cause__))
    return texts


def _echo_at_500(echo: str, keep: int) -> str:
    """A message that Fly's 500-character cut splits ``keep`` characters into ``echo``."""
    prefix = "unauthenticated: token rejected: "
    return prefix + "x" * (500 - len(prefix) - keep) + echo


@pytest.mark.parametrize(
    ("name", "response"),
    [
        ("json whole", httpx.Response(401, json={"error": f"unauthenticated: bad {TOKEN}"})),
        ("json no prefix", httpx.Response(401, json={"error": f"bad {FIRST[4:]}"})),
        ("json each macaroon", httpx.Response(401, json={"error": f"{FIRST} / {SECOND}"})),
        ("plain text header", httpx.Response(401, text=f"authorization: {TOKEN}\n")),
        ("lease envelope", httpx.Response(401, json={"status": "error", "message": SECOND})),
        ("cut at 500 (9)", httpx.Response(401, json={"error": _echo_at_500(FIRST, 9)})),
        ("cut at 500 (60)", httpx.Response(401, json={"error": _echo_at_500(TOKEN, 60)})),
        ("cut at 500 text", httpx.Response(401, text=_echo_at_500(SECOND, 30))),
        ("detail", httpx.Response(403, json={"detail": f"no access for {SECOND}"})),
    ],
)
def test_a_401_that_echoes_the_token_leaks_nothing(
    client: MachinesClient, router: respx.Router, caplog: Any, name: str, response: httpx.Response
) -> None:
    caplog.set_level(logging.DEBUG)
    router.get(M1).mock(return_value=response)
    with pytest.raises(Unauthorized) as info:
        client.get("m1")
    for text in shown(info.value):
        assert leaked(text) == [], name
    assert leaked(caplog.text) == []
    assert info.value.status == response.status_code


def test_a_retried_echo_leaks_nothing_into_warnings(
    client: MachinesClient, router: respx.Router, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = httpx.Response(429, json={"error": f"resource_exhausted: rate limit for {SECOND}"})
    route = router.get(M1).mock(return_value=echo)
    with pytest.raises(RateLimited) as info:
        client.get("m1")
    assert route.call_count > 1
    assert "retrying" in caplog.text
    assert leaked(caplog.text) == []
    for text in shown(info.value):
        assert leaked(text) == []


@pytest.mark.parametrize("keep", [8, 25, 70])
def test_malformed_json_cut_at_120_leaks_nothing(
    client: MachinesClient, router: respx.Router, keep: int
) -> None:
    body = "<html>" + "y" * (120 - 6 - keep) + TOKEN + "</html>"
    router.get(M1).mock(return_value=httpx.Response(200, text=body))
    with pytest.raises(MachinesAPIError) as info:
        client.get("m1")
    assert info.value.code == "invalid_response"
    for text in shown(info.value):
        assert leaked(text) == []


def test_action_error_and_transport_error_leak_nothing(
    client: MachinesClient, router: respx.Router, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    router.post(f"{M1}/stop").mock(
        return_value=httpx.Response(200, json={"status": "error", "message": f"no: {FIRST}"})
    )
    router.post(f"{M1}/start").mock(side_effect=httpx.ConnectError(f"refused {TOKEN}"))
    errors: list[MachinesAPIError] = []
    for call in (lambda: client.stop("m1"), lambda: client.start("m1")):
        with pytest.raises(MachinesAPIError) as info:
            call()
        errors.append(info.value)
    for error in errors:
        for text in shown(error):
            assert leaked(text) == []
    assert leaked(caplog.text) == []


def test_client_exposes_its_redactor(client: MachinesClient) -> None:
    assert leaked(client.redact(f"stored detail: {SECOND[:40]}")) == []
    assert leaked(repr(client)) == []
