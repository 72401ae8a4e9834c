"""The signed QR payload of a prescription, its signing key, and QR images. Pure code.

Payload (ASCII, fits a version 10 QR code at level M):

    HIE1.<fields>.<signature>

- `fields` is base64url (no padding) of the UTF-8 text `id|inpe|yyyymmdd|digest|kid`: the
  prescription id, the prescriber's INPE, the issue date, the digest of the prescribed lines
  (SHA-256 of their canonical text, first 16 bytes, base64url) and the signing key's id;
- `signature` is base64url of the Ed25519 signature (RFC 8032) of the ASCII text
  `HIE1.<fields>`, so the version is signed too.

No patient data travels in the code: a reader without the gateway learns the id, who
prescribed and when, and can check offline, with the published public key
(GET /v1/prescriptions/signing-key, a JWK), that the gateway issued it and that the printed
lines are the prescribed ones (`lines_digest`). Ed25519 signatures are deterministic: the same
prescription always gets the same payload.

The key id `kid` is the first 16 characters of the key's RFC 7638 JWK thumbprint, so that a
verifier holding several keys (after a rotation) picks the right one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.prescriptions import ids

VERSION = "HIE1"
MAX_PAYLOAD = 512  # characters; a genuine payload is about 190
_B64 = re.compile(r"^[A-Za-z0-9_-]+$")
_FIELD = re.compile(r"^[^|\x00-\x1f]{1,64}$")


class QrPayloadError(ValueError):
    """A payload that is not a genuine one; `reason` says why (safe to show the caller)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    prescription_id: str
    prescriber_inpe: str
    issued_on: date
    digest: str  # lines_digest() of the prescribed lines
    key_id: str


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    key_id: str


# -- the key ---------------------------------------------------------------------------------

def ensure_signing_key(path: str) -> bool:
    """Create an Ed25519 private key (PKCS#8 PEM, mode 0600) at `path` if there is none;
    True when it was created. `gateway pki init` calls it for the development PKI."""
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False  # another process made it meanwhile: keep theirs
    with os.fdopen(descriptor, "wb") as f:
        f.write(pem)
    return True


def load_signing_key(path: str) -> SigningKey:
    """The signing key at `path`; ValueError saying why when it is missing or not Ed25519."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"prescription signing key {path}: {error.strerror} "
                         "(`gateway pki init` creates it for development)") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"prescription signing key {path}: not an unencrypted PEM private key "
                         f"({error})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"prescription signing key {path}: not an Ed25519 key")
    public = private.public_key()
    return SigningKey(private, public, key_id(public))


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """The first 16 characters of the RFC 7638 thumbprint of the key's JWK."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64encode(_raw(public))},
                           separators=(",", ":"), sort_keys=True)
    return b64encode(hashlib.sha256(canonical.encode("ascii")).digest())[:16]


def public_jwk(public: Ed25519PublicKey) -> dict:
    """The public key as a JWK (RFC 8037)."""
    return {"kty": "OKP", "crv": "Ed25519", "x": b64encode(_raw(public)), "kid": key_id(public),
            "use": "sig", "alg": "EdDSA"}


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


# -- the lines' digest -----------------------------------------------------------------------

def lines_digest(lines: Iterable[tuple[int, str, Decimal | int | str, str | None]]) -> str:
    """Digest of prescribed lines (number, medication code, quantity, unit): SHA-256 of one
    text line `number|code|quantity|unit` per line, in line order, first 16 bytes, base64url."""
    text = "\n".join(f"{number}|{code}|{_quantity_text(quantity)}|{unit or ''}"
                     for number, code, quantity, unit in sorted(lines, key=lambda line: line[0]))
    return b64encode(hashlib.sha256(text.encode("utf-8")).digest()[:16])


def _quantity_text(quantity) -> str:
    return format(Decimal(str(quantity)).normalize(), "f")


# -- signing and verifying -------------------------------------------------------------------

def signable(value: str) -> bool:
    """Whether a field (the prescriber's INPE) can go into a payload: 1 to 64 characters,
    no '|' (the separator), no control character."""
    return bool(_FIELD.match(value))


def sign(key: SigningKey, prescription_id: str, prescriber_inpe: str, issued_on: date,
         digest: str) -> str:
    """The QR payload for these claims, signed with `key`."""
    values = [prescription_id, prescriber_inpe, issued_on.strftime("%Y%m%d"), digest, key.key_id]
    for value in values:
        if not signable(value):
            raise ValueError("a QR payload field is empty, too long, or holds '|' or a control character")
    head = f"{VERSION}.{b64encode('|'.join(values).encode('utf-8'))}"
    return f"{head}.{b64encode(key.private.sign(head.encode('ascii')))}"


def verify(payload: str, keys: Mapping[str, Ed25519PublicKey]) -> Claims:
    """The claims of a genuine payload, or QrPayloadError: malformed, unknown key, bad
    signature (`keys`: public keys by key id)."""
    if not isinstance(payload, str) or not payload.strip():
        raise QrPayloadError("the QR payload is empty")
    payload = payload.strip()
    if len(payload) > MAX_PAYLOAD:
        raise QrPayloadError(f"the QR payload is longer than {MAX_PAYLOAD} characters")
    parts = payload.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise QrPayloadError(f"not a prescription QR payload (expected {VERSION}.<fields>.<signature>)")
    if not (_B64.match(parts[1]) and _B64.match(parts[2])):
        raise QrPayloadError("the QR payload is not base64url text")
    try:
        fields = b64decode(parts[1]).decode("utf-8").split("|")
        signature = b64decode(parts[2])
    except (ValueError, UnicodeDecodeError):
        raise QrPayloadError("the QR payload is not base64url text") from None
    if len(fields) != 5:
        raise QrPayloadError(f"the QR payload has {len(fields)} fields, expected 5")
    prescription, inpe, day, digest, kid = fields
    public = keys.get(kid)
    if public is None:
        raise QrPayloadError("the QR payload was signed with a key this gateway does not know")
    try:
        public.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise QrPayloadError("the QR payload's signature is not valid: it was altered or not "
                             "issued by this gateway") from None
    try:
        prescription = ids.parse(prescription)
        if len(day) != 8 or not day.isdigit():
            raise ValueError(day)
        issued_on = date(int(day[:4]), int(day[4:6]), int(day[6:8]))
    except (ids.PrescriptionIdError, ValueError):
        raise QrPayloadError("the QR payload's fields are malformed") from None
    return Claims(prescription, inpe, issued_on, digest, kid)


# -- images -------------------------------------------------------------------------------------

IMAGE_TYPES = {"png": "image/png", "svg": "image/svg+xml"}


def qr_image(payload: str, kind: str = "png", scale: int = 4) -> bytes:
    """The QR code of `payload` (error correction M, 4-module quiet zone) as PNG or SVG."""
    import segno  # only the image routes need it

    if kind not in IMAGE_TYPES:
        raise ValueError(f"unknown QR image format {kind!r}: png or svg")
    code = segno.make(payload, error="m", micro=False)
    out = io.BytesIO()
    if kind == "svg":
        code.save(out, kind="svg", scale=scale, border=4, xmldecl=True, svgns=True,
                  title="Prescription")
    else:
        code.save(out, kind="png", scale=scale, border=4)
    return out.getvalue()


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict base64url without padding: only the canonical text of some bytes is accepted (a
    last character whose unused bits are set would otherwise decode to the same bytes, and a
    payload could be altered without the signature noticing)."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as error:
        raise ValueError(str(error)) from None
    if b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data
