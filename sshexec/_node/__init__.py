"""Everything that runs on a node: the agent (``agent``: one per host, forking the
workers and relaying their frames; ``spawn``: how a worker process comes to be), the
worker (``worker``; its command stream and watcher thread: ``commands``), what it looks up while unpickling (``lookups``: blobs, stored
functions, shared objects, the client's script) and its side channels for output,
logging and forwarded modules (``remote_io``), and the object an actor's worker keeps
(``actors``). Shipped to nodes with ``_wire``.
Must not import: any client module, asyncio.
"""
