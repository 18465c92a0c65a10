"""The ``sshexec`` command: ``main`` (arguments, ``map``), ``check`` and its ``report``,
``demo``; ``mapcall`` is what ``sshexec map`` runs on the workers. Must not import:
executor internals (only the public ``SSHPoolExecutor``).
"""
