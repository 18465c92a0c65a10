"""Loop-thread orchestration of one executor's workers: ``pool`` (the facade and
shutdown) and ``link`` (one worker as the pool sees it). Must not import: subprocess or
asyncssh, or know frame layout beyond ``_wire.protocol``'s codec.
"""
