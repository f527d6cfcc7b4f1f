"""Per HTTP request of `vllm serve`: the layout of each prompt, from the renderer to the middleware.

vLLM reports `usage.prompt_tokens` as the positions its engine read. The renderer knows what
the client sent and how it was laid out; the middleware rewrites the response's usage
(`extemb_vllm/usage.py`). They meet through a context variable: the middleware opens a list per
request before vLLM handles it, the renderer appends one layout per prompt it renders (asyncio
tasks started for the request inherit the context, so they append to the same list).

    layouts = accounting.open_request()   # middleware
    accounting.add(layout)                # renderer, once per prompt
"""

from __future__ import annotations

from contextvars import ContextVar

_layouts: ContextVar[list[dict] | None] = ContextVar("extemb_layouts", default=None)


def open_request() -> list[dict]:
    layouts: list[dict] = []
    _layouts.set(layouts)
    return layouts


def add(layout: dict) -> None:
    """One prompt's layout (`usage.prompt_layout`); outside an HTTP request (offline), nothing."""
    layouts = _layouts.get()
    if layouts is not None:
        layouts.append(layout)
