"""Rate limit specifications: ``RateLimit("10/s", burst=20)``, ``RateLimit(2, per=60)``."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from ..errors import ConfigurationError

__all__ = ["LimitSpec", "RateLimit", "as_limits"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*(?:\.\d+)?)\s*([smhd])?\s*$")
# The token bucket script keeps burst x period (in microseconds) below 2**53.
_MAX_CAPACITY = 9 * 10**15


@dataclass(frozen=True, slots=True, init=False)
class RateLimit:
    """``count`` tokens per ``per`` seconds, at most ``burst`` at once.

    ::

        RateLimit("10/s")            # Celery's spelling: "N/s", "N/m", "N/h" (and "N/d")
        RateLimit("100/m", burst=20)
        RateLimit(2, per=60)         # or RateLimit((2, 60))

    ``burst`` defaults to ``count``. A fractional rate such as ``"0.5/s"`` is kept exact
    (1 per 2 s). Anything else raises :class:`ConfigurationError` saying what was wrong.
    """

    count: float
    per: float
    burst: int
    #: The exact rate the bucket script works with: ``n`` tokens per ``period_us`` microseconds.
    n: int = field(repr=False, compare=False)
    period_us: int = field(repr=False, compare=False)

    def __init__(
        self,
        rate: str | int | float | tuple[int | float, int | float],
        per: float | None = None,
        *,
        burst: int | None = None,
    ) -> None:
        count, period = _parse(rate, per)
        if burst is None:
            burst = max(1, math.ceil(count))
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"burst must be a whole number of tokens >= 1, got {burst!r}")
        # The script wants integers: the exact rate as n tokens per period_us microseconds.
        ratio = count / period
        n, period_us = ratio.numerator, ratio.denominator * 10**6
        if burst * period_us > _MAX_CAPACITY:
            raise ConfigurationError(
                f"rate limit {rate!r} with burst {burst} spans too long a time to track exactly: "
                "use a smaller burst or a shorter period"
            )
        object.__setattr__(self, "count", int(count) if count.denominator == 1 else float(count))
        object.__setattr__(self, "per", float(period))
        object.__setattr__(self, "burst", burst)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "period_us", period_us)

    @classmethod
    def from_spec(cls, spec: str) -> RateLimit:
        """The limit a bucket key's :attr:`spec` (``"<n>/<period_us>/<burst>"``) stands for."""
        n, period_us, burst = (int(part) for part in spec.split("/"))
        return cls(n, per=period_us / 10**6, burst=burst)

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.count / self.per

    @property
    def spec(self) -> str:
        """The exact rate and burst, as the bucket's key spells them."""
        return f"{self.n}/{self.period_us}/{self.burst}"

    def __str__(self) -> str:
        return f"{self.count:g}/{self.per:g}s (burst {self.burst})"


def _number(value: object, what: str, spec: object) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigurationError(f"rate limit {spec!r}: {what} must be a number, got {value!r}")
    try:
        number = Fraction(str(value))
    except ValueError:
        raise ConfigurationError(
            f"rate limit {spec!r}: {what} must be a number, got {value!r}"
        ) from None
    if not number > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigurationError(f"rate limit {spec!r}: {what} must be > 0, got {value!r}")
    return number


def _parse(
    rate: str | int | float | tuple[int | float, int | float], per: float | None
) -> tuple[Fraction, Fraction]:
    if isinstance(rate, str):
        if per is not None:
            raise ConfigurationError(f"rate limit {rate!r}: give per= only with a number")
        match = _SPEC.match(rate)
        if match is None:
            raise ConfigurationError(
                f"rate limit {rate!r} is not of the form 'N/s', 'N/m', 'N/h' or 'N/d' "
                "(e.g. '10/s', '100/m')"
            )
        count_text, multiple, unit = match.groups()
        if unit is None:
            raise ConfigurationError(f"rate limit {rate!r}: unknown unit; use s, m, h or d")
        count = _number(count_text, "the count", rate)
        scale = _number(multiple, "the period", rate) if multiple else Fraction(1)
        return count, scale * _UNITS[unit]
    if isinstance(rate, tuple):
        if per is not None or len(rate) != 2:
            raise ConfigurationError(f"rate limit {rate!r}: use a (count, seconds) pair")
        return _number(rate[0], "the count", rate), _number(rate[1], "the period", rate)
    if per is None:
        raise ConfigurationError(
            f"rate limit {rate!r}: give the period too, e.g. RateLimit({rate!r}, per=60)"
        )
    return _number(rate, "the count", rate), _number(per, "the period", rate)


#: What a limit may be given as: a RateLimit, a Celery-style string, or a list of them.
LimitSpec = RateLimit | str | Sequence[RateLimit | str]


def as_limits(limits: LimitSpec) -> tuple[RateLimit, ...]:
    """Normalise one limit or several into RateLimit objects."""
    items = [limits] if isinstance(limits, RateLimit | str) else list(limits)
    if not items:
        raise ConfigurationError("give at least one rate limit")
    return tuple(item if isinstance(item, RateLimit) else RateLimit(item) for item in items)
