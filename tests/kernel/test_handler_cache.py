"""An interceptor's wrapper is built once per method and handler, not at every call (and a
fused chain's, services.kernel.rpc.FusedChain)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.kernel.handler_cache import HandlerCache, MethodWrapper
from services.kernel.rpc import FusedChain


def test_a_wrapper_is_built_once_per_method_and_again_for_another_handler() -> None:
    built: list[tuple[str, str]] = []

    def wrap(method: str, inner: str) -> str:
        built.append((method, inner))
        return f"wrapped {inner} for {method}"

    cache: HandlerCache[str] = HandlerCache(wrap)
    first = cache.get("/a/A", "h1")
    assert cache.get("/a/A", "h1") is first  # the same object: nothing built again
    assert cache.get("/b/B", "h2") == "wrapped h2 for /b/B"
    assert cache.get("/a/A", "h3") == "wrapped h3 for /a/A"  # a handler replaced: rewrapped
    assert built == [("/a/A", "h1"), ("/b/B", "h2"), ("/a/A", "h3")]


class _Tagging(MethodWrapper):
    """Wraps the handler it is given in a tuple naming itself, and counts how often it is asked."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.asked = 0

    def wrap(self, method: str, handler: Any) -> Any:
        self.asked += 1
        return (self.tag, handler)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


def test_a_fused_chain_wraps_as_the_chain_would_once_per_method_and_handler() -> None:
    outer, inner = _Tagging("outer"), _Tagging("inner")
    chain = FusedChain([outer, inner])
    registered: dict[str, Any] = {"/a/A": "h1", "/b/B": "h2"}

    async def lookup(details: Any) -> Any:
        return registered.get(details.method)

    async def call(method: str) -> Any:
        return await chain.intercept_service(lookup, _Details(method))  # type: ignore[arg-type]

    async def scenario() -> None:
        first = await call("/a/A")
        assert first == ("outer", ("inner", "h1"))  # the outermost outside, as gRPC chains
        assert await call("/a/A") is first  # built once: the interceptors not asked again
        assert (outer.asked, inner.asked) == (1, 1)
        assert await call("/b/B") == ("outer", ("inner", "h2"))
        registered["/a/A"] = "h3"  # a handler replaced: wrapped anew
        assert await call("/a/A") == ("outer", ("inner", "h3"))
        assert await call("/nowhere/X") is None  # no such method: no handler, none wrapped
        assert (outer.asked, inner.asked) == (3, 3)

    asyncio.run(scenario())
