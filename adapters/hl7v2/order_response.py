"""Application responses to orders: RRE^O12 (to RDE^O11), ORP^O10 (to OMP^O09), ORR^O02 (to
ORM^O01) and ORL^O22 (to OML^O21), as bytes in the sender's own encoding. Pure code.

They are the ACK the AckBuilder makes (same MSH, MSA and ERR rules), with the response's own
message type in MSH-9 and, for an accepted prescription:

    NTE|1|O|<signed QR payload>|QR^Prescription QR payload^MA-HIE-NTE
    ORC|OK|<ORC-2 as sent>|<prescription id>^HIE|<ORC-4 as sent>      (one per order sent)

ORC-3, the filler order number, is the prescription id the gateway issued (namespace HIE,
which the mapping tables read as urn:ma:hie:prescription); ORC-2 and ORC-4 echo the placer's
own numbers byte for byte, so the placer's system can match each answer to its order. The QR
payload is base64url text and dots (no HL7 delimiter or escape character in it). ORL^O22 puts
its orders in the patient's group (ORL_O22 RESPONSE: PID, then ORDER...), so the original's
first PID is echoed, byte for byte, before its ORCs.

`placer_groups(raw)` reads every ORC-4 (placer group number, namespace) from the raw bytes,
without parsing the message: how ingest tells, at the speed of a byte search, whether a
result names a prescription (`RX-...^HIE`) and must wait for the prescription step.
"""
from __future__ import annotations

from adapters.hl7v2.ack import AckBuilder, ErrorDetail, HeaderView, escape
from adapters.hl7v2.codes import Outcome

RESPONSES = {b"RDE": (b"RRE", b"O12"), b"OMP": (b"ORP", b"O10"), b"ORM": (b"ORR", b"O02"),
             b"OML": (b"ORL", b"O22")}
WITH_PATIENT = frozenset({b"ORL"})  # responses whose orders sit in the patient's group
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
        if kind[0] in WITH_PATIENT:
            segments.extend(_segments(raw, b"PID", fs)[:1])
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


def placer_groups(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(ORC-4.1, ORC-4.2) of each ORC of an ER7 message, as bytes, stripped. Cheap: a message
    without an ORC costs one search; only ORC segments are split."""
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 8:
        return []
    fs = raw[start + 3:start + 4]
    cs = raw[start + 4:start + 5]
    marker = b"ORC" + fs
    found = []
    at = raw.find(marker, start)
    while at >= 0:
        if raw[at - 1:at] in (b"\r", b"\n"):  # a segment's start, not text inside a field
            end = raw.find(b"\r", at)
            if end < 0:
                end = len(raw)
            newline = raw.find(b"\n", at, end)  # within the segment only: no scan to the end
            if newline >= 0:
                end = newline
            fields = raw[at:end].split(fs, 5)
            if len(fields) > 4:
                parts = fields[4].split(cs, 2)
                found.append((parts[0].strip(), parts[1].strip() if len(parts) > 1 else b""))
        at = raw.find(marker, at + 4)
    return found


def _segments(raw: bytes, name: bytes, fs: bytes) -> list[bytes]:
    lines = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    return [line for line in lines if line[:3] == name and line[3:4] == fs]
