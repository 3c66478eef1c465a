"""A server interceptor's wrapped handler per method, built once instead of at every call.

gRPC's asyncio server asks every interceptor for the method's handler at every call, and each
of ours wrapped the handler afresh (a closure and a new ``RpcMethodHandler`` per call, per
interceptor): a few per cent of eligibility's CPU under the claim rush. The handler a servicer
registers for a method is the same object at every call, so the wrapper built for it is kept
and reused while it is; a different handler for the method (a test server re-registering) is
wrapped anew. At most one entry per method.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

H = TypeVar("H")  # a grpc.RpcMethodHandler
Handler = Any  # grpc.RpcMethodHandler


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


class MethodWrapper(grpc.aio.ServerInterceptor):
    """A server interceptor that decides from the method's name and handler alone, nothing of
    the call: :meth:`wrap` says what the handler becomes (itself when the interceptor has
    nothing to add), and :meth:`intercept_service` keeps it per method (:class:`HandlerCache`).
    Every interceptor of ours has this shape, so several are fused into one by composing their
    ``wrap`` (services.kernel.rpc.FusedChain)."""

    def __init__(self) -> None:
        self._handlers: HandlerCache[Handler] = HandlerCache(self.wrap)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """What ``handler`` of ``method`` becomes under this interceptor (not cached)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        return self._handlers.get(details.method, handler)
