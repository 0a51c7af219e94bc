"""The statistics behind the verdicts: scipy.stats, with the few formulas scipy lacks cited.

Every verdict tests the claim's *boundary* b, the value of the effect at which the claim
switches from true to false (the smallest effect that matters, or minus a non-inferiority
margin; for a correlation, the claimed r). One test decides both ways, so VALIDATED and
DISPROVEN are equally strict:

    VALIDATED     the test rejects H0: centre = b with the estimate on the claimed side of b
    DISPROVEN     it rejects H0 with the estimate on the other side
    INCONCLUSIVE  it does not reject; the power analysis says how many trials would

The test is two-sided at alpha unless the rule declares `sides: 1` with its reason; then each
side is tested one-sided at alpha. The reported interval is the one that matches the test: it
excludes b exactly when the test rejects (level 1 - alpha two-sided, 1 - 2 alpha one-sided).

Paired differences are oriented so that d > 0 means "the subject arm is better":
- paired_t:  scipy.stats.ttest_1samp(d, b); centre = mean
- wilcoxon:  scipy.stats.wilcoxon(d - b) (signed-rank, exact at small n); centre = median
- bootstrap: scipy.stats.bootstrap of the mean (percentile, 9999 resamples, fixed rng); the
  p-value is the bootstrap distribution's share beyond b (doubled when two-sided)
Correlations use Fisher's z = atanh(r) with standard error 1 / sqrt(n - 3) (Pearson; scipy's
`pearsonr(...).confidence_interval`) or sqrt(1.06 / (n - 3)) (Spearman; Fieller, Hartley &
Pearson 1957, Biometrika 44:470).
Power ("trials needed"): the noncentral t distribution for the paired t-test (scipy.stats.nct),
scaled by the Wilcoxon test's asymptotic relative efficiency 3/pi where that test decides;
Fisher z with the observed r for correlations (Cohen 1988, ch. 3).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from runner.claims.claim import StatTest

POWER = 0.8  # the power the trials-needed estimate aims for (the common convention)
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # fixed: verdicts must be reproducible from the ledger
MAX_TRIALS = 10_000  # beyond this the power search reports "no trial count decides it"
WILCOXON_ARE = 3 / math.pi  # asymptotic relative efficiency of signed-rank vs t (normal data)
SPEARMAN_VARIANCE = 1.06  # Fieller, Hartley & Pearson (1957): var(atanh rho_s) ~ 1.06/(n-3)

TEST_NAMES = {StatTest.paired_t: "paired t", StatTest.wilcoxon: "Wilcoxon signed-rank",
              StatTest.bootstrap: "bootstrap mean", StatTest.pearson: "Pearson r (Fisher z)",
              StatTest.spearman: "Spearman rho (Fisher z)"}


def sidedness(sides: int) -> str:
    return "two-sided" if sides == 2 else "one-sided"


def smallest_p(test: StatTest, n: int, sides: int) -> float:
    """The smallest p-value `test` can give with n pairs (0 where it has no floor).

    The exact signed-rank test's smallest p is 2^-n one-sided (every difference on one side),
    twice that two-sided: with 3 pairs 0.25 two-sided, 0.125 one-sided.
    """
    if test is StatTest.wilcoxon:
        return min(1.0, sides * 0.5 ** n)
    return 0.0


def min_reachable_n(test: StatTest, alpha: float, sides: int) -> int:
    """The fewest pairs with which `test` can give p < alpha."""
    n = 2
    while smallest_p(test, n, sides) >= alpha:
        n += 1
    return n


@dataclass(frozen=True)
class PairedTest:
    """One paired test on differences d (d > 0: subject better) against the boundary b."""

    test: StatTest
    d: np.ndarray
    alpha: float
    boundary: float
    sides: int = 2

    @property
    def effect(self) -> float:
        centre = np.median if self.test is StatTest.wilcoxon else np.mean
        return float(centre(self.d))

    @property
    def sd(self) -> float:
        return float(np.std(self.d, ddof=1)) if len(self.d) > 1 else math.nan

    @property
    def ci_level(self) -> float:
        return 1 - self.alpha if self.sides == 2 else 1 - 2 * self.alpha

    def one_sided(self, alternative: str) -> float:
        """p for H1: centre(d) > b ('greater') or < b ('less')."""
        b = self.boundary
        if self.test is StatTest.paired_t:
            if self.sd == 0:  # a constant difference: the t statistic is undefined
                holds = self.effect > b if alternative == "greater" else self.effect < b
                return 0.0 if holds else 1.0
            return float(stats.ttest_1samp(self.d, b, alternative=alternative).pvalue)
        if self.test is StatTest.wilcoxon:
            shifted = self.d - b
            if np.all(shifted == 0):
                return 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small-n notices
                return float(stats.wilcoxon(shifted, alternative=alternative).pvalue)
        dist = self._bootstrap().bootstrap_distribution
        return float(np.mean(dist <= b if alternative == "greater" else dist >= b))

    def p_value(self) -> float:
        """The deciding test's p: two-sided, or one-sided on the side of the estimate."""
        greater, less = self.one_sided("greater"), self.one_sided("less")
        if self.sides == 2:
            return min(1.0, 2 * min(greater, less))
        return greater if self.effect >= self.boundary else less

    def ci(self) -> tuple[float, float]:
        if self.sd == 0 or len(self.d) < 2:
            return (self.effect, self.effect)
        if self.test is StatTest.paired_t:
            low, high = stats.ttest_1samp(self.d, 0.0).confidence_interval(self.ci_level)
            return float(low), float(high)
        res = self._bootstrap()
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    def name(self, unit: str = "") -> str:
        b = f"{self.boundary:+g}{' ' + unit if unit else ''}"
        centre = "median" if self.test is StatTest.wilcoxon else "mean"
        return f"{TEST_NAMES[self.test]}, H0: {centre} difference = {b}, {sidedness(self.sides)}"

    def trials_needed(self) -> float:
        """Paired trials for 80% power to reject b if the true effect is the observed one."""
        n = paired_t_trials_needed(self.sd, self.effect - self.boundary, self.alpha, self.sides)
        if self.test is StatTest.wilcoxon and math.isfinite(n):
            n = max(math.ceil(n / WILCOXON_ARE), min_reachable_n(self.test, self.alpha,
                                                                  self.sides))
        return n

    def _bootstrap(self):
        statistic = np.median if self.test is StatTest.wilcoxon else np.mean
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate-distribution notices at tiny n
            return stats.bootstrap((self.d,), statistic, confidence_level=self.ci_level,
                                   n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                                   rng=np.random.default_rng(BOOTSTRAP_SEED))


def t_power(n: int, distance: float, sd: float, alpha: float, sides: int) -> float:
    """Power of the one-sample t-test with n pairs when the true shift is `distance`
    (noncentral t with n - 1 degrees of freedom and noncentrality distance sqrt(n) / sd)."""
    df, nc = n - 1, abs(distance) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / sides, df)
    power = stats.nct.sf(crit, df, nc)
    return float(power + (stats.nct.cdf(-crit, df, nc) if sides == 2 else 0.0))


def paired_t_trials_needed(sd: float, distance: float, alpha: float, sides: int = 2) -> float:
    """The smallest n >= 2 with t_power >= 0.8; inf when the spread or distance is degenerate."""
    if not math.isfinite(sd) or sd <= 0 or distance == 0 or not math.isfinite(distance):
        return math.inf
    low, high = 2, 2
    while t_power(high, distance, sd, alpha, sides) < POWER:
        if high >= MAX_TRIALS:
            return math.inf
        low, high = high, min(2 * high, MAX_TRIALS)
    while low < high:  # power grows with n: bisect for the first n that reaches it
        mid = (low + high) // 2
        low, high = (mid + 1, high) if t_power(mid, distance, sd, alpha, sides) < POWER \
            else (low, mid)
    return float(high)


@dataclass(frozen=True)
class Correlation:
    r: float
    p_value: float  # of H0: rho = boundary
    ci: tuple[float, float]
    ci_level: float
    trials_needed: float  # entries (layers) for 80% power at the observed r
    pearson: tuple[float, float]  # (r, two-sided p of rho = 0), for the record
    spearman: tuple[float, float]


def correlation(x: np.ndarray, y: np.ndarray, test: StatTest, boundary: float, alpha: float,
                sides: int = 2) -> Correlation:
    """Pearson or Spearman r (scipy) tested against rho = boundary on Fisher's z scale."""
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    r = float(pearson.statistic if test is StatTest.pearson else spearman.statistic)
    n = len(x)
    se = math.sqrt((1.0 if test is StatTest.pearson else SPEARMAN_VARIANCE) / (n - 3))
    level = 1 - alpha if sides == 2 else 1 - 2 * alpha
    edge = 1 - 1e-12  # atanh(+-1) is infinite: a perfect sample correlation sits just inside
    z, zb = math.atanh(max(-edge, min(edge, r))), math.atanh(boundary)
    stat = (z - zb) / se
    p = 2 * stats.norm.sf(abs(stat)) if sides == 2 else stats.norm.sf(abs(stat))
    if test is StatTest.pearson:
        ci = pearson.confidence_interval(confidence_level=level)
        interval = (float(ci.low), float(ci.high))
    else:
        half = stats.norm.ppf(0.5 + level / 2) * se
        interval = (math.tanh(z - half), math.tanh(z + half))
    z_sum = stats.norm.ppf(1 - alpha / sides) + stats.norm.ppf(POWER)
    need = (z_sum * se * math.sqrt(n - 3) / abs(z - zb)) ** 2 + 3 if z != zb else math.inf
    return Correlation(r, float(p), interval, level, need,
                       (float(pearson.statistic), float(pearson.pvalue)),
                       (float(spearman.statistic), float(spearman.pvalue)))
