"""Console passwords, hashed with scrypt (hashlib, OpenSSL): the configuration keeps only
`scrypt$N$r$p$salt$hash` (salt and hash unpadded base64url), as `gateway accounts hash`
prints it and gateway.config.PASSWORD_HASH checks it. Pure code.

Hashing costs about 0.1 s and 32 MiB on purpose (N=2**15, r=8): a stolen configuration is
slow to attack. Callers on the reactor thread run `verify_password` in a thread.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from gateway.config import PASSWORD_HASH

N, R, P = 2 ** 15, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
MIN_PASSWORD, MAX_PASSWORD = 8, 1024  # characters; the login form reads no more than the maximum
_MAX_N = 2 ** 20  # a hash asking more than this is refused, not computed (1 GiB of memory)


def hash_password(password: str, *, n: int = N) -> str:
    """A new hash of `password` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, n, R, P, KEY_BYTES)
    return f"scrypt${n}${R}${P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (compared in constant time); False for a hash
    that is malformed or asks unreasonable costs."""
    match = PASSWORD_HASH.fullmatch(stored or "")
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= 32 or not 1 <= p <= 16:
        return False
    try:
        salt, expected = _unb64(match.group(4)), _unb64(match.group(5))
    except ValueError:
        return False
    key = _scrypt(password, salt, n, r, p, len(expected))
    return hmac.compare_digest(key, expected)


# Verified when an account name is unknown, so that a wrong name costs the same time as a
# wrong password (no way to tell which accounts exist).
DUMMY_HASH = "scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=129 * n * r * p + (1 << 20))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
