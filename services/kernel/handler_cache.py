"""A server interceptor's wrapped handler per method, built once instead of at every call.

gRPC's asyncio server asks every interceptor for the method's handler at every call, and each
of ours wrapped the handler afresh (a closure and a new ``RpcMethodHandler`` per call, per
interceptor): a few per cent of eligibility's CPU under the claim rush. The handler a servicer
registers for a method is the same object at every call, so the wrapper built for it is kept
and reused while it is; a different handler for the method (a test server re-registering) is
wrapped anew. At most one entry per method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

H = TypeVar("H")  # a grpc.RpcMethodHandler


class HandlerCache(Generic[H]):
    """``get(method, inner)``: ``wrap(method, inner)``, built once per method and inner handler."""

    def __init__(self, wrap: Callable[[str, H], H]) -> None:
        self._wrap = wrap
        self._built: dict[str, tuple[H, H]] = {}

    def get(self, method: str, inner: H) -> H:
        found = self._built.get(method)
        if found is not None and found[0] is inner:
            return found[1]
        wrapped = self._wrap(method, inner)
        self._built[method] = (inner, wrapped)
        return wrapped
