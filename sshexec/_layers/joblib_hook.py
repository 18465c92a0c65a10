"""Lets ``parallel_config(backend="sshexec")`` find the joblib backend on first use.

Owns: one entry in joblib's table of backends it registers on first use (as it does for
``"dask"``), added only when joblib was imported before sshexec: importing sshexec never
imports joblib. Must not import: joblib, or anything of sshexec beyond this module.
"""

from __future__ import annotations

import sys


def offer() -> None:
    """If ``joblib.parallel`` is loaded, name ``"sshexec"`` in its ``EXTERNAL_BACKENDS`` so
    that ``parallel_config(backend="sshexec")`` imports ``sshexec.joblib`` when first used."""
    parallel = sys.modules.get("joblib.parallel")
    external = getattr(parallel, "EXTERNAL_BACKENDS", None)
    if isinstance(external, dict):
        external.setdefault("sshexec", _register)


def _register() -> None:
    from .. import joblib  # registers the backend

    joblib.register()
