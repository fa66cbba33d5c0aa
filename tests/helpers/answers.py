"""Reading a server's JSON answers in tests: a wrong status or a body that is not JSON fails
with an assertion naming the request, the status code and the body, never a JSONDecodeError."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["json_of"]


def json_of(r: httpx.Response, status: int | tuple[int, ...] | None = 200) -> Any:
    """The decoded body of `r`, once its status is `status` (one code, several, or None: any)."""
    wanted = (status,) if isinstance(status, int) else status
    where = f"{r.request.method} {r.request.url} answered {r.status_code}"
    assert wanted is None or r.status_code in wanted, f"{where}, not {status}: {r.text[:2000]!r}"
    try:
        return r.json()
    except ValueError:  # JSONDecodeError, or bytes that are not text
        raise AssertionError(f"{where} with a body that is not JSON: {r.text[:2000]!r}") from None
