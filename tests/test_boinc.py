"""The BOINC backend against the stand-in project (and a real project where
``PYMW_BOINC_PROJECT`` names one, with a real client attached:
``PYMW_BOINC_CLIENT_URL`` is the project URL ``boinccmd --project URL
update`` is run with, to end the client's back-off).

Everything real but the server: the backend calls the project's bin/ tools
with BOINC's command lines, the stand-in's hosts run the app version's
launcher and the shipped runtime in slot directories, our validator and
assimilator scripts run as script_validator / script_assimilator run them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, by_value, wait_until
from pymw_magic import Master, store
import pymw_magic.reattach as reattach
from pymw_magic.backends.boinc import BoincError, ProjectError
from pymw_magic.testing.boinc import StandInProject

TIMEOUT = 240
LIVE = os.environ.get("PYMW_BOINC_PROJECT")


def _square(x):
    if x == 3:
        raise ValueError("three is not welcome")
    print("squaring", x)
    return x * x


square = by_value(_square)


def _sleepy(x):
    import time
    time.sleep(x)
    return x


sleepy = by_value(_sleepy)


@pytest.fixture(autouse=True)
def keys(tmp_path, monkeypatch, home):
    """The test's own signing key (the user's config dir is not touched)."""
    monkeypatch.setenv("PYMW_CONFIG", str(tmp_path / "config"))
    return tmp_path / "config" / "ed25519.key"


class Projects:
    """Stand-in projects made by a test, stopped after it (no daemon left)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.made: list[StandInProject] = []

    def __call__(self, **kw) -> StandInProject:
        p = StandInProject(self.tmp_path / f"project{len(self.made)}", idle_timeout=300, **kw).create()
        self.made.append(p)
        return p

    def close(self) -> None:
        for p in self.made:
            pid = p.daemon_pid()
            p.stop()
            if pid is not None:
                wait_until(lambda: not _alive(pid), 60, "the stand-in daemon gone")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def projects(tmp_path):
    made = Projects(tmp_path)
    yield made
    made.close()


@pytest.fixture(params=["standin", "live"])
def project_home(request, projects, monkeypatch):
    """A stand-in project (2 hosts), or the real one PYMW_BOINC_PROJECT names."""
    if request.param == "live":
        if not LIVE:
            pytest.skip("no real BOINC project here: set PYMW_BOINC_PROJECT=<project dir> (and "
                        "PYMW_BOINC_CLIENT_URL=<its URL> for boinccmd) where one runs with a client attached")
        # (one key for every live test: each new key is a new app version the clients download)
        monkeypatch.setenv("PYMW_CONFIG", os.environ.get("PYMW_BOINC_CONFIG", "/tmp/pymw-boinc-live-config"))
        stop = threading.Event()
        kicker = threading.Thread(target=_kick, args=(stop,), daemon=True)
        kicker.start()
        yield LIVE
        stop.set()
        kicker.join(timeout=30)
        return
    yield str(projects(hosts=2).root)


def _kick(stop: threading.Event) -> None:
    """A real client backs off after "no work": ask it to contact the project now and then."""
    url = os.environ.get("PYMW_BOINC_CLIENT_URL")
    while url and not stop.wait(5):
        subprocess.run(["boinccmd", "--project", url, "update"], capture_output=True, timeout=60)


def test_map_results_failures_output_and_hosts(project_home):
    with Master("boinc", project_home=project_home) as m:
        job = m.map_async(square, range(6), name="squares")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert out[:3] == [0, 1, 4] and out[4:] == [16, 25]
        # (results are never unpickled: the failure is its type's name, message and traceback)
        assert isinstance(out[3], Exception) and "ValueError" in repr(out[3]) + str(out[3]) \
            and "three is not welcome" in str(out[3])
        failed = job.tasks[3]
        assert "in _square" in failed.remote_traceback and "ValueError: three" in failed.remote_traceback
        assert job.tasks[2].stdout == "squaring 2\n"
        assert all(t.host for t in job.tasks)
        directory = m.backend.job_dir(job)
        # every input signed with Ed25519, the results in the safe codec
        meta = json.loads((directory / "job.json").read_bytes())
        assert meta["scheme"] == "ed25519" and meta["codec"] == "safe"


def test_one_create_work_per_wave_and_templates_per_job(projects):
    p = projects(hosts=2)
    with Master("boinc", project_home=str(p.root), chunksize=25, target_nresults=2, min_quorum=2,
                max_error_results=4, delay_bound=600) as m:
        job = m.map_async(by_value(lambda x: x + 1), range(100), name="waves")
        assert job.result(timeout=TIMEOUT) == list(range(1, 101))
        wus = p.workunits()
        assert len(wus) == 4 and len({w["batch"] for w in wus}) == 1
        # the template's values are the job's settings (they win over create_work's options)
        assert {(w["target_nresults"], w["min_quorum"], w["max_error_results"], w["delay_bound"]) for w in wus} \
            == {(2, 2, 4, 600)}
        assert len({w["result_template"] for w in wus}) == 1
        # two agreeing replicas per work unit, one canonical
        assert all(w["canonical_resultid"] for w in wus)
        assert len(p.results(validate_state=1)) == 8
        # names carry a content hash: a new content, a new name
        names = [json.loads(w["files"])[1]["phys"] for w in wus]
        assert len(set(names)) == 4 and all(n.endswith(".in") for n in names)
        # the outputs left upload/ before the file deleter removed them there
        assert wait_until(lambda: not any(Path(p.root, "upload").rglob("*_0")), 60, "the uploads deleted")
        # and out of the project's results directory once in the job directory
        assert not list(Path(p.root, "pymw_results").rglob("*.out"))
        assert len(list(m.backend.job_dir(job).glob("out/*.out"))) == 4


def test_setup_is_idempotent_and_says_what_changed(projects):
    p = projects(hosts=1)
    m1 = Master("boinc", project_home=str(p.root))
    try:
        changes = m1.backend.changes
        assert any("script_validator --app pymw" in c for c in changes)
        assert any("script_assimilator --app pymw" in c for c in changes)
        assert any("app version 1.01" in c for c in changes) and any("restarted" in c for c in changes)
        pid = p.daemon_pid()
        assert pid
    finally:
        m1.shutdown()
    m2 = Master("boinc", project_home=str(p.root))
    try:
        assert m2.backend.changes == []          # nothing to do: no restart
        assert p.daemon_pid() == pid
        config = (p.root / "config.xml").read_text()
        assert config.count("<cmd>script_assimilator") == 1 and config.count("<cmd>feeder") == 1
        # the public key ships in the app version; the private key never enters the project
        version = p.root / "apps" / "pymw" / "1.01" / "x86_64-pc-linux-gnu"
        keyfile = [f for f in version.iterdir() if f.name.startswith("pymw-key-")]
        assert len(keyfile) == 1 and m2.backend.signer.public_bytes.hex().encode() in keyfile[0].read_bytes()
        private = Path(os.environ["PYMW_CONFIG"], "ed25519.key").read_bytes()
        assert not any(f.is_file() and private in f.read_bytes() for f in p.root.rglob("*") if f.stat().st_size < 1 << 20)
    finally:
        m2.shutdown()


def test_not_a_project_and_bad_options_are_clear_errors(tmp_path, projects):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProjectError, match="not a BOINC project"):
        Master("boinc", project_home=str(empty))
    assert list(empty.iterdir()) == []          # nothing written
    with pytest.raises(ProjectError, match="project_home"):
        Master("boinc")
    with pytest.raises(ProjectError, match="not a directory"):
        Master("boinc", project_home=str(tmp_path / "nowhere"))
    p = projects(hosts=1)
    with pytest.raises(ValueError, match="min_quorum"):
        Master("boinc", project_home=str(p.root), min_quorum=3, target_nresults=2)
    with pytest.raises(ValueError, match="max_error_results"):
        Master("boinc", project_home=str(p.root), max_error_results=0)
    with pytest.raises(ValueError, match="python"):
        Master("boinc", project_home=str(p.root), python="python3; rm -rf /")
    with pytest.raises(ValueError, match="app"):
        Master("boinc", project_home=str(p.root), app="my app")


def test_tampered_input_is_refused_on_the_volunteer(projects, tmp_path):
    p = projects(hosts=1, faults={"tamper": [0]})
    marker = tmp_path / "ran"

    def touch(x):
        open(str(marker), "a").write("ran\n")
        return x
    with Master("boinc", project_home=str(p.root), retries=0) as m:
        job = m.map_async(by_value(touch), [1, 2], name="tampered")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert all(isinstance(e, Exception) and "refused: signature" in str(e) for e in out), out
    assert all("nothing in it was unpickled" in str(e) for e in out)
    assert not marker.exists()                  # no task ran


def test_input_signed_with_another_key_is_refused(projects, tmp_path):
    from pymw_magic.ed25519 import SigningKey
    p = projects(hosts=1)
    marker = tmp_path / "ran"

    def touch(x):
        open(str(marker), "a").write("ran\n")
        return x
    with Master("boinc", project_home=str(p.root), retries=0) as m:
        # the app version carries this user's public key; the job is signed by another
        m.backend.signer = SigningKey.generate()
        job = m.map_async(by_value(touch), [1], name="foreign")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert "refused: signature" in str(err) and "bad signature" in str(err), err
    assert not marker.exists()


def test_wrong_host_is_outvoted_with_a_quorum(projects):
    p = projects(hosts=3, faults={"wrong": [0]})
    with Master("boinc", project_home=str(p.root), target_nresults=2, min_quorum=2, chunksize=1) as m:
        job = m.map_async(by_value(lambda x: x * 3), range(4), name="outvoted")
        assert job.result(timeout=TIMEOUT) == [0, 3, 6, 9]
    invalid = p.results(validate_state=2)
    assert invalid and all(r["hostid"] == 1 for r in invalid)  # (host 0 is hostid 1)


def test_results_that_never_agree_fail_with_the_values(projects):
    p = projects(hosts=4, faults={"wrong": [0, 1, 2]})
    with Master("boinc", project_home=str(p.root), target_nresults=2, min_quorum=2, retries=0) as m:
        job = m.map_async(by_value(lambda x: x * 3), [5], name="no-quorum")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert isinstance(err, BoincError), err
    assert err.error_mask & 4 and "disagree" in str(err) and "task 0" in str(err), err
    assert "15" in err.disagree and "16" in err.disagree


def test_client_errors_are_reissued_up_to_max_error_results(projects):
    p = projects(hosts=2, faults={"error": [0]})
    p.configure(one_result_per_user_per_wu=True)  # (else BOINC may send the reissue to the same host)
    with Master("boinc", project_home=str(p.root), max_error_results=4, chunksize=1) as m:
        job = m.map_async(by_value(lambda x: -x), range(4), name="erratic")
        assert job.result(timeout=TIMEOUT) == [0, -1, -2, -3]
    assert all(r["hostid"] == 2 for r in p.results(outcome=1))


def test_too_many_client_errors_fail_with_the_apps_stderr(projects):
    p = projects(hosts=2, faults={"error": [0, 1]})
    with Master("boinc", project_home=str(p.root), max_error_results=1, retries=0) as m:
        job = m.map_async(by_value(lambda x: x), [1], name="broken")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert isinstance(err, BoincError) and err.error_mask & 2, err
    assert "too many error results" in str(err)
    assert "injected client error" in err.stderr and "injected client error" in str(err)


def test_a_vanished_host_is_replaced_after_the_deadline(projects):
    p = projects(hosts=2, faults={"vanish": [0]})
    with Master("boinc", project_home=str(p.root), delay_bound=3, chunksize=1) as m:
        job = m.map_async(by_value(lambda x: x + 100), range(3), name="vanished")
        assert job.result(timeout=TIMEOUT) == [100, 101, 102]
    assert len(p.results(outcome=4)) == 1      # NO_REPLY: the one the vanished host took


def test_output_over_max_nbytes_is_a_clear_error(projects):
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), max_nbytes=4096, retries=0, max_error_results=1) as m:
        job = m.map_async(by_value(lambda n: "x" * n), [10, 100000], name="big")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert out[0] == "x" * 10
    assert isinstance(out[1], BoincError) and "exceeds size limit" in str(out[1]), out[1]


def test_a_result_that_is_not_plain_data_fails_saying_how_to_opt_in(project_home):
    with Master("boinc", project_home=project_home, retries=0) as m:
        job = m.map_async(by_value(lambda x: {1, 2}), [0], name="a-set")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert "trusted_results=True" in str(err), err


def test_trusted_results_bring_pickles_back(projects):
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), trusted_results=True) as m:
        assert m.map_async(by_value(lambda x: {x}), [3], name="sets").result(timeout=TIMEOUT) == [{3}]


def test_cancel_aborts_the_work_units(projects):
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(sleepy, [60, 60, 60], name="sleepy")
        wait_until(lambda: len(p.workunits()) == 3, TIMEOUT, "the work units created")
        assert job.cancel() == 3
        wait_until(lambda: all(w["error_mask"] & 16 or w["canonical_resultid"] for w in p.workunits()), 60,
                   "the work units cancelled")
        assert job.done()


SUBMITTER = textwrap.dedent('''
    import sys, time
    import pymw_magic.reattach
    from pymw_magic import Master

    home, count, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def make(path):
        def task(x):
            import time
            with open(path, "a") as f:
                f.write(f"{x}\\n")
            time.sleep(0.5)
            return x * 10
        return task

    m = Master("boinc", project_home=home, chunksize=1)
    job = m.map_async(make(count), range(n), name="killed-mid-job")
    print("SUBMITTED", flush=True)
    time.sleep(600)
''')


def test_killed_master_then_attach_gets_every_result(project_home, tmp_path, home):
    import tempfile
    n = 6
    # (a real client runs tasks as its own user: the side file is where that user can write)
    shared = Path(tempfile.mkdtemp(prefix="pymw-boinc-runs-"))
    shared.chmod(0o1777)
    count = shared / "runs.txt"
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script), project_home, str(count), str(n)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "SUBMITTED"
        st = store.open_store(home)

        def handle():
            try:
                h = st.job("killed-mid-job").handle or {}
            except store.UnknownJob:
                return None
            chunks = h.get("chunks") or {}
            return h if len(chunks) == n and all(c.get("proc") for c in chunks.values()) else None
        wait_until(handle, TIMEOUT, "the submitted job in the store")
        wait_until(lambda: count.exists() and count.read_text().strip(), TIMEOUT, "a first task ran")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    job = reattach.attach("killed-mid-job")
    try:
        assert job.result(timeout=TIMEOUT) == [x * 10 for x in range(n)]
        runs = sorted(int(line) for line in count.read_text().split())
        assert runs == list(range(n)), f"tasks ran twice or never: {runs}"
    finally:
        job.master.shutdown(wait=True)
    directory = Path(st.job("killed-mid-job").handle["dir"])
    reattach.remove("killed-mid-job")
    assert not directory.exists()
    shutil.rmtree(shared, ignore_errors=True)


def test_a_volunteer_sending_pickles_is_never_unpickled(projects):
    p = projects(hosts=1, faults={"pickle": [0]})
    with Master("boinc", project_home=str(p.root), retries=0) as m:
        job = m.map_async(by_value(lambda x: x), [1, 2], name="pickled")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert all(isinstance(e, Exception) and "trusted_results=True" in str(e) for e in out), out
    assert not (p.root / "pwned").exists()      # the pickle was never loaded


def test_two_users_keys_on_one_project_each_get_their_results(projects, tmp_path):
    p = projects(hosts=2)
    m1 = Master("boinc", project_home=str(p.root), signing_key=str(tmp_path / "a.key"), chunksize=1)
    m2 = Master("boinc", project_home=str(p.root), signing_key=str(tmp_path / "b.key"), chunksize=1)
    try:
        assert m1.backend.app_version != m2.backend.app_version   # each key ships in its own app version
        # BOINC's feeder sends only an app's newest version unless it has a min_version: set to the oldest
        assert any("min_version to 101" in c for c in m2.backend.changes), m2.backend.changes
        assert "<min_version>101</min_version>" in (p.root / "project.xml").read_text()
        j1 = m1.map_async(by_value(lambda x: x + 1), range(3), name="alice")
        j2 = m2.map_async(by_value(lambda x: x - 1), range(3), name="bob")
        assert j1.result(timeout=TIMEOUT) == [1, 2, 3]
        assert j2.result(timeout=TIMEOUT) == [-1, 0, 1]
        # each job's work units are pinned to the app version with its own key
        pins = {w["app_version_num"] for w in p.workunits()}
        assert pins == {m1.backend.app_version, m2.backend.app_version}
    finally:
        m1.shutdown()
        m2.shutdown()


def test_masters_setting_up_one_project_at_once_agree(projects):
    p = projects(hosts=1)
    errors, backends = [], []

    def make():
        try:
            m = Master("boinc", project_home=str(p.root))
            backends.append(m)
        except Exception as exc:  # (collected: the assertion below names it)
            errors.append(exc)
    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    try:
        assert not errors, errors
        assert len({m.backend.app_version for m in backends}) == 1
        config = (p.root / "config.xml").read_text()
        assert config.count("<cmd>script_assimilator") == 1 and config.count("<cmd>script_validator") == 1
        assert sum(bool(m.backend.changes) for m in backends) == 1
    finally:
        for m in backends:
            m.shutdown()


def test_removing_a_stored_running_job_cancels_its_work_units(projects):
    p = projects(hosts=1)
    m = Master("boinc", project_home=str(p.root), chunksize=1)
    job = m.map_async(sleepy, [60, 60], name="to-remove")
    wait_until(lambda: len(p.workunits()) == 2, TIMEOUT, "the work units created")
    directory = m.backend.job_dir(job)
    m.detach()
    from pymw_magic.errors import PymwError
    with pytest.raises(PymwError, match="cancel=True"):
        reattach.remove("to-remove")
    reattach.remove("to-remove", cancel=True)
    assert all(w["error_mask"] & 16 or w["canonical_resultid"] for w in p.workunits())
    assert not directory.exists()


def test_attach_on_another_project_is_refused(projects, tmp_path, home):
    p1, p2 = projects(hosts=1), projects(hosts=1)
    m = Master("boinc", project_home=str(p1.root), chunksize=1)
    job = m.map_async(sleepy, [60], name="elsewhere")
    wait_until(lambda: len(p1.workunits()) == 1, TIMEOUT, "the work unit created")
    m.detach()
    from pymw_magic.errors import PymwError
    with pytest.raises(PymwError, match="ran on the BOINC project"):
        reattach.attach("elsewhere", project_home=str(p2.root))
    reattach.remove("elsewhere", cancel=True)


def test_an_exported_notebook_runs_with_backend_boinc(projects, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    p = projects(hosts=2)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("%load_ext pymw_magic"),
                nbformat.v4.new_code_cell("%%pymw --map x in range(5) --out cubes --name cubes\nx ** 3"),
                nbformat.v4.new_code_cell("print('CUBES', cubes)")]
    nbformat.write(nb, tmp_path / "cubes.ipynb")
    env = dict(os.environ, PYTHONPATH=ROOT)
    exported = subprocess.run([sys.executable, "-m", "pymw_magic.cli", "export", str(tmp_path / "cubes.ipynb"),
                               "-o", str(tmp_path / "cubes.py")], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    ran = subprocess.run([sys.executable, str(tmp_path / "cubes.py"), "--backend", "boinc", "--project-home",
                          str(p.root), "--min-quorum", "2", "--target-nresults", "2"],
                         capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "CUBES [0, 1, 8, 27, 64]" in ran.stdout
    assert all(w["min_quorum"] == 2 for w in p.workunits()) and p.workunits()


def test_setup_keeps_the_admins_daemon_options_and_refuses_a_foreign_assimilator(projects):
    p = projects(hosts=1)
    config = (p.root / "config.xml").read_text().replace(
        "  </daemons>", "    <daemon>\n      <cmd>script_assimilator -d 3 --app pymw --script pymw_assimilate</cmd>\n"
        "      <output>assimilator_pymw_admin.log</output>\n    </daemon>\n  </daemons>")
    (p.root / "config.xml").write_text(config)
    with Master("boinc", project_home=str(p.root)) as m:
        assert not any("script_assimilator" in c for c in m.backend.changes)
        assert any("script_validator" in c for c in m.backend.changes)
    text = (p.root / "config.xml").read_text()
    assert text.count("<cmd>script_assimilator") == 1
    # a daemon we add has its own log and pid file (bin/start locks by them: another
    # app's script_validator would otherwise keep ours from starting)
    assert "<output>script_validator_pymw.log</output>" in text and "<pid_file>script_validator_pymw.pid</pid_file>" in text
    # an older pymw-magic's lines (named tokens, never passed by server 1.6.2) are replaced, not refused
    r = projects(hosts=1)
    config = (r.root / "config.xml").read_text().replace(
        "  </daemons>", "    <daemon>\n      <cmd>script_assimilator --app pymw --script \"pymw_assimilate wu_name "
        "batch_id files\"</cmd>\n    </daemon>\n  </daemons>")
    (r.root / "config.xml").write_text(config)
    with Master("boinc", project_home=str(r.root)) as m:
        assert any("replaced the daemon" in c for c in m.backend.changes), m.backend.changes
    text = (r.root / "config.xml").read_text()
    assert text.count("<cmd>script_assimilator") == 1 and "wu_name batch_id" not in text
    assert "script_assimilator --app pymw --script pymw_assimilate</cmd>" in text
    q = projects(hosts=1)
    config = (q.root / "config.xml").read_text().replace(
        "  </daemons>", "    <daemon>\n      <cmd>script_assimilator --app pymw --script their_script</cmd>\n"
        "    </daemon>\n  </daemons>")
    (q.root / "config.xml").write_text(config)
    with pytest.raises(ProjectError, match="already runs another script_assimilator"):
        Master("boinc", project_home=str(q.root))


def test_our_daemons_start_beside_another_apps_validator(projects):
    """bin/start locks a daemon by its <output> or its program's name: ours carry their own."""
    p = projects(hosts=1)
    config = (p.root / "config.xml").read_text().replace(
        "  </daemons>", "    <daemon>\n      <cmd>script_validator --app other --init_script check</cmd>\n    </daemon>\n"
        "    <daemon>\n      <cmd>script_assimilator --app other --script collect</cmd>\n    </daemon>\n  </daemons>")
    # an older pymw-magic's lines without log/pid names of their own: rewritten with them
    config = config.replace("  </daemons>", "    <daemon>\n      <cmd>script_validator --app pymw --init_script "
                            "pymw_validate --compare_script pymw_validate</cmd>\n    </daemon>\n  </daemons>")
    (p.root / "config.xml").write_text(config)
    with Master("boinc", project_home=str(p.root)) as m:
        assert any("replaced the daemon" in c for c in m.backend.changes)
        assert m.map_async(by_value(lambda x: x * 2), [21], name="beside").result(timeout=TIMEOUT) == [42]
    text = (p.root / "config.xml").read_text()
    assert text.count("<cmd>script_validator --app pymw") == 1 and "<output>script_validator_pymw.log</output>" in text


def test_a_daemon_bin_start_did_not_start_is_a_clear_error(projects):
    p = projects(hosts=1)
    # another app's validator holding the lock (its <output>) ours would take
    config = (p.root / "config.xml").read_text().replace(
        "  </daemons>", "    <daemon>\n      <cmd>script_validator --app other --init_script check</cmd>\n"
        "      <output>script_validator_pymw.log</output>\n    </daemon>\n  </daemons>")
    (p.root / "config.xml").write_text(config)
    with pytest.raises(ProjectError, match="bin/start did not start 'script_validator --app pymw'"):
        Master("boinc", project_home=str(p.root))


def _events_of(m, job, p) -> Path:
    """The events file of ``job`` (its work units are created: their batch names it)."""
    [batch] = {w["batch"] for w in p.workunits()}
    return Path(p.root, "pymw_results", str(batch), "events")


def test_malformed_event_lines_are_skipped_not_fatal(projects):
    """Whoever can write pymw_results/ (the web server's group, on a
    make_project layout) may append anything: a line of the wrong types or
    nested too deep is skipped; the job's real events still count."""
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), chunksize=1, retries=0) as m:
        job = m.map_async(sleepy, [2, 2], name="forged-lines")
        wait_until(lambda: len(p.workunits()) == 2, TIMEOUT, "the work units created")
        events = _events_of(m, job, p)
        events.parent.mkdir(parents=True, exist_ok=True)
        wu = p.workunits()[0]["name"]
        with open(events, "ab") as f:
            f.write(json.dumps({"wu": wu, "ok": False, "error_mask": "forged"}).encode() + b"\n")
            f.write(json.dumps({"wu": wu, "ok": False, "error_mask": {"a": 1}}).encode() + b"\n")
            f.write(b"[" * 100000 + b"]" * 100000 + b"\n")
            f.write(b'{"wu": ' + b"[" * 100000 + b"]" * 100000 + b"}\n")
        assert job.result(timeout=TIMEOUT) == [2, 2]


def test_a_planted_output_link_or_fifo_is_never_read(projects, tmp_path, caplog):
    """pymw_results/ is writable by the project's group (the web server's):
    an output planted there as a symbolic link would make the master (often
    root) copy any file it can read into the job (/dev/zero: until the disk
    is full); a FIFO must not block the reader."""
    p = projects(hosts=1)
    secret = tmp_path / "secret"
    secret.write_text("not for volunteers")
    with Master("boinc", project_home=str(p.root), chunksize=1, retries=0) as m:
        job = m.map_async(sleepy, [30, 30, 0.1], name="planted")
        wait_until(lambda: len(p.workunits()) == 3, TIMEOUT, "the work units created")
        events = _events_of(m, job, p)
        events.parent.mkdir(parents=True, exist_ok=True)
        wus = sorted(w["name"] for w in p.workunits())
        os.mkfifo(events.parent / f"{wus[0]}.out")
        os.symlink(secret, events.parent / f"{wus[1]}.out")
        with open(events, "ab") as f:
            for wu in wus[:2]:
                f.write(json.dumps({"wu": wu, "ok": True, "file": wu + ".out"}).encode() + b"\n")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert isinstance(out[0], Exception) and isinstance(out[1], Exception), out
        assert out[2] == 0.1
        assert not any(secret.read_bytes() in f.read_bytes() for f in m.backend.job_dir(job).glob("out/*"))
    said = [r.getMessage() for r in caplog.records if "fetching the output" in r.getMessage()]
    assert len(said) == 2 and all("not a regular file" in s for s in said), said


def test_infinite_or_out_of_range_limits_are_refused_when_given(projects):
    """BOINC keeps delay_bound in an int column and the estimates as finite
    doubles: inf was accepted and broke every submit later ("cannot
    convert float infinity to integer")."""
    p = projects(hosts=1)
    for bad in ({"delay_bound": float("inf")}, {"delay_bound": 2.0 ** 40}, {"rsc_fpops_est": float("inf")},
                {"delay_bound": "inf"}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            Master("boinc", project_home=str(p.root), **bad)


def test_two_jobs_whose_ids_share_a_batch_prefix_get_their_own_batches(projects, monkeypatch):
    """The batch (which names the job's templates, work units and results
    directory) comes from the job id's first hex digits: two jobs sharing
    them must not share templates and work unit names on one project."""
    import uuid
    import pymw_magic.jobdir as jobdir
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        a = m.map_async(by_value(lambda x: x + 1), [1], name="first")
        assert a.result(timeout=TIMEOUT) == [2]
        first = json.loads((m.backend.job_dir(a) / "job.json").read_bytes())["job"]
        monkeypatch.setattr(jobdir.uuid, "uuid4", lambda: uuid.UUID(first[:10] + "0" * 22))
        b = m.map_async(by_value(lambda x: x + 2), [1], name="second")
        assert b.result(timeout=TIMEOUT) == [3]
    batches = {w["batch"] for w in p.workunits()}
    assert len(batches) == 2, p.workunits()
