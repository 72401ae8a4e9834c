"""What the gateway knows of FHIR without asking the models at run time (building them took a
second and more of every start): the resource types, and the elements of every type, are those
of the fhir.resources models that validate its bundles."""
import pathlib
import re

import fhir.resources.R4B

from gateway.mapping import fhir_schema
from gateway.mapping.fhir_schema import is_resource_type

_CONCRETE = re.compile(r"^class (\w+)\((?:domainresource\.DomainResource|resource\.Resource)\):", re.M)


def test_the_resource_types_are_every_concrete_resource_of_the_models():
    models = pathlib.Path(fhir.resources.R4B.__file__).parent
    declared = {name for source in models.glob("*.py") for name in _CONCRETE.findall(source.read_text())}
    known = {name for name in fhir_schema._table() if is_resource_type(name)}  # every type known
    assert declared - {"DomainResource"} == known
    assert len(known) > 140


def test_datatypes_abstract_types_and_non_strings_are_not_resource_types():
    assert is_resource_type("Patient") and is_resource_type("Bundle") and is_resource_type("Binary")
    for name in ("HumanName", "Identifier", "Resource", "DomainResource", "patient", "", None, 3,
                 ["Patient"]):
        assert not is_resource_type(name), name


def test_the_element_table_is_what_the_installed_models_say():
    """`fhir_elements.json` as `python -m gateway.mapping.fhir_schema` writes it from the models."""
    assert fhir_schema.TABLE.read_text("utf-8") == fhir_schema.written(fhir_schema.from_models())


def test_elements_of_resources_datatypes_and_backbones():
    assert fhir_schema.element("Patient", "identifier") == fhir_schema.Element("identifier", True, "Identifier", "")
    assert fhir_schema.element("Patient", "birthDate") == fhir_schema.Element("birthDate", False, "", "date")
    assert fhir_schema.element("Patient", "contact").type_name == "PatientContact"
    assert fhir_schema.known_type("PatientContact") and fhir_schema.element("PatientContact", "name").type_name == "HumanName"
    assert fhir_schema.element("Patient", "brithDate") is None
    assert not fhir_schema.known_type("Patiente") and fhir_schema.elements("Patiente") == {}
