"""One line for a failed Kubernetes API call, for logs, conditions and the CLI.

The Python client's exceptions print a dump (HTTP headers, the JSON body, urllib3's
`HTTPSConnectionPool(...)` and `<... object at 0x...>` reprs); a person needs the API server's
own message, or why there was no answer at all. Used by the operator (kube.py, plugin.py)
and the agent (reportwriter.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def server_message(body: Any, fallback: str = "") -> str:
    """The `message` of the API server's Status body, else `fallback`."""
    try:
        message = json.loads(body or "{}").get("message")
    except (ValueError, TypeError, AttributeError):
        message = None
    return " ".join(str(message or fallback).split())


def no_answer(exc: BaseException) -> str:
    """Why a request got no HTTP answer, in words: 'connection refused', 'timed out', ..."""
    seen: set[int] = set()
    current: Any = exc
    while isinstance(current, BaseException) and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError) or "timed out" in str(current).lower():
            return "timed out"
        if isinstance(current, OSError) and current.strerror:
            return str(current.strerror)[:1].lower() + str(current.strerror)[1:]
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else (current.__cause__ or current.__context__)
    found = _ERRNO.search(str(exc))
    if found:
        text = found.group(1).strip()
        return text[:1].lower() + text[1:]
    if "certificate" in str(exc).lower() or "ssl" in str(exc).lower():
        return "the TLS handshake failed (check the API server's CA in the kubeconfig)"
    return "no answer"


def describe(e: BaseException) -> str:
    """An exception met while talking to the API server, in one line without Python reprs."""
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {server_message(e.body, e.reason or '')}".strip()
    if isinstance(e, (OSError, urllib3.exceptions.HTTPError)):
        return f"the API server did not answer: {no_answer(e)}"
    return " ".join(str(e).split()) or type(e).__name__
