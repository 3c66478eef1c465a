"""An interceptor's wrapper is built once per method and handler, not at every call."""

from __future__ import annotations

from services.kernel.handler_cache import HandlerCache


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
