"""Byte pipes to a host's workers: the protocols the pool sees (``base``), local
subprocesses (``local``), asyncssh (``asyncssh``, with ``route`` for the ssh config,
ProxyJump and host-key diagnostics). Must not import: the pool, tasks or Futures.
"""
