"""HL7 v2 XML (adapters/legacy/v2xml.py): conversion to ER7 tokens and hostile XML."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.legacy.v2xml import parse_v2xml
from conftest import corpus_path
from gateway.mapping.golden import check_case, translate_case
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import InputError, detect_format, read_input

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "mappings" / "tests" / "legacy" / "adt-a01-v2xml-casablanca.xml"
MSH = (b'<MSH><MSH.1>|</MSH.1><MSH.2>^~\\&amp;</MSH.2><MSH.4><HD.1>100001</HD.1></MSH.4>'
       b'<MSH.9><MSG.1>ADT</MSG.1><MSG.2>A01</MSG.2></MSH.9><MSH.10>C1</MSH.10></MSH>')


def doc(body: bytes, root: bytes = b"ADT_A01") -> bytes:
    return b'<?xml version="1.0"?>\n<' + root + b' xmlns="urn:hl7-org:v2xml">' + MSH + body + b"</" + root + b">"


def test_segments_fields_components_and_groups_in_document_order():
    """Groups are flattened; SEG.n are fields, TYPE.n components, nested TYPE.n subcomponents."""
    data = doc(b"<PID><PID.3><CX.1>77</CX.1><CX.4><HD.1>CHU</HD.1><HD.2>1.2</HD.2></CX.4></PID.3>"
               b"<PID.3><CX.1>88</CX.1></PID.3><PID.5><XPN.1><FN.1>BENNANI</FN.1></XPN.1><XPN.2>Ali</XPN.2></PID.5></PID>"
               b"<ADT_A01.INSURANCE><IN1><IN1.1>1</IN1.1></IN1></ADT_A01.INSURANCE><ZPD><ZPD.1>z</ZPD.1></ZPD>")
    parsed = read_input(data)
    assert (parsed.format, parsed.message_type, parsed.control_id, parsed.sending_facility) == \
        ("hl7v2-xml", "ADT^A01", "C1", "100001")
    message = parsed.message
    assert [s.name for s in message.segments] == ["MSH", "PID", "IN1", "ZPD"]
    assert message.segments[1].fields[3] == "77^^^CHU&1.2~88"
    assert message.value("PID", 5, 2) == "Ali"
    assert message.value("MSH", 1) == "|" and message.value("MSH", 2) == "^~\\&"


def test_delimiters_in_text_are_escaped_and_decoded_back():
    """A '|', '^', '&', '~' or '\\' in a value never splits it."""
    data = doc(b"<PID><PID.5><XPN.1>A|B^C&amp;D~E\\F</XPN.1><XPN.2>G</XPN.2></PID.5></PID>")
    message = read_input(data).message
    assert message.value("PID", 5, 1) == "A|B^C&D~E\\F"
    assert message.value("PID", 5, 2) == "G"


def test_escape_elements_keep_the_text_around_them():
    """v2 XML writes an escape sequence as `<escape V=".br"/>` inside the text: it becomes
    that sequence, and the text after it is kept (everything after the first one was lost)."""
    data = doc(b'<OBX><OBX.5>line one<escape V=".br"/>line two <escape V="H"/>high<escape V="N"/>'
               b' end</OBX.5><OBX.6><CWE.1>mg<escape V="F"/>dL</CWE.1></OBX.6></OBX>')
    message = read_input(data).message
    assert message.value("OBX", 5) == "line one\nline two high end"
    assert message.value("OBX", 6, 1) == "mg|dL"


def test_detection_after_bom_and_whitespace():
    """'<' after a BOM and blanks is v2 XML."""
    assert detect_format(b"\xef\xbb\xbf \r\n<ADT_A01/>") == "hl7v2-xml"


@pytest.mark.parametrize("name", ["test-hl7-1636", "test-hl7-missing-components",
                                  "test-hl7-missing-fields", "test-hl7-missing-subcomponents"])
def test_mirth_dialect_gives_mirths_own_er7(name):
    """Mirth's namespace-less XML converts to the ER7 Mirth expects, byte for byte."""
    folder = corpus_path("mirth-connect", "serializer")
    if not os.path.isdir(folder):
        pytest.skip("corpus not available")
    message = parse_v2xml(open(os.path.join(folder, f"{name}-input.xml"), "rb").read())
    er7 = "\r".join("|".join(s.fields[:1] + s.fields[2:]) if s.name == "MSH" else "|".join(s.fields)
                    for s in message.segments)
    expected = open(os.path.join(folder, f"{name}-output.txt")).read()
    assert er7.strip() == expected.replace("\r\n", "\r").replace("\n", "\r").strip()


@pytest.mark.parametrize("path", [("hapi-hl7v2", "xml", "xml-with-xxe.xml"),
                                  ("hapi-hl7v2", "xml", "get_ack_id.xml"),
                                  ("hapi-hl7v2", "xml", "get_version.xml"),
                                  ("mirth-connect", "serializer", "test-xxe-hl7-example.xml")])
def test_corpus_xxe_probes_are_refused_and_nothing_leaks(path):
    """DOCTYPE probes are errors; no file content (/etc/passwd) appears anywhere."""
    full = corpus_path(*path)
    if not os.path.exists(full):
        pytest.skip("corpus not available")
    with pytest.raises(InputError) as caught:
        read_input(open(full, "rb").read())
    assert "DOCTYPE" in caught.value.reason and caught.value.location.startswith("line ")
    assert "root:" not in str(caught.value)


def test_xxe_with_a_local_file_is_refused(tmp_path):
    """An external entity naming a real file is never read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    data = (f'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file://{secret}">]>'
            f'<ADT_A01><MSH><MSH.10>&x;</MSH.10></MSH></ADT_A01>').encode()
    with pytest.raises(InputError) as caught:
        read_input(data)
    assert "TOP-SECRET-VALUE" not in str(caught.value)


def test_billion_laughs_is_refused_at_once():
    """Entity expansion never starts: the DOCTYPE is refused before parsing."""
    lol = b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (n, (b"&lol%d;" % (n - 1) if n > 1 else b"&lol;") * 10) for n in range(1, 10)
    ) + b']><ADT_A01><MSH><MSH.10>&lol9;</MSH.10></MSH></ADT_A01>'
    with pytest.raises(InputError, match="DOCTYPE"):
        read_input(lol)


def test_utf16_doctype_is_refused_too():
    """A DOCTYPE hidden in UTF-16 is seen."""
    data = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a SYSTEM "http://x/"><ADT_A01/>'.encode("utf-16")
    with pytest.raises(InputError, match="DOCTYPE"):
        read_input(data, format="hl7v2-xml")


def test_a_doctype_the_byte_check_cannot_see_reads_no_file(tmp_path):
    """In UTF-7 ('+ADw-!DOCTYPE') a DOCTYPE passes the byte check; libxml2 then opened its
    external subset from the local file system despite load_dtd=False (here: the file's own
    parameter entity was fetched, which says so in the error). Nothing external is read now,
    and the DOCTYPE is refused after parsing."""
    import base64

    dtd = tmp_path / "probe.dtd"
    dtd.write_text('<!ENTITY % fetched SYSTEM "http://127.0.0.1:9/fetched-by-the-dtd"> %fetched;')
    text = f'<!DOCTYPE ADT_A01 SYSTEM "file://{dtd}"><ADT_A01>{MSH.decode()}</ADT_A01>'
    utf7 = b"+" + base64.b64encode(text.encode("utf-16-be")).rstrip(b"=") + b"-"
    with pytest.raises(InputError) as caught:
        read_input(b'<?xml version="1.0" encoding="UTF-7"?>' + utf7)
    assert "DOCTYPE declarations are refused" in caught.value.reason
    assert "fetched-by-the-dtd" not in str(caught.value) and "probe.dtd" not in str(caught.value)


@pytest.mark.parametrize("data, reason", [
    (doc(b"<PID><PID.3>1</PID.3>")[:-10], "not well-formed"),
    (b"<ADT_A01><PID><PID.1>1</PID.1></PID></ADT_A01>", "does not start with an MSH"),
    (b'<?xml version="1.0" encoding="UTF-8"?><ADT_A01><MSH><MSH.10>caf\xe9</MSH.10></MSH></ADT_A01>', "not well-formed"),
    (b"<", "not well-formed"),
    (b'<?xml version="1.0" encoding="X-NOPE"?><A/>', ""),
])
def test_truncated_wrong_and_misencoded_xml_are_input_errors(data, reason):
    """Bad XML is an InputError of format hl7v2-xml with the reason."""
    with pytest.raises(InputError) as caught:
        read_input(data)
    assert reason in caught.value.reason and caught.value.format == "hl7v2-xml"


def test_an_empty_msh_has_the_standard_delimiters():
    """`<MSH/>` (no MSH.1, no MSH.2) made an IndexError out of read_input, which the translator
    does not catch; it reads as an MSH with the standard delimiters and nothing else."""
    parsed = read_input(b"<ADT_A01><MSH/></ADT_A01>")
    assert parsed.message.segments[0].fields == ["MSH", "|", "^~\\&"]
    assert parsed.message_type == "" and parsed.format == "hl7v2-xml"


def test_parser_messages_are_one_line():
    """libxml2 ends some messages with a newline (before lxml's ', line 1, column n'): the
    reason, which goes into error records and acknowledgements, is kept on one line."""
    with pytest.raises(InputError) as caught:
        read_input(doc(b"<PID><PID.3>a\x00b</PID.3></PID>"))
    assert "\n" not in caught.value.reason and "\r" not in caught.value.reason
    assert "Char 0x0 out of allowed range, line 2, column" in caught.value.reason


def test_size_limit():
    """A document over the limit is refused before parsing."""
    from adapters.legacy.v2xml import XmlInputError
    with pytest.raises(XmlInputError, match="exceeds"):
        parse_v2xml(doc(b"<PID><PID.1>" + b"x" * 2000 + b"</PID.1></PID>"), max_size=1000)


def test_golden_case_with_the_shared_adt_map(repo_mappings):
    """The v2 XML ADT^A01 golden case translates with the ER7 maps into its valid bundle."""
    mapping_set = repo_mappings
    result = check_case(mapping_set, GOLDEN)
    assert result.passed, result.differences
    bundle = translate_case(mapping_set, GOLDEN).bundle
    assert bundle_problems(bundle) == []
    patient = bundle["entry"][0]["resource"]
    assert patient["address"][0]["line"] == ["12 Rue des Orangers | Bloc A^3"]
