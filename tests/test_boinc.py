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

from conftest import ROOT, by_value, wait_for_submitted, wait_until
from pymw_magic import Master, store
import pymw_magic.reattach as reattach
from pymw_magic.backends.boinc import BoincError, ProjectError
from pymw_magic.testing.boinc import StandInProject
from test_jobs_magic import kernels  # noqa: F401  (fixture: real kernels, shut down after)

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
        wait_for_submitted(home, "killed-mid-job", n, TIMEOUT)
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
    p = projects(hosts=3)   # (the short task need not wait behind the long ones)
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


# --- a quorum no volunteer can complete: give_up_after -------------------------------------------------------
def test_a_quorum_no_host_can_complete_gives_up_with_the_disagreeing_values(projects, caplog):
    """As on a real server (2 volunteers, min_quorum=2, one result per user
    per work unit): two replicas disagree, BOINC makes a third that no
    volunteer may take, and it stays unsent without a deadline.  The
    validator's note makes the backend warn at once; give_up_after ends the
    work unit (cancelled) and the task fails with both values."""
    p = projects(hosts=2, faults={"wrong": [0]})
    with Master("boinc", project_home=str(p.root), target_nresults=2, min_quorum=2, retries=0, chunksize=1,
                give_up_after=15) as m:
        job = m.map_async(by_value(lambda x: x * 3), [5], name="stuck-quorum")
        # the stand-in reproduces the hang: a third result, unsent, while both hosts idle
        wait_until(lambda: len(p.results()) == 3 and p.results()[2]["server_state"] == 2, TIMEOUT,
                   "a third result that no host may take")
        wait_until(lambda: any("disagree" in r.getMessage() for r in caplog.records), 30,
                   "the warning that the replicas disagree")
        said = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()][0]
        assert "15" in said and "16" in said and "fewer than 3 distinct volunteers" in said, said
        assert job.counts()["failed"] == 0  # (warned, not failed yet)
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
    assert isinstance(err, BoincError), err
    assert "gave up" in str(err) and "give_up_after=15" in str(err) and "min_quorum" in str(err), err
    assert "15" in err.disagree and "16" in err.disagree and "task 0" in str(err), err
    [wu] = p.workunits()
    assert wu["error_mask"] & 16  # cancelled on BOINC: nothing of it stays queued
    third = p.results()[2]
    assert third["hostid"] == 0 and third["sent_time"] is None, third  # (never sent)


def test_give_up_after_is_validated_and_defaults_to_a_few_deadlines(projects):
    p = projects(hosts=1)
    for bad in (-1, 0, "soon", float("nan"), True):
        with pytest.raises(ValueError, match="give_up_after"):
            Master("boinc", project_home=str(p.root), give_up_after=bad)
    m = Master("boinc", project_home=str(p.root), delay_bound=100, max_error_results=2)
    n = Master("boinc", project_home=str(p.root), give_up_after=None)
    o = Master("boinc", project_home=str(p.root), give_up_after="inf")
    try:
        assert m.backend.give_up_after == 400.0     # (max_error_results + 2) x delay_bound
        assert n.backend.give_up_after is None and o.backend.give_up_after is None
    finally:
        for master in (m, n, o):
            master.shutdown()


# --- following: inotify, not polling ---------------------------------------------------------------------------
def _count_reads(monkeypatch, name: str = "events") -> list[float]:
    """Each time the backend opens a job's ``name`` file (the monotonic time)."""
    from pymw_magic.backends import boinc as boinc_backend
    opened: list[float] = []
    real = boinc_backend.Project.open_result

    def counting(self, path):
        if Path(path).name == name:
            opened.append(time.monotonic())
        return real(self, path)
    monkeypatch.setattr(boinc_backend.Project, "open_result", counting)
    return opened


def test_results_are_followed_by_inotify_not_by_polling(projects, monkeypatch):
    """While nothing happens the events file is read at most every
    safety_reread seconds (the follower blocks on the watcher); a result is
    seen at once without it (safety_reread made long here)."""
    pytest.importorskip("watchdog", reason="the boinc extra (pip install 'pymw-magic[boinc]') is not installed: "
                        "without watchdog the backend reads every second")
    from pymw_magic.backends.boinc import BoincBackend
    p = projects(hosts=1)
    opened = _count_reads(monkeypatch)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(sleepy, [10], name="quiet")   # (ends well after the 4 quiet seconds)
        wait_until(lambda: job.counts()["running"] == 1 or p.results(server_state=4), TIMEOUT, "the task sent")
        start = time.monotonic()
        time.sleep(4)  # (the quiet time being measured: reads in it are counted)
        quiet = [t for t in opened if start <= t <= start + 4]
        assert len(quiet) <= 2, f"{len(quiet)} reads of the events file in 4 quiet seconds"
        assert job.result(timeout=TIMEOUT) == [10]
    monkeypatch.setattr(BoincBackend, "safety_reread", 3600.0)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(by_value(lambda x: x), [1, 2, 3], name="prompt")
        t0 = time.monotonic()
        assert job.result(timeout=60) == [1, 2, 3]
        assert time.monotonic() - t0 < 50


def _watch_threads() -> list[str]:
    import threading as th
    return [t.name for t in th.enumerate() if "pymw" not in t.name and t is not th.main_thread()
            and t.is_alive() and ("Thread-" in t.name or "Observer" in type(t).__name__ or "Emitter"
                                   in type(t).__name__ or "Inotify" in type(t).__name__)]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_jobs_and_masters_in_a_row_leave_no_watcher_thread_or_fd(projects):
    import threading as th
    p = projects(hosts=2)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:  # (set up, warmed)
        assert m.map_async(by_value(lambda x: x), [0], name="warm").result(timeout=TIMEOUT) == [0]
    threads0, fds0 = th.active_count(), _fds()
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        for i in range(8):
            assert m.map_async(by_value(lambda x: x + 1), [i], name=f"row-{i}").result(timeout=TIMEOUT) == [i + 1]
        # each finished job's batch is watched no more: one watch (the top) stays
        wait_until(lambda: len(m.backend._watcher._watches) <= 1, 30, "the finished jobs' watches dropped")
    for i in range(4):
        with Master("boinc", project_home=str(p.root), chunksize=1) as m:
            assert m.map_async(by_value(lambda x: -x), [i], name=f"master-{i}").result(timeout=TIMEOUT) == [-i]
    wait_until(lambda: th.active_count() <= threads0, 30, f"threads back to {threads0} (now {_watch_threads()})")
    assert _fds() <= fds0 + 2, (fds0, _fds())


# --- a job's files leave the project ----------------------------------------------------------------------------
def _job_files(p: StandInProject, batch: int) -> list[Path]:
    found = [f for f in (p.root / "templates").glob(f"pymw_{batch}_*")]
    found += [f for f in (p.root / "download").rglob(f"pymw_{batch}_*")]
    return found


def test_a_finished_or_removed_jobs_files_leave_download_and_templates(projects):
    p = projects(hosts=2)  # (one busy with the running job's task, one for the other job)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        running = m.map_async(sleepy, [60], name="still-running")
        wait_until(lambda: len(p.workunits()) == 1, TIMEOUT, "the running job's work unit")
        [busy] = {w["batch"] for w in p.workunits()}
        wait_until(lambda: p.results(server_state=4), TIMEOUT, "the running job's task sent")
        busy_files = sorted(_job_files(p, busy))
        # its 2 templates, the function file and its chunk's input (each with its .md5)
        assert len(busy_files) == 6, busy_files
        done = m.map_async(by_value(lambda x: x * 2), [1, 2], name="finished")
        assert done.result(timeout=TIMEOUT) == [2, 4]
        [batch] = {w["batch"] for w in p.workunits()} - {busy}
        wait_until(lambda: not _job_files(p, batch), 60,
                   f"the finished job's files gone (left: {_job_files(p, batch)})")
        # the running job's are untouched
        assert sorted(_job_files(p, busy)) == busy_files and not running.done()
        running.remove(cancel=True)
        wait_until(lambda: not _job_files(p, busy), 60, f"the removed job's files gone ({_job_files(p, busy)})")
        assert not any((p.root / "pymw_results" / str(busy)).iterdir())


# --- cancelling: ranges of ids, not a process per work unit ---------------------------------------------------
def _count_tools(monkeypatch) -> list[list[str]]:
    """The argv of every project tool the backend runs."""
    from pymw_magic.backends import boinc as boinc_backend
    calls: list[list[str]] = []
    real = boinc_backend.Project.tool

    def counting(self, argv, *a, **kw):
        calls.append(list(argv))
        return real(self, argv, *a, **kw)
    monkeypatch.setattr(boinc_backend.Project, "tool", counting)
    return calls


def test_cancel_uses_id_ranges_and_never_touches_another_jobs_work_units(projects, monkeypatch):
    p = projects(hosts=1)
    calls = _count_tools(monkeypatch)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        a = m.map_async(sleepy, [60] * 12, name="many")
        wait_until(lambda: len(p.workunits()) == 12, TIMEOUT, "the first job's work units")
        b = m.map_async(sleepy, [60], name="bystander")
        wait_until(lambda: len(p.workunits()) == 13, TIMEOUT, "the second job's work unit")
        [mine] = {w["batch"] for w in p.workunits()[:12]}
        # more of the first job's batch after the other's (ids not consecutive: 1-12, 13 theirs, 14-15)
        first = p.workunits()[0]
        files = [f["phys"] for f in json.loads(first["files"])]
        subprocess.run([str(p.root / "bin" / "create_work"), "--appname", "pymw", "--batch", str(mine),
                        "--wu_template", f"templates/pymw_{mine}_in", "--result_template", f"templates/pymw_{mine}_out",
                        "--stdin"], input=f"--wu_name pymw_{mine}_90_1 {' '.join(files)}\n"
                        f"--wu_name pymw_{mine}_91_1 {' '.join(files)}\n", text=True, cwd=p.root, check=True,
                       timeout=120)
        names = [w["name"] for w in p.workunits(batch=mine)]
        del calls[:]
        assert m.backend.project.cancel_many(mine, names) == []
        cancels = [c for c in calls if c[0] == "cancel_jobs"]
        assert len(cancels) <= 3 and all(c[1] != "--name" for c in cancels), cancels  # (2 ranges; one may be done)
        assert all(w["error_mask"] & 16 for w in p.workunits(batch=mine))
        assert not p.workunits(name=[w["name"] for w in p.workunits() if w["batch"] != mine][0])[0]["error_mask"]
        del calls[:]
        assert b.cancel() == 1
        wait_until(lambda: all(w["error_mask"] & 16 or w["canonical_resultid"] for w in p.workunits()), 60,
                   "the second job cancelled")
        assert a.cancel() >= 0


def test_the_stand_ins_cancel_jobs_takes_exactly_boincs_command_lines(projects):
    p = projects(hosts=1)

    def cancel(*args):
        return subprocess.run([str(p.root / "bin" / "cancel_jobs"), *args], cwd=p.root, capture_output=True,
                              text=True, timeout=120)
    for bad in ((), ("1",), ("1", "2", "3"), ("0", "5"), ("abc", "5"), ("--batch", "7")):
        out = cancel(*bad)
        assert out.returncode == 1 and "Usage: cancel_jobs min-ID max-ID" in out.stderr, (bad, out)
    out = cancel("--name", "no_such_wu")
    assert out.returncode == 1 and out.stderr == "No workunit named 'no_such_wu'\n"
    assert cancel("1", "1000").returncode == 0   # (a range of ids nobody has: nothing to do, as BOINC's)


def test_wrong_option_types_are_clear_errors_naming_option_type_and_value(projects):
    p = projects(hosts=1)
    for options, words in (({"custom_app_dir": 123}, ("custom_app_dir", "a directory path", "123", "int")),
                           ({"project_home": ["x"]}, ("project_home", "a directory path", "['x']", "list")),
                           ({"signing_key": 4.5}, ("signing_key", "a file path", "4.5", "float")),
                           ({"target_nresults": True}, ("target_nresults", "whole number", "True", "bool")),
                           ({"max_nbytes": [1]}, ("max_nbytes", "whole number", "[1]"))):
        kwargs = {"project_home": str(p.root), **options}
        with pytest.raises(ValueError) as info:
            Master("boinc", **kwargs)
        assert all(w in str(info.value) for w in words), (options, str(info.value))
    with pytest.raises(ValueError, match=r"option 'python' expects .*, not 5 \(type int\)"):
        Master("local", workers=1, python=5)
    # a path object is a path
    with Master("boinc", project_home=p.root) as m:
        assert m.backend.project.path == p.root


# --- the kernel restarting mid-batch ------------------------------------------------------------------------
KERNEL_SETUP = """%load_ext pymw_magic
%pymw use boinc --project-home {root} --chunksize 1
"""


@pytest.mark.timeout(600)
def test_a_kernel_restart_mid_batch_then_attach_gets_every_result(projects, kernels):
    """A real kernel submits, is restarted while the batch runs (its master
    detaches: the work units go on), and the new kernel's %pymw attach gets
    every result; nothing was cancelled on the project."""
    from test_jobs_magic import run
    p = projects(hosts=1)
    km, kc, _ = kernels()

    def ok(code: str, timeout: float = 300) -> str:
        status, out = run(kc, code, timeout)
        assert status == "ok", out
        return out
    ok(KERNEL_SETUP.format(root=p.root))
    ok("%%pymw --map n in range(5) --name overnight --nowait --out overnight\n"
       "import time\ntime.sleep(2)\nn ** 3")
    wait_until(lambda: len(p.workunits()) == 5 and p.results(server_state=4), TIMEOUT, "a task running")
    assert sum(bool(w["canonical_resultid"]) for w in p.workunits()) < 5
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=120)
    assert not any(w["error_mask"] for w in p.workunits())  # (detached, not cancelled)
    ok(KERNEL_SETUP.format(root=p.root))
    assert "attached job 'overnight'" in ok("%pymw attach overnight")
    out = ok("print(_pymw_job.result(timeout=240, return_exceptions=True))")
    assert out.strip() == str([n ** 3 for n in range(5)]), out
    assert all(w["canonical_resultid"] and not w["error_mask"] for w in p.workunits()), p.workunits()
    assert len(p.results()) == 5  # every task ran once


def test_a_planted_notes_line_is_shown_escaped_and_a_forged_one_skipped(projects, caplog):
    """pymw_results/ is writable by the project's group: what a notes line
    says reaches the log only as escaped text, and lines of the wrong shape
    or about another job's work units are skipped."""
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), chunksize=1, retries=0) as m:
        job = m.map_async(sleepy, [4], name="noted")
        wait_until(lambda: len(p.workunits()) == 1, TIMEOUT, "the work unit created")
        [wu] = p.workunits()
        notes = Path(p.root, "pymw_results", str(wu["batch"]), "notes")
        notes.parent.mkdir(parents=True, exist_ok=True)
        with open(notes, "ab") as f:
            f.write(json.dumps({"wu": wu["name"], "values": 5}).encode() + b"\n")
            f.write(json.dumps({"wu": "pymw_1_0_1", "values": "not this job's"}).encode() + b"\n")
            f.write(json.dumps({"wu": wu["name"], "results": ["a", "b"],
                                "values": "task 0: \x1b[2J\u202e1 / 2"}).encode() + b"\n")
        wait_until(lambda: [r for r in caplog.records if "disagree" in r.getMessage()], 30, "the warning")
        assert job.result(timeout=TIMEOUT) == [4]
    said = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert len(said) == 1 and "\\x1b[2J\\u202e1 / 2" in said[0] and "\x1b" not in said[0], said
    assert "not this job" not in " ".join(r.getMessage() for r in caplog.records)


def test_cancelling_a_job_cancels_each_work_unit_once_in_one_process(projects, monkeypatch):
    """job.cancel() of 10 work units: one cancel_jobs MIN MAX (the
    follower's removal and the scheduler's each asked: each work unit was
    cancelled twice, one process each); cancelling again runs nothing."""
    p = projects(hosts=1)
    calls = _count_tools(monkeypatch)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(sleepy, [60] * 10, name="cancel-once")
        wait_until(lambda: len(p.workunits()) == 10, TIMEOUT, "the work units created")
        del calls[:]
        job.cancel()
        wait_until(lambda: all(w["error_mask"] & 16 for w in p.workunits()), 60, "the work units cancelled")
        assert job.wait(60)
        first = [c for c in calls if c[0] == "cancel_jobs"]
        assert len(first) == 1 and first[0][1] != "--name", first
        assert job.cancel() == 0
    # (the master's shutdown ran too: still that one process)
    assert [c for c in calls if c[0] == "cancel_jobs"] == first


def test_without_watchdog_results_still_come_by_reading_every_second(projects, monkeypatch, caplog):
    import logging
    monkeypatch.setitem(sys.modules, "watchdog.observers", None)  # (import fails as if not installed)
    p = projects(hosts=1)
    with caplog.at_level(logging.INFO, logger="pymw_magic"):
        with Master("boinc", project_home=str(p.root), chunksize=1) as m:
            assert m.map_async(by_value(lambda x: x * 7), [1, 2], name="no-watchdog").result(timeout=TIMEOUT) == [7, 14]
            assert not m.backend._watcher.available
    assert any("watchdog is not installed" in r.getMessage() for r in caplog.records)
