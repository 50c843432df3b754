"""Step-time statistics: quartiles, the paired ratio of two alternated variants, and the call it allows.

Variants are stepped in turn, so step ``i`` of one and step ``i`` of another ran under the same machine load:
their ratio cancels the drift that makes two separate medians flip from run to run on a shared CPU. A call
("faster", "slower", "as fast as") is made only when a distribution-free interval of the median ratio says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95  # coverage of the interval around the median ratio
SAME_WITHIN = 0.05  # an interval inside 1 +- this reads "as fast as"
MIN_PAIRS = 6  # the fewest paired steps whose widest interval (min..max) reaches CONFIDENCE: 1 - 2 / 2**6


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); NaNs for no data."""
    if not xs:
        return (float("nan"),) * 3
    if len(xs) == 1:
        return (xs[0],) * 3
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """``a[i] / b[i]`` for the steps both ran (the rounds they were alternated in)."""
    return [x / y for x, y in zip(a, b) if y > 0]


def median_interval(xs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """An interval holding the median of the distribution ``xs`` came from with probability >= ``confidence``
    (order statistics of the sign test: no assumption on the distribution); None when ``xs`` is too short."""
    n = len(xs)
    tail = (1.0 - confidence) / 2
    k, below = 0, 0.0  # k: how many order statistics can be dropped from each end
    while True:
        below += math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) <= k)
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    s = sorted(xs)
    return s[k - 1], s[n - k]


@dataclass(frozen=True)
class Call:
    """What the paired step-time ratios of a variant against a baseline allow one to say."""

    n: int  # paired steps
    median: float
    low: float | None  # the CONFIDENCE interval of the median ratio (None: too few pairs)
    high: float | None
    outcome: str  # "faster", "slower", "same", "noisy" (the interval spans 1) or "few" (below MIN_PAIRS)

    @property
    def short(self) -> str:
        """A table cell: the outcome in a word or two."""
        return {"faster": "faster", "slower": "slower", "same": "same", "noisy": "too noisy", "few": "too few"}[
            self.outcome
        ]

    def interval(self) -> str:
        return "-" if self.low is None else f"{self.low:.2f}-{self.high:.2f}x"

    def text(self) -> str:
        """The call in words, e.g. ``faster, 0.82x its step time (95% interval 0.78-0.90x over 30 paired steps)``."""
        ratio = f"{self.median:.2f}x its step time"
        where = f"{100 * CONFIDENCE:.0f}% interval {self.interval()} over {self.n} paired steps"
        if self.outcome == "few":
            return f"too noisy to call, {ratio} over only {self.n} paired steps (at least {MIN_PAIRS} needed)"
        if self.outcome == "noisy":
            return f"too noisy to call, {ratio} but the {where} spans 1.00x"
        if self.outcome == "same":
            return f"as fast within {100 * SAME_WITHIN:.0f}%, {ratio} ({where})"
        return f"{self.outcome}, {ratio} ({where})"


def call(a: list[float], b: list[float]) -> Call | None:
    """The call on ``a``'s step times against ``b``'s, paired step by step; None without a single pair."""
    r = paired_ratios(a, b)
    if not r:
        return None
    med = statistics.median(r)
    iv = median_interval(r) if len(r) >= MIN_PAIRS else None
    if iv is None:
        return Call(len(r), med, None, None, "few")
    lo, hi = iv
    if 1 - SAME_WITHIN <= lo and hi <= 1 + SAME_WITHIN:
        outcome = "same"
    elif hi < 1:
        outcome = "faster"
    elif lo > 1:
        outcome = "slower"
    else:
        outcome = "noisy"
    return Call(len(r), med, lo, hi, outcome)
