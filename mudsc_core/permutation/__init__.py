"""Permutation merging of models trained separately: MuDSC = matcher x similarity x iteration.

- ``spec``: permutation specs as data (unit groups and the parameter axes that carry them);
- ``permute``: random and given permutations of a state dict by its spec;
- ``similarity``: activation and weight correlations of units, and their dual-space mix;
- ``matching``: the matchers (align, zip) from a similarity to merge/unmerge matrices;
- ``iteration``: the coordinate ascent over unit groups and the merged state's construction;
- ``merge``: the entry point ``merge(models, architecture, method, calibration)`` in named steps.
"""
