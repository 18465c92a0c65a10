"""Byte pipes to a host's workers: the protocols the pool sees (``base``), local
subprocesses (``local``), asyncssh (``asyncssh``, with ``route`` for the ssh config,
ProxyJump and host-key diagnostics) and the OpenSSH client binary (``openssh``, with
``ssh_command`` for its command line and its exit-255 diagnostics). Must not import: the
pool, tasks or Futures.
"""
