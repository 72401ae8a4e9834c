"""No XML parser of the gateway opens a file a document names. libxml2 opened a DOCTYPE's
external subset from the file system despite load_dtd=False; the doors refuse a DOCTYPE on the
bytes first, but a document declared UTF-7 writes it '+ADw-!DOCTYPE'. A FIFO shows it: a parser
that opens one blocks until someone writes to it."""
from __future__ import annotations

import base64
import os
import threading

import pytest

from adapters.legacy.v2xml import parse_v2xml
from adapters.soap.envelope import SOAP_ENV, SoapFault, parse_document
from adapters.soap.gateway.envelope import WORDS
from gateway.delivery.care_sheet import _soap_body


def utf7_document(root: str, system: str) -> bytes:
    text = f'<!DOCTYPE a SYSTEM "{system}">{root}'
    utf7 = b"+" + base64.b64encode(text.encode("utf-16-be")).rstrip(b"=") + b"-"
    return b'<?xml version="1.0" encoding="UTF-7"?>' + utf7


def opens(fifo: str, parse) -> bool:
    """Whether `parse()` opened `fifo` (it then blocks until the FIFO is written to)."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: (_quietly(parse), done.set()), daemon=True)
    thread.start()
    if done.wait(3):
        return False
    with open(fifo, "wb"):  # unblock it
        pass
    thread.join(5)
    return True


def _quietly(parse) -> None:
    try:
        parse()
    except Exception:
        pass


@pytest.mark.parametrize("name, parse, root", [
    ("SOAP door (and sandbox CNSS, SOAP reports)", lambda data: parse_document(data, WORDS), "<a/>"),
    ("CNSS answers", _soap_body, f'<e:Envelope xmlns:e="{SOAP_ENV}"><e:Body/></e:Envelope>'),
    ("v2 XML", parse_v2xml, "<ADT_A01><MSH/></ADT_A01>"),
])
def test_a_hidden_doctype_opens_no_file(tmp_path, name, parse, root):
    fifo = str(tmp_path / "probe")
    os.mkfifo(fifo)
    assert not opens(fifo, lambda: parse(utf7_document(root, f"file://{fifo}"))), name


def test_the_soap_door_still_refuses_the_doctype_it_did_not_see_on_the_bytes(tmp_path):
    with pytest.raises(SoapFault) as fault:
        parse_document(utf7_document("<a/>", f"file://{tmp_path}/none.dtd"), WORDS)
    assert fault.value.error == "DTD_FORBIDDEN"
