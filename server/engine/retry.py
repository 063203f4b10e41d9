"""Retry delays: exponential backoff with jitter that arrives as an input."""

from __future__ import annotations

from server.definitions.models import RetryPolicy


def backoff_s(policy: RetryPolicy, failed_attempt: int, jitter: float) -> float:
    """Delay before the attempt after `failed_attempt` (1-based).

    `jitter` in [0, 1) spreads the delay over [d*(1-j), d*(1+j)] where j is the
    policy's jitter fraction; 0.5 gives the plain delay.
    """
    base = policy.initial_delay * policy.multiplier ** (failed_attempt - 1)
    delay = min(base, policy.max_delay)
    spread = policy.jitter * (2.0 * jitter - 1.0)
    return max(0.0, delay * (1.0 + spread))


def should_retry(policy: RetryPolicy, attempt: int, error_type: str, retryable: bool) -> bool:
    return retryable and attempt < policy.max_attempts and error_type not in policy.non_retryable
