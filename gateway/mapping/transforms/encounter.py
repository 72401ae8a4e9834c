"""Encounter participants: one per practitioner of PV1's repeating doctor fields.

PV1-7 (attending), PV1-8 (referring), PV1-9 (consulting) and PV1-17 (admitting) are XCN
fields that repeat. The v2-to-FHIR guide's PV1[Encounter] map makes every repetition a
participant of the role's type (v3 ParticipationType ATND, REF, CON, ADM) whose individual is
the Practitioner of that repetition (XCN[Practitioner]). A rule's `from: '@attender'` gives
only the first practitioner, and `each: '@attender'` gives References, not participants: this
transform gives the participants themselves.

The message map builds the practitioners, as before, with the names below (`each: PV1-7`,
`map: XCN.Practitioner`, `name: attender`), before the Encounter: the transform reads the
resources so named in the nearest scope (the VISIT or PID group, else the message), whose ids
are already given. A practitioner named twice in one role (the same INPE sent twice) is one
participant; the same practitioner in two roles is one Practitioner (the engine keeps one
resource per id) and two participants.
"""
from __future__ import annotations

from adapters.hl7v2.message import Segment
from gateway.mapping.transforms import transform

PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
# (PV1 field, the message map's name, v3 ParticipationType code and display), in the guide's order.
PV1_ROLES = ((7, "attender", "ATND", "attender"),
             (8, "referrer", "REF", "referrer"),
             (9, "consultant", "CON", "consultant"),
             (17, "admitter", "ADM", "admitter"))


@transform("pv1_participants", node=True, reads="PV1-7, PV1-8, PV1-9, PV1-17")
def pv1_participants(node, run):
    """PV1 -> Encounter.participant: one per Practitioner the message map built from each
    repetition of PV1-7, -8, -9, -17 (named attender, referrer, consultant, admitter), typed."""
    if node.__class__ is not Segment:
        raise ValueError("pv1_participants reads the PV1 segment (a rule without from:)")
    participants = []
    for number, name, code, display in PV1_ROLES:
        if not node.field(number).strip():  # the role not sent in this PV1
            continue
        seen: set[str] = set()
        for resource in run.scope.named(name):
            if resource.get("resourceType") != "Practitioner" or resource["id"] in seen:
                continue
            seen.add(resource["id"])
            participants.append({
                "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": code, "display": display}]}],
                "individual": {"reference": "urn:uuid:" + resource["id"]},
            })
    return participants or None
