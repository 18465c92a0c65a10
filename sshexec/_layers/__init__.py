"""Thin layers over the executor for code not written against ``concurrent.futures``:
``mppool`` (``sshexec.Pool``, ``multiprocessing.Pool``'s API, with ``mpstate`` and
``mpresults``), ``options`` (``SSHPoolExecutor.options()`` views and task limits as
users write them), ``actors`` (``SSHPoolExecutor.actor()``'s proxies; the calls they
send name ``_node.actors``' functions), the helpers of the joblib backend
(``sshexec.joblib``, public, one level up): ``adapters`` (a callback thread),
``byvalue`` (stdlib-only functions sent to workers by value) and ``joblib_hook``
(registration on first use). Must not import: pool internals; only the public
``SSHPoolExecutor``, ``_hosts`` and ``_errors``.
"""
