"""What both ends agree on: the frame codec and messages (``protocol``) and the payload
layout of calls and results (``calls``). Shipped to nodes. Must not import: asyncio, any
sshexec module outside ``_wire``, or anything beyond the stdlib, msgpack and cloudpickle.
"""
