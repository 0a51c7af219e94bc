"""The statistics behind the verdicts: thin wrappers over scipy.stats, nothing hand-rolled.

Paired differences are oriented so that d > 0 means "the subject arm is better" (for a
lower-is-better metric d = baseline - subject). Every one-sided p-value is for an alternative
about the centre of d relative to a shift c:

    p(d, c, "greater") tests H1: centre(d) > c      p(d, c, "less") tests H1: centre(d) < c

- paired_t:  scipy.stats.ttest_1samp(d, c)  (== ttest_rel(subject, baseline + c)); centre = mean
- wilcoxon:  scipy.stats.wilcoxon(d - c) (signed-rank); centre = median
- bootstrap: scipy.stats.bootstrap of the mean (percentile, 9999 resamples, fixed rng); the
  one-sided p is the share of the bootstrap distribution on the wrong side of c
The reported interval is the two-sided (1 - 2 alpha) interval, the one that matches one-sided
tests at alpha (and TOST): a one-sided test rejects exactly when the interval clears c.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from runner.claims.schema import StatTest

POWER = 0.8  # the power the trials-needed estimate aims for (the common convention)
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # fixed: verdicts must be reproducible from the ledger


@dataclass(frozen=True)
class PairedTest:
    """One paired test on differences d (d > 0: subject better)."""

    test: StatTest
    d: np.ndarray
    alpha: float

    @property
    def effect(self) -> float:
        centre = np.median if self.test is StatTest.wilcoxon else np.mean
        return float(centre(self.d))

    @property
    def sd(self) -> float:
        return float(np.std(self.d, ddof=1)) if len(self.d) > 1 else math.nan

    def p(self, shift: float, alternative: str) -> float:
        """One-sided p-value for H1: centre(d) > shift ('greater') or < shift ('less')."""
        if self.test is StatTest.paired_t:
            if self.sd == 0:  # a constant difference: the t statistic is undefined
                return _degenerate_p(self.effect, shift, alternative)
            return float(stats.ttest_1samp(self.d, shift, alternative=alternative).pvalue)
        if self.test is StatTest.wilcoxon:
            shifted = self.d - shift
            if np.all(shifted == 0):
                return 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small-n normal-approximation notices
                return float(stats.wilcoxon(shifted, alternative=alternative).pvalue)
        dist = self._bootstrap().bootstrap_distribution
        side = dist <= shift if alternative == "greater" else dist >= shift
        return float(np.mean(side))

    def ci(self) -> tuple[float, float]:
        level = 1 - 2 * self.alpha
        if self.sd == 0 or len(self.d) < 2:
            return (self.effect, self.effect)
        if self.test is StatTest.paired_t:
            low, high = stats.ttest_1samp(self.d, 0.0).confidence_interval(level)
            return float(low), float(high)
        res = self._bootstrap()
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    def _bootstrap(self):
        statistic = np.median if self.test is StatTest.wilcoxon else np.mean
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate-distribution notices at tiny n
            return stats.bootstrap((self.d,), statistic, confidence_level=1 - 2 * self.alpha,
                                   n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                                   rng=np.random.default_rng(BOOTSTRAP_SEED))


def _degenerate_p(effect: float, shift: float, alternative: str) -> float:
    """Zero spread: the difference is known exactly, so the test is decided by its sign."""
    holds = effect > shift if alternative == "greater" else effect < shift
    return 0.0 if holds else 1.0


def z_power(alpha: float) -> float:
    """z_{1-alpha} + z_{POWER}: the one-sided normal quantiles in the sample-size formula."""
    return float(stats.norm.ppf(1 - alpha) + stats.norm.ppf(POWER))


def paired_trials_needed(sd: float, distance: float, alpha: float) -> float:
    """n = ((z_{1-alpha} + z_{0.8}) * sd / distance)^2 (one-sample normal approximation)."""
    if not math.isfinite(sd) or sd <= 0 or distance == 0 or not math.isfinite(distance):
        return math.inf
    return (z_power(alpha) * sd / abs(distance)) ** 2


def correlation_n_needed(r_target: float, alpha: float) -> float:
    """Pairs needed to detect |r| = r_target: n = ((z_{1-a} + z_{0.8}) / atanh r)^2 + 3."""
    r = min(abs(r_target), 0.999999)
    if r == 0:
        return math.inf
    return (z_power(alpha) / math.atanh(r)) ** 2 + 3


@dataclass(frozen=True)
class Correlation:
    r: float
    p_claimed: float  # one-sided, in the claimed direction
    ci: tuple[float, float]  # (1 - 2 alpha) interval of r
    pearson: tuple[float, float]  # (r, two-sided p)
    spearman: tuple[float, float]


def correlation(x: np.ndarray, y: np.ndarray, test: StatTest, sign: int,
                alpha: float) -> Correlation:
    """Pearson and Spearman (scipy); `test` picks the one that decides, `sign` its direction."""
    alternative = "greater" if sign > 0 else "less"
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    level = 1 - 2 * alpha
    if test is StatTest.pearson:
        res = stats.pearsonr(x, y, alternative=alternative)
        ci = pearson.confidence_interval(confidence_level=level)  # Fisher z
        r, p, interval = float(res.statistic), float(res.pvalue), (float(ci.low), float(ci.high))
    else:
        res = stats.spearmanr(x, y, alternative=alternative)
        boot = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic,
                               paired=True, vectorized=False, confidence_level=level,
                               n_resamples=2000, method="percentile",
                               rng=np.random.default_rng(BOOTSTRAP_SEED))
        r, p = float(res.statistic), float(res.pvalue)
        interval = (float(boot.confidence_interval.low), float(boot.confidence_interval.high))
    return Correlation(r, p, interval, (float(pearson.statistic), float(pearson.pvalue)),
                       (float(spearman.statistic), float(spearman.pvalue)))
