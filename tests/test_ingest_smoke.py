"""End to end over a real socket: accept, store, duplicate replay (SQLite and PostgreSQL)."""
import hl7msgs
import pytest_twisted
from twisted.internet import threads

from adapters.mllp.client import MllpClient, describe
from gateway.store.database import create_gateway_engine
from gateway.store.queries import list_messages


@pytest_twisted.inlineCallbacks
def test_accepts_stores_and_replays_a_duplicate(db_url, make_config, running_gateway):
    """An ORU^R01 gets CA after it is stored; the same bytes again get the same ACK, stored once."""
    config = make_config(db_url)
    ports = yield running_gateway(config)
    message = hl7msgs.message("oru", 7).encode("utf-8")

    def exchange():
        with MllpClient("127.0.0.1", ports["mllp-test"], timeout=10) as client:
            return client.send(message).response, client.send(message).response

    first, again = yield threads.deferToThread(exchange)
    assert describe(first)["msa1"] == "CA" and describe(first)["msa2"] == "B00000000007"
    assert again == first
    engine = create_gateway_engine(db_url)
    with engine.connect() as conn:
        rows = list_messages(conn)
    engine.dispose()
    # Stored once; translation (after the ACK) may already have moved it on.
    assert [(r.control_id, r.duplicate_count) for r in rows] == [("B00000000007", 1)]
    assert rows[0].status in ("received", "translated", "failed")
