"""Deprecated name of :mod:`dynsim.ssl.signals` (``ContrastiveSettler`` is :class:`ContrastiveSignals`)."""

from dynsim.ssl.signals import ContrastiveSignals, Plan, SSLStep  # noqa: F401

ContrastiveSettler = ContrastiveSignals
