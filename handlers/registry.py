"""Handlers registered by name, loaded from user modules, and called with a step's input.

A handler is `async def f(ctx, **input)`. Registration checks what can be checked
without running it (a valid name, a coroutine function taking `ctx`), so a bad
handler fails at start-up rather than on the first run that reaches it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

from handlers.context import Context, NonRetryableError

Handler = Callable[..., Awaitable[Any]]
ShutdownHook = Callable[[], Awaitable[None]]

# Dots group handlers by area ("orders.reserve"); "-" is allowed for names taken from URLs.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._shutdown_hooks: list[ShutdownHook] = []

    def register(self, name: str, fn: Handler) -> Handler:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"invalid handler name {name!r}: expected letters, digits, '_', '.', '-'")
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"handler {name!r} must be an 'async def' function, got {fn!r}")
        try:
            _signature(fn).bind_partial(None)  # ctx is passed positionally
        except TypeError:
            raise TypeError(f"handler {name!r} must take ctx as its first positional parameter") from None
        existing = self._handlers.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"handler {name!r} is already registered to {_describe(existing)}")
        self._handlers[name] = fn
        return fn

    def get(self, name: str) -> Handler:
        try:
            return self._handlers[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._handlers, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no handler named {name!r}{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def on_shutdown(self, hook: ShutdownHook) -> ShutdownHook:
        """Run `hook` on `aclose()`; usable as a decorator. Hooks run in reverse order."""
        if hook not in self._shutdown_hooks:
            self._shutdown_hooks.append(hook)
        return hook

    async def aclose(self) -> None:
        """Run every shutdown hook, even if some fail, then raise the failures together.

        Hooks stay registered: the server may start another event loop (tests do),
        and a hook closes whatever the current loop owns.
        """
        errors: list[Exception] = []
        for hook in reversed(self._shutdown_hooks):
            try:
                await hook()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise ExceptionGroup("handler shutdown hooks failed", errors)


REGISTRY = Registry()


def handler(name: str, *, registry: Registry = REGISTRY) -> Callable[[Handler], Handler]:
    """Register the decorated `async def f(ctx, **input)` under `name`."""

    def decorate(fn: Handler) -> Handler:
        return registry.register(name, fn)

    return decorate


def load_modules(paths: list[str], registry: Registry = REGISTRY) -> list[str]:
    """Import user modules by dotted path so their `@handler` decorators run.

    Returns the names that appeared in `registry` during the imports (a module
    imported earlier adds nothing, since Python imports it once).
    """
    before = set(registry.names())
    for path in paths:
        try:
            importlib.import_module(path)
        except Exception as exc:
            raise ImportError(f"cannot load handler module {path!r}: {type(exc).__name__}: {exc}", name=path) from exc
    return [name for name in registry.names() if name not in before]


async def invoke(fn: Handler, ctx: Context, input: Any, *, name: str | None = None) -> Any:
    """Call a handler with a step's input: a dict as keyword arguments, None as
    nothing, anything else as `input=value`.

    The arguments are bound to the signature first, so a mismatch is reported as a
    NonRetryableError (a retry would fail the same way) naming the argument, and a
    TypeError raised inside the handler is not mistaken for one.
    """
    if input is None:
        kwargs: dict[Any, Any] = {}
    elif isinstance(input, dict):
        kwargs = input
    else:
        kwargs = {"input": input}
    try:
        _check_binds(fn, tuple(kwargs))
    except TypeError as exc:
        label = name or _describe(fn)
        raise NonRetryableError(
            f"handler {label!r} cannot take this input: {exc}",
            type="InvalidInput",
            details={"handler": label, "reason": str(exc)},
        ) from None
    return await fn(ctx, **kwargs)


# Handlers are few and long-lived, so an unbounded cache is fine and saves
# inspect.signature (tens of microseconds) on every attempt.
@functools.cache
def _signature(fn: Handler) -> inspect.Signature:
    return inspect.signature(fn)


@functools.lru_cache(maxsize=4096)
def _check_binds(fn: Handler, names: tuple[str, ...]) -> None:
    """Raise TypeError if `fn(ctx, **{name: ...})` cannot bind. Binding depends only on the
    argument names, never their values, and a step passes the same names on every run, so
    the answer is cached (Signature.bind costs about 10 us per attempt); failures are not."""
    _signature(fn).bind(None, **dict.fromkeys(names))


def _describe(fn: Handler) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(fn)
