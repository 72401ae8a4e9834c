"""Audit records as IHE ATNA audit messages (ITI-20): the DICOM PS3.15 A.5 AuditMessage XML in
an RFC 5424 syslog message, framed by octet counting as RFC 5425 sends it over TLS. Pure code.

The XML names who did what to which subject from where, never patient data: the subject is
an id of the gateway's (message/42, prescription/RX-...), its control id travels as the
MSH-10 detail (base64, as IHE's HL7 v2 audits carry it), and the record's place in the hash
chain (seq and hash) as details too, so that the collector's copy can be checked against the
trail.

The syslog header follows ITI TF-2 3.20.4.1.2 as implementations read it: PRI of facility 10
(security/authorization), severity by outcome; APP-NAME the gateway; PROCID its node; MSGID
"IHE+RFC-3881"; no structured data; the XML as MSG, UTF-8 without a BOM (CP-477).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

from lxml import etree

from gateway.audit.chain import AuditRecord

MSGID = "IHE+RFC-3881"
FACILITY = 10  # security/authorization messages (authpriv)
APP_NAME = "ma-hie-gateway"

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
_OUTCOMES = {"success": SUCCESS, "refused": MINOR_FAILURE, "failure": SERIOUS_FAILURE}
# Syslog severity by EventOutcomeIndicator: notice, warning, error.
_SEVERITIES = {SUCCESS: 5, MINOR_FAILURE: 4, SERIOUS_FAILURE: 3}


@dataclass(frozen=True)
class Code:
    code: str
    text: str
    system: str = "DCM"


# DICOM PS3.16 CID 400 (audit event ids) and CID 401 (event type codes).
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
EXPORT = Code("110106", "Export")
IMPORT = Code("110107", "Import")
ORDER_RECORD = Code("110109", "Order Record")
PATIENT_RECORD = Code("110110", "Patient Record")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
LOGIN, LOGOUT = Code("110122", "Login"), Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "Software Configuration")
AUDIT_RECORDING_STOPPED = Code("110133", "Audit Recording Stopped")
SOURCE_ROLE, DESTINATION_ROLE = Code("110153", "Source Role ID"), Code("110152", "Destination Role ID")
APPLICATION_ROLE = Code("110150", "Application")

# action -> (EventID, EventActionCode C/R/U/D/E, EventTypeCode or None, the gateway's role:
# "destination" (the actor sent to it), "source" (it sent), or None)
EVENTS: dict[str, tuple[Code, str, Code | None, str | None]] = {
    "message.received": (IMPORT, "C", None, "destination"),
    "message.acknowledged": (IMPORT, "E", None, "destination"),
    "message.refused": (IMPORT, "C", None, "destination"),
    "message.translated": (PATIENT_RECORD, "C", None, None),
    "message.translation_failed": (PATIENT_RECORD, "C", None, None),
    "delivery.attempted": (EXPORT, "R", None, "source"),
    "delivery.dead": (EXPORT, "R", None, "source"),
    "delivery.replayed": (EXPORT, "E", None, "source"),
    "message.read": (PATIENT_RECORD, "R", None, None),
    "message.searched": (QUERY, "E", None, None),
    "prescription.read": (ORDER_RECORD, "R", None, None),
    "door.refused": (SECURITY_ALERT, "E", NODE_AUTHENTICATION, None),
    "tls.handshake_failed": (SECURITY_ALERT, "E", NODE_AUTHENTICATION, None),
    "config.reloaded": (SECURITY_ALERT, "E", SECURITY_CONFIGURATION, None),
    "mappings.reloaded": (SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION, None),
    "console.login": (USER_AUTHENTICATION, "E", LOGIN, None),
    "console.logout": (USER_AUTHENTICATION, "E", LOGOUT, None),
    "retention.expired": (PATIENT_RECORD, "D", None, None),
    "audit.lost": (SECURITY_ALERT, "E", AUDIT_RECORDING_STOPPED, None),
}
_DEFAULT = (APPLICATION_ACTIVITY, "E", None, None)


@dataclass(frozen=True)
class Source:
    """AuditSourceIdentification: the platform (config audit.export.source_id and
    enterprise_site) and the node that recorded."""

    source_id: str = "MA-HIE"
    enterprise_site: str = "MA"


def outcome_indicator(outcome: str) -> str:
    return _OUTCOMES.get(outcome, SERIOUS_FAILURE)


def audit_message(record: AuditRecord, source: Source) -> bytes:
    """The AuditMessage XML of `record` (UTF-8, with its declaration)."""
    event_id, action_code, type_code, gateway_role = EVENTS.get(record.action, _DEFAULT)
    root = etree.Element("AuditMessage")
    event = etree.SubElement(root, "EventIdentification", EventActionCode=action_code,
                             EventDateTime=_instant(record),
                             EventOutcomeIndicator=outcome_indicator(record.outcome))
    _code(event, "EventID", event_id)
    # The action too: one altered in the database must not hold the export (verify names it).
    action = _text(record.action)
    _code(event, "EventTypeCode", type_code or Code(action, action, "MA-HIE-gateway"))
    detail = record.detail
    reason = detail.get("reason") or detail.get("code")
    if record.outcome != "success" and reason is not None:
        etree.SubElement(event, "EventOutcomeDescription").text = _text(reason)

    # The actor (a facility, a console account, the system) and, beside it, the gateway node.
    actor = etree.SubElement(root, "ActiveParticipant", UserID=_text(record.actor),
                             UserIsRequestor="true")
    host = _text(_host(record.source) or "")
    if host:
        actor.set("NetworkAccessPointID", host)
        actor.set("NetworkAccessPointTypeCode", "2" if _is_ip(host) else "1")
    node = etree.SubElement(root, "ActiveParticipant", UserID=_text(record.node),
                            UserIsRequestor="false")
    if gateway_role == "destination":
        _code(actor, "RoleIDCode", SOURCE_ROLE)
        _code(node, "RoleIDCode", DESTINATION_ROLE)
    elif gateway_role == "source":
        _code(node, "RoleIDCode", SOURCE_ROLE)
        destination = detail.get("destination")
        if destination:
            peer = etree.SubElement(root, "ActiveParticipant", UserID=_text(destination),
                                    UserIsRequestor="false")
            _code(peer, "RoleIDCode", DESTINATION_ROLE)
    else:
        _code(node, "RoleIDCode", APPLICATION_ROLE)

    audit_source = etree.SubElement(root, "AuditSourceIdentification",
                                    AuditEnterpriseSiteID=source.enterprise_site,
                                    AuditSourceID=source.source_id)
    _code(audit_source, "AuditSourceTypeCode", Code("4", "Application Server Process", "DCM"))

    if record.subject:
        kind = record.subject.split("/", 1)[0]
        subject = etree.SubElement(root, "ParticipantObjectIdentification",
                                   ParticipantObjectID=_text(record.subject),
                                   ParticipantObjectTypeCode="2",  # system object
                                   ParticipantObjectTypeCodeRole=_ROLES.get(kind, "4"))
        _code(subject, "ParticipantObjectIDTypeCode", Code("12", "URI", "RFC-3881"))
        control_id = detail.get("control_id")
        if control_id:
            _detail(subject, "MSH-10", control_id)
        for key in ("message_type", "facility", "destination", "mapping_version"):
            if detail.get(key):
                _detail(subject, key, detail[key])
    # Where the record stands in the hash chain, so that this copy can be checked against it.
    trail = etree.SubElement(root, "ParticipantObjectIdentification",
                             ParticipantObjectID=f"audit/{record.seq}", ParticipantObjectTypeCode="2",
                             ParticipantObjectTypeCodeRole="13")  # security resource
    _code(trail, "ParticipantObjectIDTypeCode", Code("12", "URI", "RFC-3881"))
    _detail(trail, "seq", str(record.seq))
    _detail(trail, "hash", record.hash)
    _detail(trail, "prev_hash", record.prev_hash)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


# The role of a subject by its kind (RFC 3881 ParticipantObjectTypeCodeRole).
_ROLES = {"message": "3", "delivery": "3", "prescription": "3", "config": "13", "audit": "13",
          "mappings": "13", "facility": "4"}


def syslog_message(record: AuditRecord, source: Source, hostname: str,
                   app_name: str = APP_NAME) -> bytes:
    """The RFC 5424 message: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - XML."""
    severity = _SEVERITIES[outcome_indicator(record.outcome)]
    header = (f"<{FACILITY * 8 + severity}>1 {_instant(record)} {_field(hostname, 255)} "
              f"{_field(app_name, 48)} {_field(record.node, 128)} {MSGID} -")
    return header.encode("ascii") + b" " + audit_message(record, source)


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: MSG-LEN SP SYSLOG-MSG."""
    return b"%d " % len(message) + message


def parse_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete frames at the start of `buffer` and what is left (for collectors and
    tests). Raises ValueError on a malformed length."""
    messages = []
    while True:
        space = buffer.find(b" ", 0, 12)
        if space < 0:
            if len(buffer) >= 12 or (buffer and not buffer.isdigit()):
                raise ValueError(f"not an octet-counted frame: {buffer[:20]!r}")
            return messages, buffer
        length = buffer[:space]
        if not length.isdigit() or length.startswith(b"0"):
            raise ValueError(f"not an octet-counted frame: {buffer[:20]!r}")
        end = space + 1 + int(length)
        if len(buffer) < end:
            return messages, buffer
        messages.append(buffer[space + 1:end])
        buffer = buffer[end:]


def _code(parent, name: str, code: Code) -> None:
    etree.SubElement(parent, name, {"csd-code": code.code, "codeSystemName": code.system,
                                    "originalText": code.text})


def _detail(parent, kind: str, value) -> None:
    etree.SubElement(parent, "ParticipantObjectDetail", type=kind,
                     value=base64.b64encode(_text(value).encode("utf-8")).decode("ascii"))


def _instant(record: AuditRecord) -> str:
    return record.as_dict()["at"]


def _host(source: str | None) -> str | None:
    if not source:
        return None
    if source.startswith("["):  # [v6]:port
        return source[1:source.index("]")] if "]" in source else source
    host, colon, port = source.rpartition(":")
    # The gateway writes an IPv6 peer unbracketed, port last (::1:5000): kept whole, that is
    # another valid address (or a machine name).
    if colon and port.isdigit() and (host.count(":") == 0 or _is_ip(host)):
        return host
    return source


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _field(value: str, limit: int) -> str:
    """A syslog header field: printable US-ASCII without spaces, at most `limit`, else '-'."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def _text(value) -> str:
    # XML 1.0 refuses control characters, surrogates, U+FFFE and U+FFFF (lxml raises, and the
    # export would try the record again forever): keep the text, drop what it cannot carry.
    return "".join(c for c in str(value) if c in "\t\n\r" or " " <= c < "\ud800"
                   or "\ue000" <= c <= "\ufffd" or c >= "\U00010000")


__all__ = ["MSGID", "Source", "audit_message", "frame", "parse_frames", "syslog_message"]
