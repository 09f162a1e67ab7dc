"""Stable public path of the matchers (``mudsc_core.matching.align_match`` / ``zip_match``).

The code lives in :mod:`mudsc_core.permutation.matching`; integrations and benchmarks outside this
repository import these names from here.
"""

from mudsc_core.permutation.matching import Match, align_match, zip_match, zip_match_reference

__all__ = ["Match", "align_match", "zip_match", "zip_match_reference"]
