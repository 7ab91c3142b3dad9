"""Attention kernels for dfjax: PAF (head groups with their own key lengths) and the dense baseline."""

from kernels.attention import attention, grouped_attention, reference_attention

__all__ = ["attention", "grouped_attention", "reference_attention"]
