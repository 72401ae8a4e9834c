"""Application responses to pharmacy orders: RRE^O12 (to RDE^O11) and ORP^O10 (to OMP^O09),
as bytes in the sender's own encoding. Pure code.

They are the ACK the AckBuilder makes (same MSH, MSA and ERR rules), with the response's own
message type in MSH-9 and, for an accepted prescription:

    NTE|1|O|<signed QR payload>|QR^Prescription QR payload^MA-HIE-NTE
    ORC|OK|<ORC-2 as sent>|<prescription id>^HIE|<ORC-4 as sent>      (one per order sent)

ORC-3, the filler order number, is the prescription id the gateway issued (namespace HIE,
which the mapping tables read as urn:ma:hie:prescription); ORC-2 and ORC-4 echo the placer's
own numbers byte for byte, so the placer's system can match each answer to its order. The QR
payload is base64url text and dots (no HL7 delimiter or escape character in it).
"""
from __future__ import annotations

from adapters.hl7v2.ack import AckBuilder, ErrorDetail, HeaderView, escape
from adapters.hl7v2.codes import Outcome

RESPONSES = {b"RDE": (b"RRE", b"O12"), b"OMP": (b"ORP", b"O10")}
NAMESPACE = b"HIE"
NOTE_TYPE = b"QR^Prescription QR payload^MA-HIE-NTE"


def response_type(message_code: bytes) -> tuple[bytes, bytes] | None:
    """(code, trigger) of the application response to an order message, None if not one."""
    return RESPONSES.get(message_code)


def order_response(builder: AckBuilder, original: HeaderView, raw: bytes, outcome: Outcome,
                   enhanced: bool, *, filler_number: str | None = None, note: str | None = None,
                   error: ErrorDetail | None = None, control: bytes = b"OK") -> bytes:
    """The RRE^O12 / ORP^O10 answering `raw` (whose MSH is `original`), segments ended by CR.

    With `filler_number`, one ORC per ORC of the original carries it in ORC-3, with ORC-1
    `control` (table 0119: OK order accepted, CR cancelled as requested); `note` goes in an NTE
    after the MSA (and ERR).
    """
    d = original.delimiters
    fs, cs = d.field, d.component
    code = original.field(9).split(cs, 1)[0]
    kind = RESPONSES.get(code)
    if kind is None:
        raise ValueError(f"no order response for message type {code.decode('ascii', 'replace')!r}")
    ack = builder.build(original, outcome, enhanced, error)
    segments = ack.rstrip(b"\r").split(b"\r")
    msh = segments[0].split(fs)
    structure = kind[0] + b"_" + kind[1]
    with_structure = cs in msh[8] and msh[8].count(cs) >= 2
    msh[8] = kind[0] + cs + kind[1] + (cs + structure if with_structure else b"")
    segments[0] = fs.join(msh)
    if note:
        segments.append(fs.join([b"NTE", b"1", b"O", escape(note, d), NOTE_TYPE.replace(b"^", cs)]))
    if filler_number:
        filler = escape(filler_number, d) + cs + NAMESPACE
        for orc in _segments(raw, b"ORC", fs):
            fields = orc.split(fs)
            placer = fields[2] if len(fields) > 2 else b""
            group = fields[4] if len(fields) > 4 else b""
            segments.append(fs.join([b"ORC", control, placer, filler, group]))
    return b"\r".join(segments) + b"\r"


def order_controls(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(ORC-1, ORC-3 first component) of each ORC of an ER7 message, as bytes."""
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 8:
        return []
    fs = raw[start + 3:start + 4]
    cs = raw[start + 4:start + 5]
    found = []
    for orc in _segments(raw, b"ORC", fs):
        fields = orc.split(fs) + [b"", b"", b"", b""]
        found.append((fields[1].strip(), fields[3].split(cs, 1)[0].strip()))
    return found


def _segments(raw: bytes, name: bytes, fs: bytes) -> list[bytes]:
    lines = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    return [line for line in lines if line[:3] == name and line[3:4] == fs]
