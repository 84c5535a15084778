"""The pure-Python Ed25519 verifier against RFC 8032's test vectors and
against ``cryptography``'s Ed25519 (OpenSSL), with the cases it must
refuse; and the master's signing key on disk."""

from __future__ import annotations

import os
import pickle
import random
import stat
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.exceptions import InvalidSignature

from conftest import ROOT
from pymw_magic import ed25519
from pymw_magic.ed25519 import L, P, SigningKey, load_or_create, verify

# RFC 8032, section 7.1: (SECRET KEY, PUBLIC KEY, MESSAGE, SIGNATURE)
RFC8032 = [
    ("TEST 1",
     "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("TEST 2",
     "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("TEST 3",
     "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("TEST SHA(abc)",
     "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
     "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
     "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]


def raw_public(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def openssl_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@pytest.mark.parametrize("name, secret, public, message, signature", RFC8032, ids=[v[0] for v in RFC8032])
def test_rfc8032_vectors(name, secret, public, message, signature):
    public, message, signature = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert verify(public, message, signature)
    # (the vectors typed in are the RFC's: cryptography derives the same key and signature)
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert raw_public(private) == public and private.sign(message) == signature
    assert not verify(public, message + b"\0", signature)
    assert not verify(public, message, signature[:-1] + bytes([signature[-1] ^ 0x01]))
    assert not verify(public, message, bytes([signature[0] ^ 0x01]) + signature[1:])


def test_agrees_with_cryptography_on_random_keys_and_messages():
    rng = random.Random(8032)
    keys = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(20)]
    publics = [raw_public(k) for k in keys]
    checked = 0
    for trial in range(300):
        i = rng.randrange(len(keys))
        message = rng.randbytes(rng.choice([0, 1, 31, 64, 200, 5000]))
        signature = keys[i].sign(message)
        cases = [(publics[i], message, signature, True)]
        other = (i + 1 + rng.randrange(len(keys) - 1)) % len(keys)
        cases.append((publics[other], message, signature, False))  # another key
        if message:
            bad = bytearray(message)
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            cases.append((publics[i], bytes(bad), signature, False))  # another message
        bad_sig = bytearray(signature)
        bad_sig[rng.randrange(64)] ^= 1 << rng.randrange(8)
        cases.append((publics[i], message, bytes(bad_sig), None))  # (almost surely invalid)
        s = int.from_bytes(signature[32:], "little")
        if s + L < 2 ** 256:  # the same signature with S + L: non-canonical S
            cases.append((publics[i], message, signature[:32] + (s + L).to_bytes(32, "little"), False))
        for public, msg, sig, expected in cases:
            got = verify(public, msg, sig)
            assert got == openssl_verify(public, msg, sig), (trial, public.hex(), msg.hex(), sig.hex())
            if expected is not None:
                assert got is expected
            checked += 1
    assert checked > 1200


@pytest.mark.parametrize("public_len, signature_len", [(31, 64), (33, 64), (32, 63), (32, 65), (0, 0)])
def test_wrong_lengths_are_refused(public_len, signature_len):
    private = Ed25519PrivateKey.generate()
    public, signature = raw_public(private), private.sign(b"m")
    public = (public + b"\0")[:public_len]
    signature = (signature + b"\0")[:signature_len]
    assert verify(public, b"m", signature) is False


@pytest.mark.parametrize("public, signature", [(None, b"\0" * 64), ("text", b"\0" * 64), (b"\0" * 32, None)])
def test_other_types_are_refused_not_raised(public, signature):
    assert verify(public, b"m", signature) is False


def test_s_at_or_above_the_group_order_is_refused():
    private = Ed25519PrivateKey.generate()
    public, signature = raw_public(private), private.sign(b"msg")
    for s in (L, L + 1, 2 ** 256 - 1):
        assert verify(public, b"msg", signature[:32] + s.to_bytes(32, "little")) is False


def test_non_canonical_or_off_curve_public_keys_are_refused():
    private = Ed25519PrivateKey.generate()
    signature = private.sign(b"msg")
    # y >= p: a non-canonical encoding (RFC 8032 5.1.3 step 1 says: decoding fails)
    for y in (P, P + 1, 2 ** 255 - 1):
        assert verify(y.to_bytes(32, "little"), b"msg", signature) is False
    # a y with no x on the curve (u/v not a square)
    off = next(y for y in range(2, 100) if ed25519._decode(y.to_bytes(32, "little")) is None)
    assert verify(off.to_bytes(32, "little"), b"msg", signature) is False
    # x = 0 with the sign bit set
    assert verify((1 | (1 << 255)).to_bytes(32, "little"), b"msg", signature) is False


def test_verify_speed():
    private = Ed25519PrivateKey.generate()
    public, message = raw_public(private), os.urandom(1000)
    signature = private.sign(message)
    verify(public, message, signature)  # (the base point's table, once)
    n = 50
    cpu = time.process_time()
    for _ in range(n):
        assert verify(public, message, signature)
    per = (time.process_time() - cpu) / n
    print(f"\nEd25519 verify (pure Python): {per * 1000:.2f} ms CPU per signature")
    assert per < 0.05


def test_the_verifier_needs_only_the_standard_library(tmp_path):
    """It imports and verifies where no compiled package exists (-S: no site-packages)."""
    private = Ed25519PrivateKey.generate()
    public, signature = raw_public(private), private.sign(b"hello")
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); "
            "import importlib.util as u; spec = u.spec_from_file_location('ed', sys.argv[1]); "
            "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.verify(bytes.fromhex(sys.argv[2]), b'hello', bytes.fromhex(sys.argv[3])), "
            "'cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, os.path.join(ROOT, "pymw_magic", "ed25519.py"),
                          public.hex(), signature.hex()], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr


# --- the master's key ----------------------------------------------------------------------

def test_signing_key_signs_what_the_verifier_accepts_and_never_leaks():
    key = SigningKey.generate()
    signature = key.sign(b"payload")
    assert verify(key.public_bytes, b"payload", signature)
    assert key.public_bytes.hex() in repr(key) and b"PRIVATE" in key.private_pem()
    with pytest.raises(TypeError, match="never leaves the master"):
        pickle.dumps(key)
    import cloudpickle
    with pytest.raises(TypeError, match="never leaves the master"):
        cloudpickle.dumps(key)


def test_load_or_create_makes_one_owner_only_key_and_finds_it_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMW_CONFIG", str(tmp_path / "config"))
    first = load_or_create()
    path = tmp_path / "config" / "ed25519.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create().public_bytes == first.public_bytes
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        load_or_create()


def test_processes_making_the_key_at_once_agree(tmp_path):
    path = tmp_path / "k" / "ed25519.key"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pymw_magic.ed25519 import load_or_create; "
            "print(load_or_create(sys.argv[2]).public_bytes.hex())")
    procs = [subprocess.Popen([sys.executable, "-c", code, ROOT, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["ed25519.key"]


def test_threads_verifying_at_once_from_a_cold_start(monkeypatch):
    import threading
    keys = [Ed25519PrivateKey.generate() for _ in range(8)]
    cases = [(raw_public(k), f"m{i}".encode(), k.sign(f"m{i}".encode())) for i, k in enumerate(keys)]
    for trial in range(3):
        monkeypatch.setattr(ed25519, "_comb", None)  # (the base table made by whichever thread comes first)
        results: list = []
        barrier = threading.Barrier(16)

        def check(i):
            public, message, signature = cases[i % 8]
            barrier.wait(timeout=60)
            results.append((verify(public, message, signature), verify(public, message + b"x", signature)))
        threads = [threading.Thread(target=check, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [(True, False)] * 16
