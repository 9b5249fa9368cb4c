"""One trial's measurement, whatever the objective (``mergekit_rlvr.search.objective``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class Measurement:
    """One trial's measurement. ``values``: objective name -> value."""

    values: Dict[str, float]
    per_query: List[float] = field(default_factory=list)
    generate_s: float = 0.0  # inside engine.generate
    score_s: float = 0.0  # answer extraction, voting, perplexity arithmetic
    stopped_early: bool = False
    accuracy: Optional[float] = None  # majority answer vs the queries' `answer` (reported, never optimized)


#: called after each chunk with (sum of consistencies so far, queries done, total queries);
#: returns True to stop the trial (it cannot reach the Pareto front any more)
StopRule = Callable[[float, int, int], bool]
