"""Distil a CLIP teacher into a small student from cached teacher embeddings."""

__version__ = "0.1.0"
