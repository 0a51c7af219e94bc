"""The claim schema in one import: the `Claim` type and its rule hash (`runner.claims.claim`),
loading and validation (`runner.claims.loading`), the metric-path and invariant syntax a rule
is written in (`runner.claims.paths`), and the reachability of a test at a planned number of
trials (`runner.claims.stats`)."""

from runner.claims.claim import (
    CORRELATION_TESTS,
    PAIRED_TESTS,
    Arm,
    Claim,
    Direction,
    Kind,
    StatTest,
    core_rule,
)
from runner.claims.loading import (
    BUDGET_KEYS,
    claim_from_record,
    claim_path,
    load_claim,
    load_claims,
    with_current_wording,
)
from runner.claims.paths import INVARIANT_OPS, invariant_clauses, parse_invariant
from runner.claims.stats import min_reachable_n, smallest_p
from runner.config.paths import CLAIM_DIR

__all__ = [
    "BUDGET_KEYS", "CLAIM_DIR", "CORRELATION_TESTS", "INVARIANT_OPS", "PAIRED_TESTS", "Arm",
    "Claim", "Direction", "Kind", "StatTest", "claim_from_record", "claim_path", "core_rule",
    "invariant_clauses", "load_claim", "load_claims", "min_reachable_n", "parse_invariant",
    "smallest_p", "with_current_wording",
]
