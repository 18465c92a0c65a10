"""Loop-thread orchestration of one executor's workers: ``pool`` (the facade, losses,
broken-pool detection and shutdown), ``supervisor`` (one per host: planned count,
starting, backoff, down and given up), ``link`` (one worker: start, reader, its end)
and ``dispatch`` (placements to frames, replies to Futures). Must not import:
subprocess or asyncssh, or know frame layout beyond ``_wire.protocol``'s codec.
"""
