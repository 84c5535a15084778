"""The scripts pymw-magic installs into a BOINC project's bin/ — the
validator and the assimilator — run as BOINC's script_validator and
script_assimilator run them (a process, its arguments, cwd tmp_<host>),
on outputs the shipped runtime writes."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pymw_magic import boinc_app
from pymw_magic.boinc_app import validator
from pymw_magic.oneshot import Outcome, output_bytes
from pymw_magic.runtime import runtime_zipapp


@pytest.fixture
def project(tmp_path) -> Path:
    """A directory laid out as far as the scripts need: bin/ with them, tmp_<host>/."""
    root = tmp_path / "project"
    (root / "bin").mkdir(parents=True)
    (root / "tmp_host").mkdir()
    for name in boinc_app.SCRIPTS:
        (root / "bin" / name).write_bytes(boinc_app.script_bytes(name))
        (root / "bin" / name).chmod(0o755)
    shutil.copyfile(runtime_zipapp(), root / "bin" / "pymw_runtime.pyz")
    return root


def output(path: Path, values: dict, failed: dict | None = None, codec: str = "safe") -> Path:
    outcomes = [Outcome(seq, True, v, None, "", "", 1.0, 2.0) for seq, v in values.items()]
    outcomes += [Outcome(seq, False, None, (None, t, "m", "tb"), "", "", 1.0, 2.0) for seq, t in (failed or {}).items()]
    header = {"job": "j", "index": 0, "codec": codec}
    path.write_bytes(output_bytes(header, outcomes, None, 1.0, "sha256", None))
    return path


def run(project: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    # (as BOINC: system("../bin/NAME args") from tmp_<host>)
    return subprocess.run(f"../bin/{name} " + " ".join(args), shell=True, cwd=project / "tmp_host",
                          capture_output=True, text=True, timeout=120)


def test_same_compares_floats_within_the_tolerance():
    assert validator.same(1.0, 1.0 + 1e-12) and not validator.same(1.0, 1.0 + 1e-6)
    assert validator.same(float("nan"), float("nan")) and not validator.same(float("nan"), 1.0)
    assert validator.same([1, (2.0, {"a": 3.0})], [1, (2.0 + 1e-15, {"a": 3.0})])
    assert not validator.same((1, 2), [1, 2])            # a tuple is not a list
    assert not validator.same(True, 1) and validator.same(2, 2.0)
    assert validator.same(complex(1, 2), complex(1, 2 + 1e-14))
    assert not validator.same({"a": 1}, {"b": 1})
    np = pytest.importorskip("numpy")
    a = np.linspace(0, 1, 100)
    assert validator.same(a, a + 1e-13) and not validator.same(a, a + 1e-3)
    assert not validator.same(a, a.astype(np.float32))
    assert validator.same(np.arange(5), np.arange(5)) and not validator.same(np.arange(5), np.arange(1, 6))
    assert math.isnan(float("nan"))


def test_validator_init_and_compare(project, tmp_path):
    one = output(tmp_path / "wu_a_0_0", {0: 1.5, 1: [1, 2]}, {2: "ValueError"})
    two = output(tmp_path / "wu_a_1_0", {0: 1.5 + 1e-13, 1: [1, 2]}, {2: "ValueError"})
    other = output(tmp_path / "wu_a_2_0", {0: 2.5, 1: [1, 2]}, {2: "ValueError"})
    assert run(project, "pymw_validate", str(one)).returncode == 0
    assert run(project, "pymw_validate", str(one), str(two)).returncode == 0
    differ = run(project, "pymw_validate", str(one), str(other))
    assert differ.returncode == 1 and "task 0: 1.5 / 2.5" in differ.stderr
    note = (project / "pymw_results" / "disagree" / other.name).read_text()
    assert "task 0: 1.5 / 2.5" in note
    failing = output(tmp_path / "wu_a_3_0", {0: 1.5, 1: [1, 2]}, {2: "TypeError"})
    assert run(project, "pymw_validate", str(one), str(failing)).returncode == 1


def test_validator_refuses_what_is_not_an_output(project, tmp_path):
    good = output(tmp_path / "good", {0: 1})
    bad = tmp_path / "bad"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    assert run(project, "pymw_validate", str(bad)).returncode == 1
    junk = tmp_path / "junk"
    junk.write_bytes(pickle.dumps({"a": 1}))
    result = run(project, "pymw_validate", str(junk))
    assert result.returncode == 1 and "invalid result" in result.stderr
    assert run(project, "pymw_validate").returncode == 2


def test_pickled_results_are_compared_as_bytes_never_loaded(project, tmp_path):
    one = output(tmp_path / "p1", {0: {1, 2}}, codec="pickle")
    two = output(tmp_path / "p2", {0: {1, 2}}, codec="pickle")
    three = output(tmp_path / "p3", {0: {1, 3}}, codec="pickle")
    assert run(project, "pymw_validate", str(one), str(two)).returncode == 0
    assert run(project, "pymw_validate", str(one), str(three)).returncode == 1


def test_assimilator_copies_the_output_and_writes_an_event(project, tmp_path):
    # BOINC's default arguments: wu_id, then the canonical result's files (<wu>_<replica>_r<random>_<i>)
    upload = output(tmp_path / "pymw_1234_0_1_0_r440741715_0", {0: 7})
    assert run(project, "pymw_assimilate", "17", str(upload)).returncode == 0
    where = project / "pymw_results" / "1234"
    assert (where / "pymw_1234_0_1.out").read_bytes() == upload.read_bytes()
    [event] = [json.loads(line) for line in (where / "events").read_text().splitlines()]
    assert event["wu"] == "pymw_1234_0_1" and event["ok"] is True and event["file"] == "pymw_1234_0_1.out"
    upload.unlink()   # (the file deleter's turn: our copy stays)
    assert (where / "pymw_1234_0_1.out").exists()
    # an older server's output name (<result>_<i>) names the same work unit
    old = output(tmp_path / "pymw_1234_5_2_1_0", {0: 8})
    assert run(project, "pymw_assimilate", "18", str(old)).returncode == 0
    assert (where / "pymw_1234_5_2.out").exists()
    # not one of ours, or no file: refused (the assimilator tries again later), nothing written
    other = output(tmp_path / "other_app_wu_0_r1_0", {0: 1})
    assert run(project, "pymw_assimilate", "19", str(other)).returncode != 0
    assert run(project, "pymw_assimilate", "19").returncode == 2


def test_assimilator_reports_a_failed_work_unit(project, tmp_path):
    notes = project / "pymw_results" / "disagree"
    notes.mkdir(parents=True)
    (notes / "pymw_1234_0_1_2_r5_0").write_text("pymw_1234_0_1_1_r4_0 vs pymw_1234_0_1_2_r5_0:\ntask 0: 15 / 16\n")
    (notes / "pymw_1234_9_1_0_r6_0").write_text("another work unit's note\n")
    assert run(project, "pymw_assimilate", "--error", "6", "pymw_1234_0_1", "42", "1234").returncode == 0
    [event] = [json.loads(line) for line in (project / "pymw_results" / "1234" / "events").read_text().splitlines()]
    assert event["ok"] is False and event["error_mask"] == 6 and event["wu_id"] == 42
    assert "too many error results" in event["reason"] and "disagree" in event["reason"]
    assert "task 0: 15 / 16" in event["disagree"] and "another" not in event["disagree"]
    assert event["stderr"] == ""   # (no BOINC database library here)
    bad = run(project, "pymw_assimilate", "--error", "2", "../escape", "1", "1")
    assert bad.returncode != 0 and not list((project / "pymw_results").glob("*escape*"))


def test_launcher_fails_clearly_without_the_interpreter(tmp_path):
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "launcher").write_text(boinc_app.LAUNCHER)
    (slot / "launcher").chmod(0o755)
    proc = subprocess.run([str(slot / "launcher"), "no-such-python3"], cwd=slot, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "no-such-python3" in proc.stderr
    assert not (slot / "boinc_finish_called").exists()


def test_assimilator_keeps_pymw_results_closed_to_the_projects_group(project, tmp_path):
    """BOINC's daemons run with a group-sharing umask (002); the project's
    group holds the web server's user: pymw_results/ must not be writable
    by it (it could plant event lines and outputs), also when an older
    pymw-magic made it so."""
    upload = output(tmp_path / "pymw_77_0_1_0_r1_0", {0: 1})
    (project / "pymw_results").mkdir(mode=0o775)
    (project / "pymw_results").chmod(0o775)
    done = subprocess.run(f"umask 002; ../bin/pymw_assimilate 17 {upload}", shell=True, cwd=project / "tmp_host",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for d in (project / "pymw_results", project / "pymw_results" / "77"):
        assert d.stat().st_mode & 0o022 == 0, (d, oct(d.stat().st_mode))
    shutil.rmtree(project / "pymw_results")
    done = subprocess.run(f"umask 002; ../bin/pymw_assimilate --error 2 pymw_78_0_1 5 78", shell=True,
                          cwd=project / "tmp_host", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for d in (project / "pymw_results", project / "pymw_results" / "78"):
        assert d.stat().st_mode & 0o022 == 0, (d, oct(d.stat().st_mode))


def test_validator_tells_the_master_at_once_which_values_disagree(project, tmp_path):
    """Disagreeing replicas of one of our work units: a JSON line in
    pymw_results/<batch>/notes (what the master watches) with both results
    and the values, capped; another work unit's (not ours) gets none."""
    one = output(tmp_path / "pymw_4321_0_1_0_r11_0", {0: 15, 1: "\x1b[31m" * 3000})
    two = output(tmp_path / "pymw_4321_0_1_1_r22_0", {0: 16, 1: "x"})
    assert run(project, "pymw_validate", str(one), str(two)).returncode == 1
    [line] = (project / "pymw_results" / "4321" / "notes").read_text().splitlines()
    rec = json.loads(line)
    assert rec["wu"] == "pymw_4321_0_1" and rec["kind"] == "disagree"
    assert rec["results"] == ["pymw_4321_0_1_0_r11_0", "pymw_4321_0_1_1_r22_0"]
    assert "task 0: 15 / 16" in rec["values"] and len(rec["values"]) <= 4000
    assert oct((project / "pymw_results" / "4321").stat().st_mode & 0o777) == "0o750"
    other = output(tmp_path / "other_app_wu_0_r1_0", {0: 1})
    other2 = output(tmp_path / "other_app_wu_1_r2_0", {0: 2})
    assert run(project, "pymw_validate", str(other), str(other2)).returncode == 1
    assert sorted(p.name for p in (project / "pymw_results").iterdir()) == ["4321", "disagree"]
