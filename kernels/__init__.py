"""Attention kernels for dfjax: PAF (head groups with their own key lengths) and the dense baseline.

Public API: `from dfjax.kernels.attention import grouped_attention, attention`. (Not re-exported here:
the function `attention` would shadow the module `kernels.attention`.)
"""
