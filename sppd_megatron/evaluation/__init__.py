"""Evaluation (SPPD section 6.1): Greedy-CoT, MAJ@N, ORM_VOTE@N and ORM_MAX@N on benchmarks.

``harness.evaluate`` generates, grades and scores into a resumable run directory; ``modes`` holds
each mode's selection rule; ``summary`` the accuracy table with Wilson intervals; ``orm`` turns any
process reward model into an outcome reward model; ``cli`` is ``sppd-megatron eval``.
"""
