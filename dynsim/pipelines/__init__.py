"""Assembled experiments."""
