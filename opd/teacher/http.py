"""HTTP with retries for the teacher clients (`server` and `vllm` modes).

A training run must survive a teacher restart: connection errors, timeouts and 5xx answers are
retried with exponential backoff, rotating over the teacher's URLs, until `budget_s` seconds have
passed; then `TeacherUnavailableError` says which URLs failed and how. A 4xx answer is the
client's fault (bad ids, top-k above the server's limit, wrong API key) and is raised at once as
`TeacherRequestError` with the server's message: retrying would not change it.

Test: `pytest tests/integration/test_teacher_server.py`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import httpx

API_KEY_ENV = "OPD_TEACHER_API_KEY"


class TeacherUnavailableError(RuntimeError):
    """The teacher stayed unreachable (or kept failing) for the whole retry budget."""


class TeacherRequestError(RuntimeError):
    """The teacher rejected a request (4xx); the message is the server's explanation."""


class TeacherStoppedError(RuntimeError):
    """An offline job's teacher stopped answering (or rejected a request); the message says what
    the job kept and how to resume."""


@dataclass(frozen=True)
class RetryPolicy:
    budget_s: float = 120.0
    """Keep retrying a failing request for this long (wall clock) before giving up."""
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Bearer token from the argument, else from `$OPD_TEACHER_API_KEY`, else none."""
    api_key = api_key or os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def request_with_retry(
    client: httpx.Client,
    method: str,
    urls: list[str],
    path: str,
    *,
    policy: RetryPolicy,
    first_url: int = 0,
    stats: dict[str, int] | None = None,
    server: str = "opd teacher serve",
    **kwargs,
) -> httpx.Response:
    """`client.request(method, url + path)` on the first URL that answers with a non-5xx.

    Starts at `urls[first_url]` (callers spread load by starting at different URLs) and moves to
    the next URL after each failure. Each failed attempt adds 1 to `stats["retries"]` when given
    (the trainer logs it as `teacher/retries`). `server` is the command that runs the servers
    the client talks to, named when they stay unreachable.
    """
    deadline = time.monotonic() + policy.budget_s
    backoff = policy.first_backoff_s
    failures: list[str] = []
    attempt = 0
    while True:
        url = urls[(first_url + attempt) % len(urls)].rstrip("/") + path
        attempt += 1
        try:
            response = client.request(method, url, **kwargs)
        except (httpx.TransportError, httpx.TimeoutException) as error:
            failures.append(f"{url}: {type(error).__name__}: {error}")
        else:
            if response.status_code < 500:
                if response.status_code >= 400:
                    raise TeacherRequestError(
                        f"teacher at {url} rejected the request (HTTP {response.status_code}): "
                        f"{_error_text(response)}"
                    )
                return response
            failures.append(f"{url}: HTTP {response.status_code}: {_error_text(response)}")
        if stats is not None:
            stats["retries"] = stats.get("retries", 0) + 1
        if time.monotonic() + backoff > deadline:
            raise TeacherUnavailableError(
                f"the teacher at {', '.join(urls)} did not answer {method} {path} after "
                f"{attempt} attempts over {policy.budget_s:g}s (teacher_retry_budget_s); "
                f"last error: {failures[-1]}. Check that the server (`{server} ...`) is running "
                "and reachable, or raise teacher_retry_budget_s."
            )
        time.sleep(backoff)
        backoff = min(backoff * 2, policy.max_backoff_s)


def _error_text(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(payload, dict):
        detail = payload.get("detail") or payload.get("message") or payload.get("error")
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail if detail is not None else payload)[:500]
    return str(payload)[:500]
