"""How a bare ``python3`` on a node becomes the host's sshexec agent.

Owns: the one-line loader on the command line, the stage-1 program it reads from
stdin, the bundle stage 1 receives on stdin (every module of ``sshexec._wire`` and
``sshexec._node``, found by listing those folders, plus cloudpickle and msgpack's
pure-Python modules, in a zip imported from memory), the bundle's hash, the node's
optional cache under ``~/.cache/sshexec`` and the choice of remote interpreter. Stage
1 ends by running the node agent (``_node.agent``), which forks the workers; a worker
the agent spawns instead (no fork) runs stage 1 too, with ``SSHEXEC_ROLE=worker``: the
bundle then follows on its stdin with no handshake. A node's own msgpack (>= 1.0,
usually compiled) and its own cloudpickle of exactly the bundled version are imported
instead of the bundle's copies: faster codec, byte-code cached. Must not import:
asyncio, asyncssh, or know about tasks.

Handshake on the channel, before any frame::

    host:  stage 1 source (its length is in the loader's command line)
    node:  [shell chatter] START_MARKER  b"H"            (cache hit, verified by hash)
    node:  [shell chatter] START_MARKER  b"N"            (needs the bundle)
    host:  8-byte big-endian length + bundle zip          (only after b"N")
    node:  [shell chatter] START_MARKER  b"V" + version   (wrong Python: nothing more)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import marshal
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Final, Mapping, Optional, Sequence, Tuple

import cloudpickle
import msgpack

from ._wire import protocol

CACHE_DIR: Final = "~/.cache/sshexec"
BUNDLE_LENGTH_BYTES: Final = 8
MISSING_PYTHON_EXIT: Final = 127
MISSING_CWD_EXIT: Final = 125
CWD_ERROR: Final = "sshexec: cannot change to the working directory"
HAVE, NEED, NEED_SOURCE, WRONG_VERSION = b"H", b"N", b"n", b"V"
OLDEST: Final = (3, 9)  # the oldest Python a node may run
SHIPPED: Final = ("_wire", "_node")  # the sshexec folders a node runs, nothing else

# Runs on the node's interpreter, which may be any Python 3: keep it 3.6-compatible
# so that a wrong version is *reported* rather than a SyntaxError.
_STAGE1: Final = r"""
import sys, os, hashlib, io, zipfile
V, M, C = %(version)r, %(marker)r, %(cache)r
R = os.environ.pop('SSHEXEC_ROLE', '')
if sys.version_info[:2] < %(oldest)r:
    os.write(1, M + b'V' + ('%%d.%%d.%%d' %% sys.version_info[:3]).encode())
    sys.exit(3)
S = '%%d.%%d' %% sys.version_info[:2] == V  # the client's version: compiled code helps
H = %(hash)r if S else %(source_hash)r
def rd(n):
    b = b''
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit(4)
        b += c
    return b
def cached():
    d = os.path.expanduser(C)
    p = os.path.join(d, H + '.zip')
    try:
        st = os.stat(d)
        if st.st_uid == os.getuid() and not st.st_mode & 0o077:
            with open(p, 'rb') as f:
                z = f.read()
            if hashlib.sha256(z).hexdigest() == H:
                return z
    except OSError:
        pass
def cache(z):
    d = os.path.expanduser(C)
    p = os.path.join(d, H + '.zip')
    try:
        os.makedirs(d, 0o700, exist_ok=True)
        st = os.stat(d)
        if st.st_uid == os.getuid() and not st.st_mode & 0o077:
            t = '%%s.%%d.tmp' %% (p, os.getpid())
            with open(os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 'wb') as f:
                f.write(z)
            os.replace(t, p)
    except OSError:
        pass
if R == 'worker':  # spawned by the agent: the bundle follows on stdin, no handshake
    z = rd(int.from_bytes(rd(%(length_bytes)d), 'big'))
else:
    z = cached()
    os.write(1, M + (b'H' if z else b'N' if S else b'n'))
    if z is None:
        z = rd(int.from_bytes(rd(%(length_bytes)d), 'big'))
        if hashlib.sha256(z).hexdigest() != H:
            sys.exit('sshexec: bundle hash mismatch')
        cache(z)
import importlib.abc, importlib.util, marshal
def own(name, ok):
    try:
        if ok(__import__(name)):
            return True
    except Exception:
        pass
    for k in [k for k in sys.modules if k == name or k.startswith(name + '.')]:
        del sys.modules[k]
    return False
K = set(n for n, ok in (
    ('msgpack', lambda m: tuple(m.version) >= (1, 0, 0)),
    ('cloudpickle', lambda m: m.__version__ == %(cloudpickle)r),
) if own(n, ok))
Z = zipfile.ZipFile(io.BytesIO(z))
N = set(Z.namelist())
class L(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in K:
            return None
        b = name.replace('.', '/')
        for fn, pkg in ((b + '/__init__.py', True), (b + '.py', False)):
            if fn in N:
                return importlib.util.spec_from_loader(name, self, origin='sshexec-bundle/' + fn, is_package=pkg)
    def create_module(self, spec):
        return None
    def exec_module(self, m):
        fn = m.__spec__.origin
        c = fn[15:] + 'c'
        b = Z.read(c) if c in N else b''
        if b[:4] == importlib.util.MAGIC_NUMBER:
            code = marshal.loads(b[4:])
        else:
            code = compile(Z.read(fn[15:]), fn, 'exec')
        exec(code, m.__dict__)
sys.meta_path.insert(0, L())
sys.dont_write_bytecode = True
if R == 'worker':
    import sshexec._node.worker
    sshexec._node.worker.main(os.environ.pop('SSHEXEC_BLOBS', None))
import sshexec._node.agent
sshexec._node.agent.main(b, z)
"""

# The bundle's package holds only what a worker needs. Code on the node that imports
# sshexec's public names (a forwarded module with ``from sshexec import ...`` at its
# top) gets them from ``_public``, the real ``__init__``, whose own imports are then
# forwarded from the client like any other module the node lacks.
_BUNDLE_INIT: Final = '''"""sshexec worker bundle: only the modules a node needs."""


def __getattr__(name):
    if name.startswith("_"):  # private names are submodules: let the import system find them
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(__name__ + "._public"), name)
'''


def client_version() -> str:
    return "%d.%d" % sys.version_info[:2]


def _package_files(module: object) -> Sequence[Tuple[str, Path]]:
    # Only *.py files: msgpack's C extension stays behind; a node without msgpack of
    # its own imports the pure-Python fallback.
    root = Path(module.__file__).parent  # type: ignore[attr-defined]
    return [(f"{root.name}/{path.name}", path) for path in sorted(root.glob("*.py"))]


def _compiled(name: str, source: bytes) -> bytes:
    """``name.pyc`` of the bundle: this interpreter's magic number, then the marshalled
    code. Nodes run the client's minor version, so they load it without compiling (about
    20 ms of start-up for a bare node); one whose magic number differs compiles the
    source instead."""
    code = compile(source, "sshexec-bundle/" + name, "exec", dont_inherit=True, optimize=0)
    # marshal format 2 has no back-references, whose flags follow reference counts at
    # dump time (format 4 gave two different bundles in one 3.9 process): the bundle,
    # and so its hash and the node's cache file, must not change between runs.
    return importlib.util.MAGIC_NUMBER + marshal.dumps(code, 2)


@functools.lru_cache(maxsize=2)
def bundle(compiled: bool = True) -> bytes:
    """The zip shipped to nodes; deterministic, so its hash names it in the node cache.
    ``compiled``: with this interpreter's byte code beside the sources, for a node of the
    client's version; a node of another version gets the sources alone."""
    here = Path(__file__).parent
    entries = [
        ("sshexec/__init__.py", _BUNDLE_INIT.encode()),
        ("sshexec/_public.py", (here / "__init__.py").read_bytes()),
    ]
    for folder in SHIPPED:  # what runs on a node is these folders, whole
        for path in sorted((here / folder).glob("*.py")):
            entries.append((f"sshexec/{folder}/{path.name}", path.read_bytes()))
    for module in (cloudpickle, msgpack):
        entries.extend((name, path.read_bytes()) for name, path in _package_files(module))
    if compiled:
        entries += [(name + "c", _compiled(name, data)) for name, data in entries]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


@functools.lru_cache(maxsize=2)
def bundle_hash(compiled: bool = True) -> str:
    return hashlib.sha256(bundle(compiled)).hexdigest()


def bundle_message(compiled: bool = True) -> bytes:
    """What the host writes after the node answers ``NEED`` (``compiled``) or
    ``NEED_SOURCE``."""
    data = bundle(compiled)
    return len(data).to_bytes(BUNDLE_LENGTH_BYTES, "big") + data


@functools.lru_cache(maxsize=1)
def stage1_code() -> bytes:
    """Stage 1, written to the interpreter's stdin right after the channel opens."""
    code = _STAGE1 % {
        "hash": bundle_hash(),
        "source_hash": bundle_hash(compiled=False),
        "oldest": OLDEST,
        "version": client_version(),
        "marker": protocol.START_MARKER,
        "cache": CACHE_DIR,
        "length_bytes": BUNDLE_LENGTH_BYTES,
        "cloudpickle": cloudpickle.__version__,
    }
    return code.encode()


def loader() -> str:
    """The only code on the command line: read exactly len(stage 1) bytes of stdin, run them."""
    n = len(stage1_code())
    return (
        f"import os;b=b'';exec('while len(b)<{n}:b+=os.read(0,{n}-len(b)) or os._exit(4)');exec(b)"
    )


def interpreters(python: Optional[str]) -> Tuple[str, ...]:
    """Remote interpreters to try, in order: the one asked for, else python3.X then python3."""
    if python:
        return (python,)
    return (f"python{client_version()}", "python3")


def shell_path(path: str) -> str:
    """``path`` as one sh word; a leading ``~/`` becomes ``"$HOME"/`` (quoting stops ``~``)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def remote_command(
    python: Optional[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None
) -> str:
    """The SSH exec command: ``remote_script`` wrapped in ``/bin/sh -c`` so it also works
    for users whose login shell is not POSIX."""
    return f"exec /bin/sh -c {shlex.quote(remote_script(python, env, cwd))}"


def remote_script(
    python: Optional[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None
) -> str:
    """A POSIX sh script that starts stage 1 with the first candidate interpreter found.

    ``cwd`` is entered first (exit ``MISSING_CWD_EXIT`` when it cannot be), then ``env`` is
    exported, so an ``env`` ``PATH`` also applies to finding the interpreter. Values are
    literal: sshd's ``AcceptEnv`` is not needed, and nothing is expanded."""
    code = shlex.quote(loader())
    candidates = interpreters(python)
    listed = " ".join(shlex.quote(p) for p in candidates)
    setup = ""
    if cwd:
        where = shell_path(cwd)
        setup += (
            f"cd -- {where} 2>/dev/null || "
            f"{{ printf '%s: %s\\n' {shlex.quote(CWD_ERROR)} {where} >&2; exit {MISSING_CWD_EXIT}; }}; "
        )
    for name, value in (env or {}).items():
        setup += f"export {name}={shlex.quote(value)}; "
    return (
        f"{setup}for p in {listed}; do "
        f'if command -v "$p" >/dev/null 2>&1; then exec "$p" -c {code}; fi; done; '
        f"echo 'sshexec: no usable Python on PATH (tried {' '.join(candidates)})' >&2; "
        f"exit {MISSING_PYTHON_EXIT}"
    )


def local_argv(python: Optional[str] = None) -> Sequence[str]:
    """argv for a worker on this machine: no shell, same stage 1."""
    return [python or sys.executable, "-c", loader()]
