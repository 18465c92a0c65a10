"""Everything that runs on a node: the worker (``worker``) and its side channels for
output, logging and forwarded modules (``remote_io``). Shipped to nodes with ``_wire``.
Must not import: any client module, asyncio.
"""
