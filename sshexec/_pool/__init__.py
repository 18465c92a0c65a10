"""Loop-thread orchestration of one executor's workers: ``pool`` (the facade, losses,
broken-pool detection and shutdown), ``supervisor`` (one per host: planned count,
starting, backoff, down and given up), ``link`` (one worker: start, reader, its end)
``dispatch`` (placements to frames, replies to Futures) and ``actors``/``actor``
(objects kept in workers of their own, on links the scheduler never sees). Must not import:
subprocess or asyncssh, or know frame layout beyond ``_wire.protocol``'s codec.
"""
