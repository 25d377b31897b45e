"""Each command's settings, described once: :class:`~dynsim.configs.dssm.DSSMConfig` (``run dssm``)
and :class:`~dynsim.configs.ssl.SSLConfig` (``run ssl``, ``study ssl``)."""
