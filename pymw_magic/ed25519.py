"""Ed25519 signatures for payloads sent to hosts we do not control.

Two sides, one module:

* the **verifier** (:func:`verify`) — RFC 8032 Ed25519 in pure Python with
  the standard library only, because it runs on volunteer hosts from the
  shipped runtime zipapp, where no compiled package exists.  Strict: the
  public key and R must be canonical point encodings, S must be below the
  group order L, lengths must be exact, and a public key of small order
  (the identity and the 7 other torsion points, for which a "signature"
  of any message is made without a private key) is refused, as libsodium
  does (``cryptography`` accepts them); the check is the cofactorless
  ``[S]B == R + [k]A`` on the encoding of R (as OpenSSL, and so the
  ``cryptography`` package, does it).
* the **signer** (:class:`SigningKey`, :func:`load_or_create`) — master side
  only: ``cryptography``'s Ed25519, imported when a key is made or used.
  The private key lives in the user's config directory, readable by its
  owner only, and is never written anywhere else.

Speed: a verification costs about 1-3 ms here (a 4-bit fixed window for
``[k]A``, a precomputed comb for the base point); a payload is verified
once per file.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

P = 2 ** 255 - 19
L = 2 ** 252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
D2 = 2 * D % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

# Points in extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, xy = T/Z.
_GY = 4 * pow(5, P - 2, P) % P
_GX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
BASE = (_GX, _GY, 1, _GX * _GY % P)
IDENTITY = (0, 1, 1, 0)


def _add(p1: tuple, p2: tuple) -> tuple:
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * D2 * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _double(p1: tuple) -> tuple:
    x1, y1, z1, _ = p1
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % P
    g = a - b
    f = c + g
    return e * f % P, g * h % P, f * g % P, e * h % P


def _encode(point: tuple) -> bytes:
    x, y, z, _ = point
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decode(s: bytes) -> tuple | None:
    """The point a 32-byte string encodes (RFC 8032 5.1.3), None if it is
    not a canonical encoding of a curve point."""
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= P:
        return None
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    # x = sqrt(u/v) without an inversion: x = u v^3 (u v^7)^((p-5)/8)
    v3 = v * v % P * v % P
    x = u * v3 % P * pow(u * v3 % P * v3 % P * v % P, (P - 5) // 8, P) % P
    vx2 = v * x % P * x % P
    if vx2 == u:
        pass
    elif vx2 == (-u) % P:
        x = x * SQRT_M1 % P
    else:
        return None
    if x == 0 and sign:
        return None
    if (x & 1) != sign:
        x = P - x
    return x, y, 1, x * y % P


_comb: list[list[tuple]] | None = None
_comb_lock = threading.Lock()


def _base_comb() -> list[list[tuple]]:
    """[j * 16^i]B for i < 64, j < 16: [S]B is then 64 additions."""
    global _comb
    if _comb is None:
        with _comb_lock:
            if _comb is None:
                table = []
                point = BASE
                for _ in range(64):
                    row = [IDENTITY, point]
                    for _ in range(14):
                        row.append(_add(row[-1], point))
                    table.append(row)
                    point = _double(_double(_double(_double(point))))
                _comb = table
    return _comb


def _base_mul(s: int) -> tuple:
    acc = IDENTITY
    for row in _base_comb():
        digit = s & 15
        if digit:
            acc = _add(acc, row[digit])
        s >>= 4
    return acc


def _mul(k: int, point: tuple) -> tuple:
    """[k]point, a fixed 4-bit window (k < 2^256; timing is not secret here:
    verification handles public data only)."""
    table = [IDENTITY, point]
    for _ in range(14):
        table.append(_add(table[-1], point))
    acc = IDENTITY
    for shift in range(252, -4, -4):
        acc = _double(_double(_double(_double(acc))))
        digit = (k >> shift) & 15
        if digit:
            acc = _add(acc, table[digit])
    return acc


def _is_small_order(point: tuple) -> bool:
    """Whether [8]point is the identity (x = 0 and y = z)."""
    x, y, z, _ = _double(_double(_double(point)))
    return x % P == 0 and (y - z) % P == 0


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid RFC 8032 Ed25519 signature of
    ``message`` under ``public_key`` (32 bytes).  Never raises on bad input:
    anything malformed is simply not valid."""
    try:
        public_key, signature = bytes(public_key), bytes(signature)
    except TypeError:
        return False
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    a = _decode(public_key)
    if a is None:
        return False
    if _is_small_order(a):
        return False  # (the identity and the other 7 torsion points: "signatures" anyone can make)
    r_bytes = signature[:32]
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        return False  # (non-canonical S: the malleability RFC 8032 forbids)
    # (R is not decoded: R' below is encoded canonically, so an R that is not
    # a canonical encoding of a point can never match it)
    k = int.from_bytes(hashlib.sha512(r_bytes + public_key + bytes(message)).digest(), "little") % L
    # R' = [S]B - [k]A, compared as an encoding with the R that was sent
    ka = _mul(k, a)
    neg_ka = ((-ka[0]) % P, ka[1], ka[2], (-ka[3]) % P)
    return _encode(_add(_base_mul(s), neg_ka)) == r_bytes


# --- the master's side: keys and signing (cryptography) ----------------------------------

class SigningKey:
    """An Ed25519 private key (``cryptography``), for signing payloads on
    the master.  ``public_bytes``: the 32-byte public key the hosts verify with."""

    def __init__(self, private: Any):
        self._private = private
        from cryptography.hazmat.primitives import serialization
        self.public_bytes: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> "SigningKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(bytes(data))

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    def __repr__(self) -> str:  # (never the private key)
        return f"SigningKey(public={self.public_bytes.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("a private signing key is not pickled: it never leaves the master")


def default_key_path() -> Path:
    """``$PYMW_CONFIG/ed25519.key``, else the user's config directory for pymw-magic."""
    env = os.environ.get("PYMW_CONFIG")
    if env:
        return Path(env).expanduser() / "ed25519.key"
    try:
        from platformdirs import user_config_dir
    except ImportError:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(base) / "pymw-magic" / "ed25519.key"
    return Path(user_config_dir("pymw-magic", appauthor=False)) / "ed25519.key"


def load_or_create(path: Path | str | None = None) -> SigningKey:
    """The user's signing key, made on first use (a PEM file readable by
    its owner only).  Safe when several processes make it at once: the
    first whole file wins, the others read it."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path) if path is not None else default_key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = SigningKey.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_pem())
            try:
                os.link(tmp, path)  # (never replaces a key another process made first)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"the signing key {path} is readable by others (mode {mode:o}): "
                              f"chmod 600 {path}, or remove it to make a new one")
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{path} holds no Ed25519 private key")
    return SigningKey(private)
