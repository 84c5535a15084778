"""The worker runtime that travels with a batch job: a small zipapp.

Execute nodes and volunteer hosts rarely have pymw-magic or cloudpickle
installed, so every batch job ships ``pymw-runtime.pyz``: the one-shot
worker (:mod:`~pymw_magic.oneshot`), the pure modules it and a job's
pickles may need, and cloudpickle — pure Python only, nothing compiled
(files are verified with the standard library's ``hmac`` or the pure
Ed25519 verifier).  A node needs only ``python3`` of the master's minor
version::

    python3 pymw-runtime.pyz run 7.in 7.out --function function.bin --key key

:func:`runtime_zipapp` builds it once per pymw-magic version, Python
minor and content (so an edited source never ships a stale runtime),
under ``$PYMW_HOME/runtime`` or the user's cache directory; the archive is
deterministic and is written to a temp file and renamed, so processes
building at once are safe and agree.  The archive's entry point runs on
any Python 3: where the runtime cannot even be imported (3.7 and before)
it still writes an output saying which Python the job needs.
"""

from __future__ import annotations

import hashlib
import io
import os
import py_compile
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from .version import __version__

#: modules of this package in the runtime: the one-shot worker, what it
#: imports, and pure modules whose classes a job's pickles may name
#: (a %%pymw cell's function is a cellfunc object)
RUNTIME_MODULES = ("errors", "version", "reaper", "oneshot", "codec", "ed25519", "cellfunc")
#: pure-Python third-party packages shipped along
RUNTIME_PACKAGES = ("cloudpickle",)

_INIT = b'''"""pymw-magic's worker runtime (a zipapp shipped with batch jobs): the
one-shot worker only; the package itself is not installed here."""
'''

#: the archive's entry point.  Written for any Python 3 (no f-strings, no
#: annotations): on an interpreter too old to import the runtime (3.7 and
#: before: cloudpickle needs 3.8) it still writes an output whose error
#: names the host, both versions and the fix, in the layout of
#: :mod:`~pymw_magic.oneshot` (a refusal: no job, no chunk, one error).
_MAIN = """\
\"\"\"python3 pymw-runtime.pyz run IN OUT --function F --key K\"\"\"
import os
import sys

BUILT_FOR = "@PYTHON@"
here = os.path.dirname(os.path.abspath(__file__))  # the archive itself
if sys.path[:1] != [here]:
    sys.path.insert(0, here)  # (ahead of any installed pymw_magic of another version)
try:
    from pymw_magic.oneshot import main
except BaseException as exc:  # this Python cannot even load the runtime
    reason = "%s: %s" % (type(exc).__name__, exc)
else:
    sys.exit(main())


def fallback(argv, reason):
    import hashlib, hmac, json, platform, socket, tempfile, time
    args, skip = [], False
    for a in argv:
        if skip or a in ("--function", "--key"):
            skip = not skip
            continue
        args.append(a)
    if len(args) < 3 or args[0] != "run":
        sys.stderr.write("pymw-runtime: cannot run on Python %s: %s\\n" % (platform.python_version(), reason))
        return 2
    out = os.path.abspath(args[2])
    key_path = os.path.join(os.path.dirname(os.path.abspath(args[1])), "key")
    if "--key" in argv and argv.index("--key") + 1 < len(argv):
        key_path = argv[argv.index("--key") + 1]
    host, version = socket.gethostname(), platform.python_version()
    message = ("host %s runs Python %s (%s) but the job was made with Python %s: the runtime cannot load "
               "there (%s). Run the same minor version on the nodes: python= (an interpreter with Python "
               "%s), or container_image= (an image with it)" % (host, version, sys.executable, BUILT_FOR,
                                                                 reason, BUILT_FOR))
    meta = {"outcomes": [], "blobs": [], "error": ["pymw_magic.oneshot.RuntimeMismatch", message, ""]}
    body = json.dumps(meta, separators=(",", ":")).encode() + b"\\n"
    scheme, key = "sha256", None
    try:
        with open(key_path, "rb") as f:
            parts = f.read().split()
        if len(parts) == 4 and parts[2] == b"hmac-sha256":
            scheme, key = "hmac-sha256", bytes(bytearray.fromhex(parts[3].decode("ascii")))
    except (OSError, ValueError):
        pass
    header = {"kind": "output", "codec": "safe", "job": None, "index": None, "host": host,
              "python": version, "started": time.time(), "ended": time.time(), "scheme": scheme,
              "body": len(body)}
    signed = b"PYMW1\\n" + json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\\n" + body
    if scheme == "hmac-sha256":
        tag = hmac.new(key, signed, hashlib.sha256).digest()
    else:
        tag = hashlib.sha256(signed).digest()
    fd, tmp = tempfile.mkstemp(prefix=".pymw-", suffix=".tmp", dir=os.path.dirname(out))
    with os.fdopen(fd, "wb") as f:
        f.write(signed + tag)
    os.rename(tmp, out)
    sys.stderr.write("pymw-runtime: %s\\n" % message)
    return 0


sys.exit(fallback(sys.argv[1:], reason))
"""


_lock = threading.Lock()
_built: dict[tuple, Path] = {}


def cache_dir() -> Path:
    """``$PYMW_HOME/runtime``, else pymw-magic's directory in the user's cache."""
    home = os.environ.get("PYMW_HOME")
    if home:
        return Path(home).expanduser() / "runtime"
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "pymw-magic" / "runtime"
    return Path(user_cache_dir("pymw-magic", appauthor=False)) / "runtime"


def _sources() -> list[tuple[str, Path]]:
    """(name in the archive, file) of everything shipped."""
    here = Path(__file__).resolve().parent
    files = [(f"pymw_magic/{m}.py", here / f"{m}.py") for m in RUNTIME_MODULES if (here / f"{m}.py").exists()]
    for package in RUNTIME_PACKAGES:
        module = __import__(package)
        root = Path(module.__file__).resolve().parent
        for path in sorted(root.rglob("*")):
            if path.suffix == ".py" and "__pycache__" not in path.parts:
                files.append((f"{package}/{path.relative_to(root).as_posix()}", path))
            elif path.suffix in (".so", ".pyd"):
                raise RuntimeError(f"{package} is not pure Python ({path}): it cannot ship in the runtime")
    return files


def _pyc(source: Path, arcname: str) -> bytes:
    """``source`` compiled for this Python (unchecked-hash pyc: the same
    bytes every build; a node of another minor ignores it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "x.pyc")
        py_compile.compile(str(source), cfile=out, dfile=arcname, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        with open(out, "rb") as f:
            return f.read()


def _archive(files: list[tuple[str, Path]]) -> bytes:
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    main = _MAIN.replace("@PYTHON@", minor).encode()
    entries: list[tuple[str, bytes]] = [("__main__.py", main), ("pymw_magic/__init__.py", _INIT)]
    for arcname, path in files:
        entries.append((arcname, path.read_bytes()))
        entries.append((arcname + "c", _pyc(path, arcname)))
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def runtime_zipapp() -> Path:
    """The runtime zipapp for this pymw-magic and this Python minor, built
    on first use and cached (thread- and process-safe)."""
    files = _sources()
    stamp = tuple((name, p.stat().st_mtime_ns, p.stat().st_size) for name, p in files)
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    memo_key = (minor, __version__, stamp, str(cache_dir()))
    with _lock:
        path = _built.get(memo_key)
        if path is not None and path.exists():
            return path
        digest = hashlib.sha256(_MAIN.encode() + _INIT)  # (the entry point is part of what ships)
        for name, p in files:
            digest.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
        directory = cache_dir()
        path = directory / f"pymw-runtime-{__version__}-py{minor}-{digest.hexdigest()[:16]}.pyz"
        if not path.exists():
            data = _archive(files)
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".pymw-runtime-", suffix=".tmp", dir=directory)
            except OSError as exc:
                raise OSError(exc.errno, f"the worker runtime cannot be cached in {directory} ({exc.strerror}): "
                              "set PYMW_HOME to a directory you can write") from exc
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)  # (another process's identical archive may land first: same bytes)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        _built[memo_key] = path
        return path
