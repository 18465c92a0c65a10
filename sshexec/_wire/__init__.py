"""What both ends agree on: the frame codec and messages (``protocol``), the payload
layout of calls and results (``calls``) and of shared objects (``shared``). Shipped to
nodes. Must not import: asyncio, any sshexec module outside ``_wire``, or anything
beyond the stdlib, msgpack and cloudpickle.
"""
