"""Signed QR payloads: sign and verify offline with the public key (JWK), tampering of any
part refused, the key file created once with mode 0600, and real PNG/SVG images that decode."""
from __future__ import annotations

import base64
import os
import stat
from datetime import date

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from lxml import etree

from gateway.prescriptions import ids, qr
from gateway.prescriptions.qr import QrPayloadError

LINES = [(1, "6118001230068", 2, "boîte"), (2, "6118012345676", 1, "boîte")]


@pytest.fixture
def key(tmp_path):
    path = str(tmp_path / "keys" / "prescription-signing.key")
    assert qr.ensure_signing_key(path) is True
    return qr.load_signing_key(path)


def _payload(key, prescription_id="RX-ABCD-EFGH-" + ids.check_character("ABCDEFGH")):
    return qr.sign(key, prescription_id, "INPE-200001", date(2026, 1, 15), qr.lines_digest(LINES))


def test_key_file_is_created_once_with_mode_0600(tmp_path):
    """ensure_signing_key writes a PKCS#8 Ed25519 key readable by the owner only, and never
    replaces an existing one."""
    path = str(tmp_path / "k.key")
    assert qr.ensure_signing_key(path) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = open(path, "rb").read()
    assert first.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert qr.ensure_signing_key(path) is False
    assert open(path, "rb").read() == first


def test_loading_a_missing_or_wrong_key_says_why(tmp_path):
    with pytest.raises(ValueError, match="gateway pki init"):
        qr.load_signing_key(str(tmp_path / "missing.key"))
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        qr.load_signing_key(str(tmp_path / "bad.key"))


def test_sign_then_verify_offline_with_the_published_jwk(key):
    """A verifier holding only the JWK gets the claims back; the payload is compact ASCII and
    carries no patient data."""
    payload = _payload(key)
    assert payload.startswith("HIE1.") and payload.isascii() and len(payload) < 200
    jwk = qr.public_jwk(key.public)
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["kid"]) == ("OKP", "Ed25519", "EdDSA", key.key_id)
    public = Ed25519PublicKey.from_public_bytes(qr.b64decode(jwk["x"]))
    claims = qr.verify(payload, {jwk["kid"]: public})
    assert claims.prescription_id.startswith("RX-ABCD-EFGH-")
    assert (claims.prescriber_inpe, claims.issued_on) == ("INPE-200001", date(2026, 1, 15))
    assert claims.digest == qr.lines_digest(LINES) and claims.key_id == key.key_id
    assert b"BENALI" not in base64.urlsafe_b64decode(payload.split(".")[1] + "==")


def test_signatures_are_deterministic(key):
    """The same prescription always gets the same payload (Ed25519, RFC 8032)."""
    assert _payload(key) == _payload(key)


def test_lines_digest_changes_with_any_line_and_ignores_number_formatting():
    assert qr.lines_digest(LINES) == qr.lines_digest(list(reversed(LINES)))
    assert qr.lines_digest(LINES) == qr.lines_digest([(1, "6118001230068", "2.000", "boîte"), LINES[1]])
    assert qr.lines_digest(LINES) != qr.lines_digest([(1, "6118001230068", 3, "boîte"), LINES[1]])
    assert qr.lines_digest(LINES) != qr.lines_digest(LINES[:1])


def _flip(text: str, position: int) -> str:
    char = text[position]
    return text[:position] + ("A" if char != "A" else "B") + text[position + 1:]


def test_any_altered_character_is_refused(key):
    """Changing any single character of the fields or the signature is detected."""
    payload = _payload(key)
    keys = {key.key_id: key.public}
    start = len("HIE1.")
    for position in range(start, len(payload)):
        if payload[position] == ".":
            continue
        with pytest.raises(QrPayloadError):
            qr.verify(_flip(payload, position), keys)


def test_fields_re_signed_by_another_key_are_refused(key, tmp_path):
    """A payload signed with another Ed25519 key (even claiming our key id) is not genuine."""
    other_path = str(tmp_path / "other.key")
    qr.ensure_signing_key(other_path)
    other = qr.load_signing_key(other_path)
    forged = qr.sign(qr.SigningKey(other.private, other.public, key.key_id), "RX-ABCD-EFGH-"
                     + ids.check_character("ABCDEFGH"), "INPE-200001", date(2026, 1, 15), "x" * 22)
    with pytest.raises(QrPayloadError, match="signature is not valid"):
        qr.verify(forged, {key.key_id: key.public})
    with pytest.raises(QrPayloadError, match="key this gateway does not know"):
        qr.verify(_payload(other), {key.key_id: key.public})


@pytest.mark.parametrize("payload, message", [
    ("", "empty"),
    ("HIE2.abc.def", "expected HIE1"),
    ("HIE1.abc", "expected HIE1"),
    ("HIE1.a+b.def", "not base64url"),
    ("HIE1." + "A" * 600 + ".x", "longer than 512"),
    ("HIE1." + qr.b64encode(b"a|b|c") + ".AAAA", "3 fields, expected 5"),
    ("HIE1." + qr.b64encode(b"\xff\xfe|a|b|c|d") + ".AAAA", "not base64url text"),
])
def test_malformed_payloads_are_refused_with_a_reason(key, payload, message):
    with pytest.raises(QrPayloadError, match=message):
        qr.verify(payload, {key.key_id: key.public})


def test_fields_that_cannot_be_encoded_are_refused(key):
    with pytest.raises(ValueError):
        qr.sign(key, "RX-ABCD", "INPE|200001", date(2026, 1, 15), "digest")


def test_png_and_svg_images(key):
    """PNG bytes with the PNG signature; SVG that parses as XML with an svg root."""
    payload = _payload(key)
    png = qr.qr_image(payload, "png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 300
    svg = qr.qr_image(payload, "svg")
    root = etree.fromstring(svg, etree.XMLParser(resolve_entities=False, no_network=True))
    assert etree.QName(root).localname == "svg"
    with pytest.raises(ValueError, match="png or svg"):
        qr.qr_image(payload, "gif")


def test_payload_fits_a_small_qr_code(key):
    """The payload fits a version 10 QR code at level M (about 57 x 57 modules): readable by a
    phone camera from a printed A5 prescription."""
    import segno

    code = segno.make(_payload(key), error="m", micro=False)
    assert code.version <= 10 and code.error == "M"


def test_non_canonical_base64_is_refused(key):
    """The signature's last character holds 2 bits of data and 4 unused ones: setting an unused
    bit leaves the decoded bytes alike, and must still be refused (payloads are not malleable)."""
    payload = _payload(key)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = payload[-1]
    twin = alphabet[alphabet.index(last) ^ 1]
    assert base64.urlsafe_b64decode(payload.split(".")[2][:-1] + twin + "==") == \
        base64.urlsafe_b64decode(payload.split(".")[2] + "==")
    with pytest.raises(QrPayloadError, match="not base64url"):
        qr.verify(payload[:-1] + twin, {key.key_id: key.public})
