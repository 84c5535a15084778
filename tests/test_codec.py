"""The safe result codec: what it carries (exactly, types kept), what it
refuses and how it says so, and that decoding never unpickles, never
allocates what the bytes do not hold, and stays within its caps."""

from __future__ import annotations

import enum
import io
import json
import math
import pathlib
import pickle
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from conftest import ROOT
from pymw_magic.codec import MAGIC, CodecError, decode, encode
from pymw_magic.errors import PayloadError


with warnings.catch_warnings():
    warnings.simplefilter("ignore", PendingDeprecationWarning)  # (np.matrix is still what some code returns)
    MATRIX = np.matrix([[1, 2]])


class Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def same(a, b) -> bool:
    """Equal, with the same types all the way down (NaN equal to NaN, -0.0 not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return (a.dtype == b.dtype and a.shape == b.shape
                and (a.flags.f_contiguous and not a.flags.c_contiguous) == (b.flags.f_contiguous and not b.flags.c_contiguous)
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and (a == b or (np.isnan(a) and np.isnan(b)))
    return a == b


VALUES = [
    None, True, False, 0, -7, 2 ** 200, -(2 ** 70), 1.5, -0.0, 1e308, 5e-324,
    float("nan"), float("inf"), float("-inf"), 3 + 4j, complex(float("inf"), -0.0),
    "", "text", "unicode é ☃ \U0001F600", "lone \ud800 surrogate", "$t", b"", b"\x00\xffbytes",
    [], (), {}, [1, "a", None], (1,), (1, (2, (3, [4, (5,)]))), [[], [()], ({},)],
    {"a": 1, "b": [1.5, (2, 3)]}, {"$t": [1, 2]}, {"$d": {"$f": "nan"}}, {"": None, "$": "$"},
    {"nested": {"deeper": {"deepest": (float("nan"), -0.0)}}},
    np.arange(12).reshape(3, 4), np.zeros((2, 3), order="F"), np.array([], dtype=np.float32),
    np.array(3.5), np.array([1 + 2j, np.nan]), np.array(["a", "bcd"]), np.array([b"x", b"yz"]),
    np.array([(1, 2.0)], dtype=[("i", "<i4"), ("f", "<f8")]), np.arange(10)[::3],
    np.array(["2026-12-06"], dtype="datetime64[D]"), np.array([True, False]),
    np.float64(2.5), np.float32(np.nan), np.int8(-3), np.uint64(2 ** 64 - 1), np.bool_(True), np.str_("s"),
    {"arrays": [np.ones(3), (np.int16(4), np.arange(2))], "same": None},
]


@pytest.mark.parametrize("value", VALUES, ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(VALUES)])
def test_round_trip_keeps_values_and_types(value):
    data = encode(value)
    assert data.startswith(MAGIC)
    assert same(decode(data), value)


def test_a_strided_array_travels_as_its_values():
    a = np.arange(20).reshape(4, 5)[:, ::2]
    b = decode(encode(a))
    assert np.array_equal(a, b) and b.dtype == a.dtype


def test_subclasses_of_plain_types_travel_as_their_base():
    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass
    assert same(decode(encode([Color.RED, Name("x")])), [1, "x"])


@pytest.mark.parametrize("value, where", [
    (object(), "the result is a builtins.object"),
    ({1: "a"}, "the result is a dict with a key of type int"),
    ([1, {"k": {1, 2}}], "the result[1]['k'] is a builtins.set"),
    ((1, Touch("/nonexistent")), "the result[1] is a test_codec.Touch"),
    (np.array([object()]), "the result is a NumPy array of Python objects"),
    (np.ma.array([1, 2], mask=[0, 1]), "the result is a numpy.ma.MaskedArray"),
    (MATRIX, "the result is a numpy.matrix"),
])
def test_what_it_cannot_carry_is_refused_saying_how_to_opt_in(value, where):
    with pytest.raises(CodecError) as err:
        encode(value)
    assert isinstance(err.value, PayloadError)
    assert str(err.value).startswith(where), str(err.value)
    assert "safe result codec" in str(err.value) and "trusted_results=True" in str(err.value)


def test_an_int_too_long_for_json_is_refused():
    with pytest.raises(CodecError, match="cannot be written as JSON"):
        encode([10 ** 5000])
    with pytest.raises(CodecError, match="malformed"):
        decode(MAGIC + b'{"v":' + b"9" * 5000 + b',"a":[]}\n')


def test_too_deep_a_value_is_refused():
    deep: list = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(CodecError, match="nested deeper"):
        encode(deep)


# --- decoding what a hostile host may send -------------------------------------------------

def test_a_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps([Touch(marker)])
    pickle.loads(payload)  # (control: loading it does touch the marker)
    assert marker.exists()
    marker.unlink()
    for data in (payload, MAGIC + payload, MAGIC + b'{"v":1,"a":[]}\n' + payload):
        with pytest.raises(CodecError):
            decode(data)
    assert not marker.exists()


def test_an_object_array_is_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    buf = io.BytesIO()
    np.save(buf, np.array([Touch(marker)], dtype=object), allow_pickle=True)
    npy = buf.getvalue()
    data = MAGIC + json.dumps({"v": {"$a": 0}, "a": [len(npy)]}).encode() + b"\n" + npy
    with pytest.raises(CodecError, match="Python objects is never read"):
        decode(data)
    assert not marker.exists()


def test_an_array_header_that_claims_more_than_its_bytes_allocates_nothing():
    npy = bytearray(encode(np.zeros(4))[len(MAGIC):].split(b"\n", 1)[1])
    header = bytes(npy).replace(b"(4,)", b"(1000000000000,)")
    assert header != bytes(npy)
    fixed = header[:10] + header[10:].replace(b" " * 8, b"", 1)  # (keep the header's length)
    for blob in (header, fixed):
        data = MAGIC + json.dumps({"v": {"$a": 0}, "a": [len(blob)]}).encode() + b"\n" + blob
        with pytest.raises(CodecError):
            decode(data)


@pytest.mark.parametrize("data, match", [
    (b"", "not a safe-codec value"),
    (MAGIC, "cut short"),
    (MAGIC + b"[1]\n", "not a value document"),
    (MAGIC + b'{"v":1}\n', "not a value document"),
    (MAGIC + b'{"v":{"$x":1},"a":[]}\n', "unknown tag"),
    (MAGIC + b'{"v":{"$a":0},"a":[]}\n', "not there"),
    (MAGIC + b'{"v":{"$a":0},"a":[5]}\n', "array table"),
    (MAGIC + b'{"v":1,"a":[]}\nextra', "after its end"),
    (MAGIC + b'{"v":NaN,"a":[]}\n', None),
    (MAGIC + b'{"v":{"$b":"!!"},"a":[]}\n', "malformed"),
    (MAGIC + b'{"v":{"$f":"1e999"},"a":[]}\n', "unknown tag"),
    (MAGIC + b'{"v":' + b"[" * 100000 + b"]" * 100000 + b',"a":[]}\n', "too deeply"),
    (MAGIC + b'{"v":"\xff","a":[]}\n', "malformed"),
])
def test_malformed_input_is_a_codec_error(data, match):
    if match is None:
        # JSON's NaN literal is Python's extension: harmless (a float), read as such
        assert math.isnan(decode(data))
        return
    with pytest.raises(CodecError, match=match):
        decode(data)


def test_the_size_cap():
    data = encode(np.zeros(1000))
    assert decode(data, max_bytes=len(data)).shape == (1000,)
    with pytest.raises(CodecError, match="over the cap"):
        decode(data, max_bytes=len(data) - 1)


def test_decoding_plain_data_needs_no_numpy():
    """NumPy is optional where results are read: plain data decodes
    without importing it; an array says what to install."""
    plain, array = encode({"a": (1, 2.5, float("nan"))}), encode(np.arange(3))
    code = ("import sys; sys.modules['numpy'] = None; sys.path.insert(0, sys.argv[1]); "
            "from pymw_magic.codec import decode, CodecError; "
            "print(decode(bytes.fromhex(sys.argv[2])));\n"
            "try:\n    decode(bytes.fromhex(sys.argv[3]))\nexcept CodecError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code, ROOT, plain.hex(), array.hex()], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "{'a': (1, 2.5, nan)}"
    assert "install numpy" in lines[1]


def test_cost_against_pickle():
    """Typical results: arrays cost about what pickle costs (a memory copy);
    plain data costs a JSON walk.  Printed for the report; the bound only
    catches an array going through JSON."""
    cases = {
        "float": 3.14159,
        "dict of 10 scalars": {f"k{i}": i * 1.5 for i in range(10)},
        "list of 1,000 floats": [i / 7 for i in range(1000)],
        "list of 100 (int, float, str) tuples": [(i, i / 3, f"s{i}") for i in range(100)],
        "1 MB float64 array": np.random.default_rng(0).random(125_000),
        "dict with 3 arrays of 10,000": {"x": np.arange(10_000.0), "y": np.ones(10_000), "n": 3},
    }
    lines = []
    for name, value in cases.items():
        n = max(5, int(400 / max(1, len(pickle.dumps(value)) // 10_000 + 1)))

        def best(fn) -> float:  # (best of 5 batches: a loaded machine's noise is one-sided)
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                runs.append((time.perf_counter() - t0) / n)
            return min(runs)
        safe = best(lambda: decode(encode(value)))
        pk = best(lambda: pickle.loads(pickle.dumps(value, protocol=5)))
        lines.append(f"{name:40s} safe {safe * 1e6:9.1f} us  pickle {pk * 1e6:9.1f} us  x{safe / pk:6.1f}  "
                     f"size {len(encode(value)):>9d} vs {len(pickle.dumps(value, protocol=5)):>9d} B")
        if "array" in name:  # (through JSON, 125,000 floats would take some 100 ms)
            assert safe < 10 * pk + 0.02, name
    print("\n" + "\n".join(lines))
