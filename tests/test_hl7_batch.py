"""HL7 batches (FHS/BHS ... MSH ... BTS/FTS) split into messages, all or nothing."""
import pytest

from adapters.hl7v2.batch import BatchError, is_batch, split_batch
from adapters.hl7v2.codes import AppErrorCode, ErrorCondition
from adapters.hl7v2.header import HeaderError, Location
from conftest import corpus_path


def corpus(*parts: str) -> bytes:
    with open(corpus_path(*parts), "rb") as f:
        return f.read()


def join(*segments: str, end: str = "\r") -> bytes:
    """Segments joined and terminated with `end`."""
    return "".join(s + end for s in segments).encode("ascii")


BHS = "BHS|^~\\&|LAB|CHU_X|HIE|MA|20260101120000||||BATCH-7"


def msg(control_id: str) -> list[str]:
    """A two-segment synthetic message."""
    return [f"MSH|^~\\&|LAB|CHU_X|HIE|MA|20260101120000||ADT^A08|{control_id}|P|2.5",
            f"PID|1||{control_id}^^^CHU_X^PI"]


@pytest.mark.parametrize("name, count, has_file", [
    ("sample_batch.hl7", 1, False),
    ("sample_batch1.hl7", 2, False),
    ("sample_file.hl7", 1, True),
])
def test_corpus_batches_split(name, count, has_file):
    """The python-hl7 sample batches split into the right number of MSH-led slices of the input."""
    raw = corpus("python-hl7", name)
    assert is_batch(raw)
    batch = split_batch(raw)
    assert len(batch.messages) == count
    assert (batch.file_header is not None) is has_file
    assert (batch.file_trailer is not None) is has_file
    for message in batch.messages:
        assert message.startswith(b"MSH|")
        assert message in raw
        assert b"BTS" not in message and b"BHS" not in message
    assert batch.batches[0].header[0] == b"BHS"
    assert batch.batches[0].header[10] == b"abchs20070101123401-1"  # BHS-11
    assert batch.batches[0].trailer[:2] == [b"BTS", str(count).encode()]


def test_corpus_batch_messages_are_exact_slices():
    """The two messages of sample_batch1 are consecutive slices, each ending with its CR."""
    raw = corpus("python-hl7", "sample_batch1.hl7")
    first, second = split_batch(raw).messages
    assert raw.index(first) + len(first) == raw.index(second)
    assert first.endswith(b"\r") and b"12334456778890" in first
    assert b"12334456778891" in second


@pytest.mark.parametrize("name, words", [
    ("sample_bad_batch.hl7", "outside a message"),
    ("sample_bad_batch1.hl7", "BHS before"),
    ("sample_bad_file.hl7", "outside a message"),
    ("sample_bad_file1.hl7", "BHS before"),
    ("sample_bad_file2.hl7", "FHS is only allowed"),
    ("sample_bad_file3.hl7", "outside a message"),
])
def test_corpus_bad_batches(name, words):
    """The python-hl7 bad batches and files raise BatchError with a reason."""
    with pytest.raises(BatchError) as caught:
        split_batch(corpus("python-hl7", name))
    assert words in caught.value.reason
    assert caught.value.condition is ErrorCondition.SEGMENT_SEQUENCE_ERROR


def test_ruby_empty_batch_count_mismatch():
    """ruby-hl7 empty-batch.hl7 says BTS|2 with no message: BATCH_COUNT_MISMATCH at BTS-1."""
    with pytest.raises(BatchError) as caught:
        split_batch(corpus("ruby-hl7", "empty-batch.hl7"))
    error = caught.value
    assert error.app_code is AppErrorCode.BATCH_COUNT_MISMATCH
    assert error.location == Location("BTS", 1, 1)
    assert "2" in error.reason and "0" in error.reason


def test_empty_batch_with_zero_count_is_valid():
    """A batch with no message and BTS|0 is the valid 'nothing to send' batch."""
    batch = split_batch(join(BHS, "BTS|0"))
    assert batch.messages == []
    assert len(batch.batches) == 1


@pytest.mark.parametrize("count", ["one", "1_0", "+1", "0x1"])
def test_count_not_a_number(count):
    """BTS-1 that is not a number (digits only: int() reads '1_0' and '+1') is a
    DATA_TYPE_ERROR at BTS-1."""
    with pytest.raises(BatchError) as caught:
        split_batch(join(BHS, *msg("1"), f"BTS|{count}"))
    assert caught.value.condition is ErrorCondition.DATA_TYPE_ERROR
    assert caught.value.location == Location("BTS", 1, 1)


def test_count_with_spaces_around_it_is_read():
    assert len(split_batch(join(BHS, *msg("1"), "BTS| 1 ")).messages) == 1


def test_count_is_optional():
    """A BTS without BTS-1 is accepted; the structure is still checked."""
    batch = split_batch(join(BHS, *msg("1"), *msg("2"), "BTS"))
    assert len(batch.messages) == 2


def test_count_mismatch_more_messages():
    """BTS|1 with two messages is a count mismatch."""
    with pytest.raises(BatchError) as caught:
        split_batch(join(BHS, *msg("1"), *msg("2"), "BTS|1"))
    assert caught.value.app_code is AppErrorCode.BATCH_COUNT_MISMATCH


def test_file_with_two_batches():
    """A file of two batches gives the messages of both, in order; FTS-1 counts batches."""
    raw = join("FHS|^~\\&|LAB|CHU_X", BHS, *msg("1"), "BTS|1", BHS, *msg("2"), *msg("3"), "BTS|2",
               "FTS|2")
    batch = split_batch(raw)
    assert [m.split(b"|")[9] for m in batch.messages] == [b"1", b"2", b"3"]
    assert [len(part.messages) for part in batch.batches] == [1, 2]


def test_file_count_mismatch():
    """FTS-1 not matching the number of batches is a count mismatch at FTS-1."""
    with pytest.raises(BatchError) as caught:
        split_batch(join("FHS|^~\\&|LAB|CHU_X", BHS, *msg("1"), "BTS|1", "FTS|3"))
    assert caught.value.app_code is AppErrorCode.BATCH_COUNT_MISMATCH
    assert caught.value.location == Location("FTS", 1, 1)


@pytest.mark.parametrize("segments, counts", [
    ([BHS, *msg("1"), *msg("2")], [2]),  # no BTS
    (["FHS|^~\\&|LAB", BHS, *msg("1"), "BTS|1"], [1]),  # no FTS
    (["FHS|^~\\&|LAB", *msg("1"), *msg("2"), "FTS|1"], [2]),  # no BHS: one implicit batch
    (["FHS|^~\\&|LAB", "FTS|0"], []),  # an empty file
])
def test_optional_envelope_segments(segments, counts):
    """As in the HL7 grammar [FHS] {[BHS] {MSH...} [BTS]} [FTS], trailers and BHS are optional."""
    batch = split_batch(join(*segments))
    assert [len(part.messages) for part in batch.batches] == counts
    assert all(m.startswith(b"MSH") for m in batch.messages)


@pytest.mark.parametrize("segments, words", [
    ([BHS, *msg("1"), "BTS|1", *msg("2")], "outside a BHS"),
    ([BHS, "BTS|0", "BTS|0"], "BTS without an open batch"),
    ([BHS, "BTS|0", "FTS|1"], "FTS without FHS"),
    ([BHS, *msg("1"), "BTS|1", "EVN|A08"], "outside a message"),
    # FTS ends the file: a message after it was taken into the batch, uncounted.
    (["FHS|^~\\&|LAB", BHS, *msg("1"), "FTS|1", *msg("2")], "MSH after FTS"),
    (["FHS|^~\\&|LAB", BHS, *msg("1"), "FTS|1", "BTS|1"], "BTS after FTS"),
    (["FHS|^~\\&|LAB", BHS, *msg("1"), "BTS|1", "FTS|1", "FTS|1"], "FTS after FTS"),
])
def test_structure_errors(segments, words):
    """Segments out of place reject the whole batch with a reason."""
    with pytest.raises(BatchError) as caught:
        split_batch(join(*segments))
    assert words in caught.value.reason


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_lf_and_crlf_line_endings(end):
    """Batches with LF or CRLF segment ends split the same way."""
    batch = split_batch(join(BHS, *msg("1"), *msg("2"), "BTS|2", end=end))
    assert len(batch.messages) == 2
    assert all(m.startswith(b"MSH|") for m in batch.messages)


def test_segment_id_outside_ascii_letters_and_digits_is_named_safely():
    """A segment id is named in ERR-2 and the reason with '?' for each byte that is not an ASCII
    letter or digit (a NUL, a separator, a byte above 0x7F), never as the bytes themselves."""
    raw = join(BHS, "BTS|0").replace(b"BTS|0", b"\x00\xe9|X|1")
    with pytest.raises(BatchError) as caught:
        split_batch(raw)
    assert caught.value.location == Location("???", 1)
    assert caught.value.reason.startswith("??? segment outside a message")


def test_bad_batch_header_delimiters():
    """A BHS with bad encoding characters raises HeaderError at BHS-2."""
    with pytest.raises(HeaderError) as caught:
        split_batch(join("BHS|^~|LAB", "BTS|0"))
    assert caught.value.location == Location("BHS", 1, 2)


def test_is_batch():
    """is_batch is true for frames starting with FHS or BHS (after stray line breaks) only."""
    assert is_batch(b"\r\nBHS|^~\\&|")
    assert is_batch(b"FHS|^~\\&|")
    assert not is_batch(join(*msg("1")))
    assert not is_batch(b"")
