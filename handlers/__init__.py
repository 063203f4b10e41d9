"""The step-handler SDK: write `async def f(ctx, **input)`, register it with `@handler(name)`."""

from handlers import builtins, http, nats  # noqa: F401  (registers the built-in handlers)
from handlers.context import Context, NonRetryableError
from handlers.registry import REGISTRY, Registry, handler, invoke, load_modules

__all__ = ["Context", "NonRetryableError", "REGISTRY", "Registry", "handler", "invoke", "load_modules"]
