"""A column that holds either an http(s) URL or base64 text: one dispatch for every route."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.io.fetch import FetchPolicy, fetch_bytes

T = TypeVar("T", bytes, Iterable[bytes])


def is_url(text: str) -> bool:
    head = text[:8].lower()
    return head.startswith("https://") or head.startswith("http://")


def source_bytes(text: str, *, field: str, policy: FetchPolicy, decode: Callable[[str], T],
                 budget: Budget | None = None, check_head: Callable[[bytes], object] | None = None) -> bytes | T:
    """The bytes a column names: fetched (SSRF-safe, within the request's budget) when it is a URL, else `decode(text)`.
    A fetched file's first bytes go to `check_head` before the rest is read (`fetch_bytes`)."""
    stripped = text.strip()
    if is_url(stripped):
        return fetch_bytes(stripped, policy, field=field, budget=budget, check_head=check_head)
    return decode(stripped)
