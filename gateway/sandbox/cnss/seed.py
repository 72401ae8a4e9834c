"""The CNSS peer's insured persons: a small, entirely synthetic table (no real person).

Numbers and names are invented; the first two people match the patients of the golden test
messages in `mappings/tests/` (BENALI Fatima, immatriculation 112233445, CNIE BE123456; the
pharmacy export's CNIE BK123456) so that their care sheets find open rights. The others cover
each answer of `VerifierDroits`: rights closed, rights suspended, a dependant found by CNIE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date


@dataclass(frozen=True)
class Dependant:
    rank: int  # rang: 1, 2... in the insured's family
    relationship: str  # LienParente: CONJOINT or ENFANT
    family_name: str
    given_name: str
    birth_date: date
    cnie: str | None = None


@dataclass(frozen=True)
class InsuredPerson:
    immatriculation: str
    cnie: str | None
    family_name: str
    given_name: str
    birth_date: date
    regime: str  # Regime of the contract: AMO_SALARIES, AMO_TNS, AMO_TADAMON...
    rights_from: date
    rights_until: date | None = None
    suspended: bool = False
    dependants: tuple[Dependant, ...] = field(default=())

    def motive_on(self, day: date) -> str:
        """MotifDroits on `day`: DROITS_OUVERTS, DROITS_FERMES or DROITS_SUSPENDUS."""
        if self.suspended:
            return "DROITS_SUSPENDUS"
        if day < self.rights_from or (self.rights_until is not None and day > self.rights_until):
            return "DROITS_FERMES"
        return "DROITS_OUVERTS"


INSURED: tuple[InsuredPerson, ...] = (
    InsuredPerson(
        "112233445", "BE123456", "BENALI", "Fatima", date(1985, 3, 12), "AMO_SALARIES",
        rights_from=date(2010, 1, 1),
        dependants=(
            Dependant(1, "CONJOINT", "BENALI", "Youssef", date(1982, 7, 2), cnie="BE654321"),
            Dependant(2, "ENFANT", "BENALI", "Amine", date(2012, 5, 4)),
            Dependant(3, "ENFANT", "BENALI", "Salma", date(2016, 9, 20)),
        ),
    ),
    InsuredPerson(
        "223344556", "BK123456", "ALAOUI", "Omar", date(1978, 11, 30), "AMO_TNS",
        rights_from=date(2021, 1, 1),
    ),
    InsuredPerson(
        "334455667", "CD112233", "TAHIRI", "Khadija", date(1990, 1, 15), "AMO_TADAMON",
        rights_from=date(2022, 12, 1),
        dependants=(Dependant(1, "ENFANT", "TAHIRI", "Rayan", date(2019, 4, 8)),),
    ),
    InsuredPerson(
        "445566778", "EE445566", "IDRISSI", "Hassan", date(1970, 6, 1), "AMO_SALARIES",
        rights_from=date(2015, 1, 1), rights_until=date(2025, 6, 30),
    ),
    InsuredPerson(
        "556677889", "F778899", "CHAKIR", "Zineb", date(1995, 2, 28), "AMO_ACHAMIL",
        rights_from=date(2023, 1, 1), suspended=True,
    ),
)


def find_insured(*, immatriculation: str | None = None, cnie: str | None = None,
                 table: tuple[InsuredPerson, ...] = INSURED) -> InsuredPerson | None:
    """The insured person by member number, or by the CNIE of the insured or of a dependant."""
    for person in table:
        if immatriculation is not None and person.immatriculation == immatriculation:
            return person
        if cnie is not None and (person.cnie == cnie or any(d.cnie == cnie for d in person.dependants)):
            return person
    return None
