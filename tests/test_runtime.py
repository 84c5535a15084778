"""The runtime zipapp that travels with batch jobs: what it holds, that it
is built once and safely, that it runs with nothing but a Python of the
same minor, and how a node that does not fit (another Python, a missing
module) fails each task with a message that says what to do."""

from __future__ import annotations

import functools
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
from pymw_magic import runtime
from pymw_magic.jobdir import JobDir
from test_oneshot import TIMEOUT, job, make_task, run_node


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_zipapp_holds_the_runtime_and_cloudpickle_and_nothing_compiled(home):
    path = runtime.runtime_zipapp()
    assert path.parent == home / "runtime"
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert path.name.startswith(f"pymw-runtime-{runtime.__version__}-py{minor}-")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    assert {"__main__.py", "pymw_magic/__init__.py", "pymw_magic/oneshot.py", "pymw_magic/errors.py",
            "cloudpickle/__init__.py", "cloudpickle/cloudpickle.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dll"))]
    assert not [n for n in names if n.split("/")[0] in ("cryptography", "numpy", "platformdirs")]
    # only the pure runtime modules of the package: not the master, not the backends
    ours = {n for n in names if n.startswith("pymw_magic/") and n.endswith(".py")}
    assert ours == {"pymw_magic/__init__.py"} | {f"pymw_magic/{m}.py" for m in runtime.RUNTIME_MODULES
                                                  if (pathlib.Path(ROOT) / "pymw_magic" / f"{m}.py").exists()}


def test_built_once_and_the_same_bytes_every_time(home, tmp_path, monkeypatch):
    first = runtime.runtime_zipapp()
    stamp = first.stat().st_mtime_ns
    assert runtime.runtime_zipapp() == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "elsewhere"))
    second = runtime.runtime_zipapp()
    assert second != first and second.name == first.name
    assert second.read_bytes() == first.read_bytes()


def test_processes_building_at_once_agree(home):
    """Eight processes build into one empty cache at once: one file, whole."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pymw_magic.runtime import runtime_zipapp; "
            "print(runtime_zipapp())")
    env = dict(os.environ, PYMW_HOME=str(home))
    for _ in range(3):
        shutil.rmtree(home, ignore_errors=True)
        procs = [subprocess.Popen([sys.executable, "-c", code, ROOT], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        paths = {o[0].strip() for o in outs}
        assert len(paths) == 1
        assert sorted(p.name for p in (home / "runtime").iterdir()) == [pathlib.Path(paths.pop()).name]
        with zipfile.ZipFile(next((home / "runtime").iterdir())) as zf:
            assert zf.testzip() is None


def test_threads_building_at_once_agree(home):
    import threading
    got, errors = [], []

    def build():
        try:
            got.append(runtime.runtime_zipapp())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=build) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not errors and len(set(got)) == 1 and len(got) == 16


def test_runs_in_a_venv_without_our_package_from_an_empty_directory(tmp_path):
    """A node with only Python: a fresh venv (no pip, nothing installed),
    in a directory holding only the transferred files."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT)
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import cloudpickle"], capture_output=True, text=True,
                           timeout=TIMEOUT, cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert probe.returncode != 0 and "No module named 'cloudpickle'" in probe.stderr  # (really bare)
    jd = job(tmp_path, make_task(), [[(0, (2,), {"scale": 3}), (1, (3,), {})]])
    sandbox = tmp_path / "node"
    inv = jd.invocation(0, python=python)
    sandbox.mkdir()
    for p in inv.inputs:
        shutil.copy(p, sandbox / p.name)
    proc = subprocess.run([inv.executable, *inv.arguments], cwd=sandbox, capture_output=True, text=True,
                          timeout=TIMEOUT, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    shutil.copy(sandbox / "0.out", jd.output_path(0))
    out = jd.read_output(0)
    assert [o.ok for o in out.outcomes] == [True, False]
    assert out.outcomes[0].value == 6 and out.outcomes[1].failure[1] == "ValueError"


def _pythons_of_another_minor() -> list[str]:
    """Interpreters on this machine whose minor version differs from ours
    (3.8 or newer: cloudpickle's floor)."""
    return [path for path, version in _pythons() if version != tuple(sys.version_info[:2]) and version >= (3, 8)]


def _pythons_too_old() -> list[str]:
    """Python 3 interpreters on this machine too old to load the runtime (before 3.8)."""
    return [path for path, version in _pythons() if version < (3, 8)]


@functools.lru_cache(maxsize=None)
def _pythons() -> list[tuple[str, tuple[int, int]]]:
    found = []
    candidates = sorted(set(glob.glob("/usr/bin/python3.*") + glob.glob("/usr/local/bin/python3.*")
                            + glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))))
    for path in candidates:
        if not os.access(path, os.X_OK) or path.endswith("-config"):
            continue
        try:
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode != 0:
            continue
        major, minor = map(int, out.stdout.split())
        if major == 3:
            found.append((path, (major, minor)))
    return found


def check_mismatch(failure, node_python: str, master_python: str) -> None:
    type_name, message = failure[1], failure[2]
    assert type_name == "pymw_magic.oneshot.RuntimeMismatch"
    import socket
    assert f"host {socket.gethostname()}" in message
    assert f"Python {node_python}" in message and f"Python {master_python}" in message
    assert "python=" in message and "container_image=" in message


def test_a_job_made_with_another_python_fails_each_task_saying_so(tmp_path, monkeypatch):
    """The master's Python (named in the signed header) is not the node's."""
    import platform
    from pymw_magic import jobdir
    monkeypatch.setattr(jobdir.platform, "python_version", lambda: "3.99.1")
    marker = tmp_path / "unpickled"
    from test_oneshot import Touch
    jd = JobDir.create(tmp_path / "jobs", "j")

    def task(x, *rest):
        return x
    jd.write_function(task)
    jd.write_chunk(0, [(0, (1, Touch(marker)), {}), (1, (2,), {})])
    monkeypatch.undo()
    run_node(jd, 0)
    out = jd.read_output(0)
    assert not marker.exists()  # (nothing unpickled: pickles do not cross minors)
    assert [o.ok for o in out.outcomes] == [False, False]
    for o in out.outcomes:
        check_mismatch(o.failure, platform.python_version(), "3.99.1")
    assert out.error is not None


@pytest.mark.parametrize("scheme", ["hmac-sha256", "ed25519"])
@pytest.mark.parametrize("python", _pythons_of_another_minor()[:2] or [None])
def test_a_node_with_another_real_python_fails_each_task_saying_so(tmp_path, python, scheme):
    if python is None:
        pytest.skip("no Python of another minor version on this machine (looked in /usr/bin, "
                    "/usr/local/bin, ~/.pyenv/versions); the header-simulated test covers the message")
    import platform
    if scheme == "ed25519":  # (the pure verifier runs on that Python too, before the mismatch is seen)
        from pymw_magic.ed25519 import SigningKey
        jd = JobDir.create(tmp_path / "jobs", "j", scheme="ed25519", signer=SigningKey.generate(), codec="safe")
        jd.write_function(make_task())
        jd.write_chunk(0, [(0, (1,), {}), (1, (2,), {})])
    else:
        jd = job(tmp_path, make_task(), [[(0, (1,), {}), (1, (2,), {})]])
    proc = run_node(jd, 0, python=python)
    node = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    out = jd.read_output(0)
    assert out.python == node, proc.stderr
    assert [o.ok for o in out.outcomes] == [False, False]
    for o in out.outcomes:
        check_mismatch(o.failure, node, platform.python_version())


def test_a_function_from_a_module_the_node_lacks_fails_each_task_naming_it(tmp_path, monkeypatch):
    """A function pickled by reference to a module the master has and the node does not."""
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "pymw_only_here.py").write_text("def work(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(moddir))
    import pymw_only_here
    try:
        jd = job(tmp_path, pymw_only_here.work, [[(0, (1,), {}), (1, (2,), {})]])
    finally:
        sys.modules.pop("pymw_only_here", None)
    run_node(jd, 0)
    out = jd.read_output(0)
    for o in out.outcomes:
        assert not o.ok and o.failure[1] == "ModuleNotFoundError"
        message = o.failure[2]
        assert "pymw_only_here" in message and "install 'pymw_only_here'" in message
        import socket
        assert f"host {socket.gethostname()}" in message
        assert "python=" in message and "container_image=" in message
    import pickle
    exc = pickle.loads(out.outcomes[0].failure[0])
    assert isinstance(exc, ModuleNotFoundError) and exc.name == "pymw_only_here"


def test_a_task_importing_a_module_the_node_lacks_fails_naming_it(tmp_path):
    def task(x):
        if x:
            import pymw_no_such_module  # noqa: F401
        return x
    jd = job(tmp_path, task, [[(0, (0,), {}), (1, (1,), {})]])
    run_node(jd, 0)
    ok, bad = jd.read_output(0).outcomes
    assert ok.ok and ok.value == 0
    assert bad.failure[1] == "ModuleNotFoundError"
    assert "No module named 'pymw_no_such_module'" in bad.failure[2]
    assert "install 'pymw_no_such_module'" in bad.failure[2] and "container_image=" in bad.failure[2]
    assert "import pymw_no_such_module" in bad.failure[3] or ", in task" in bad.failure[3]


def test_an_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("PYMW_HOME", str(blocked))
    with pytest.raises(OSError, match="set PYMW_HOME to a directory you can write"):
        runtime.runtime_zipapp()


def test_a_relative_root_gives_absolute_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jd = JobDir.create("rel", "j")
    jd.write_function(make_task())
    jd.write_chunk(0, [(0, (1,), {})])
    inv = jd.invocation(0)
    assert all(p.is_absolute() for p in inv.inputs) and jd.path.is_absolute()


@pytest.mark.parametrize("python", _pythons_too_old()[-2:] or [None])
def test_a_python_too_old_for_the_runtime_still_writes_an_output_saying_so(tmp_path, python):
    """Python 3.6 or 3.7 (older clusters' python3) cannot import the
    runtime at all: the archive's entry point still writes the output."""
    if python is None:
        pytest.skip("no Python 3 older than 3.8 on this machine (looked in /usr/bin, /usr/local/bin, "
                    "~/.pyenv/versions)")
    import platform
    jd = job(tmp_path, make_task(), [[(4, (1,), {}), (5, (2,), {})]])
    proc = run_node(jd, 0, python=python)
    node = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    out = jd.read_output(0)  # (HMAC-signed with the job's key: it verifies)
    assert out.python == node, proc.stderr
    assert [o.seq for o in out.outcomes] == [4, 5]
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for o in out.outcomes:
        check_mismatch(o.failure, node, minor)
        assert "the runtime cannot load there" in o.failure[2]


def _shadowed_sandbox(tmp_path, jd, inv):
    """A sandbox holding, beside the inputs, files named like modules the
    worker imports (a user's transfer_files, a hostile input): each one
    leaves a marker if it is ever imported."""
    sandbox = tmp_path / "shadowed"
    sandbox.mkdir()
    for p in inv.inputs:
        shutil.copy(p, sandbox / p.name)
    marker = tmp_path / "shadow-imported"
    body = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for name in ("json", "hmac", "hashlib", "cloudpickle", "secrets"):
        (sandbox / f"{name}.py").write_text(body)
    (sandbox / "pymw_magic").mkdir()
    (sandbox / "pymw_magic" / "__init__.py").write_text(body)
    return sandbox, marker


def test_the_invocation_never_imports_modules_from_the_sandbox(tmp_path):
    """The backend runs ``python3 pymw-runtime.pyz run ...``: a zipapp's
    sys.path starts at the archive, never at the sandbox (the working
    directory), so files there named like our modules are not imported."""
    jd = job(tmp_path, make_task(), [[(0, (2,), {"scale": 3})]])
    inv = jd.invocation(0, python=sys.executable)
    sandbox, marker = _shadowed_sandbox(tmp_path, jd, inv)
    env = {"PATH": os.environ["PATH"]}
    proc = subprocess.run([inv.executable, *inv.arguments], cwd=sandbox, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()
    shutil.copy(sandbox / "0.out", jd.output_path(0))
    assert jd.read_output(0).outcomes[0].value == 6


def test_python_m_worker_run_needs_dash_p_outside_the_zipapp(tmp_path):
    """``python -m pymw_magic.worker run`` puts the working directory first
    on sys.path (the README says to add -P): without it a sandbox's
    ``pymw_magic/`` is imported instead of ours; with -P it is not."""
    jd = job(tmp_path, make_task(), [[(0, (2,), {"scale": 3})]])
    inv = jd.invocation(0, python=sys.executable)
    sandbox, marker = _shadowed_sandbox(tmp_path, jd, inv)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT}
    args = inv.arguments[1:]  # (run 0.in 0.out --function ... --key ...)
    unsafe = subprocess.run([sys.executable, "-m", "pymw_magic.worker", *args], cwd=sandbox, capture_output=True,
                            text=True, timeout=TIMEOUT, env=env)
    assert marker.exists() and "pymw_magic" in marker.read_text(), (unsafe.stdout, unsafe.stderr)
    marker.unlink()
    (sandbox / "0.out").unlink(missing_ok=True)
    safe = subprocess.run([sys.executable, "-P", "-m", "pymw_magic.worker", *args], cwd=sandbox,
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert safe.returncode == 0, safe.stderr
    assert not marker.exists(), marker.read_text()
    shutil.copy(sandbox / "0.out", jd.output_path(0))
    assert jd.read_output(0).outcomes[0].value == 6
