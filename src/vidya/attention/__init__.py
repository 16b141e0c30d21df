"""Paged attention: the metadata a step carries and the pure-torch reference implementation."""
from vidya.attention.metadata import AttentionMetadata
from vidya.attention.paged import paged_attention

__all__ = ["AttentionMetadata", "paged_attention"]
