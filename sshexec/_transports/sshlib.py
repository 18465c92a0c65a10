"""asyncssh, imported quietly: the one place sshexec imports it.

Owns: importing asyncssh with the deprecation warnings its import triggers in the
libraries under it (cryptography 51 warns five times about DSA, which asyncssh still
registers) kept from the user's stderr: they are about asyncssh, not about the user's
code, and the user can do nothing about them. Warnings at any later use still show.
Must not import: anything of sshexec's.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # attributed to asyncssh's modules (stacklevel=2 in cryptography's module __getattr__)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"asyncssh(\.|$)")
    warnings.filterwarnings("ignore", message=r".*is deprecated", module=r"asyncssh(\.|$)")
    import asyncssh as asyncssh

__all__ = ["asyncssh"]
