"""MSH-18 (HL7 table 0211) to Python codecs, and decoding with a per-sender fallback."""
import pytest

from adapters.hl7v2.charsets import CharsetError, Decoded, codec_for, decode

ARABIC = "محمد بن عبد الله، الرباط"  # synthetic name and city
FRENCH = "Hôpital Ibn Sina, Rabat: résultat « normal », cœur"


@pytest.mark.parametrize("declared, codec", [
    ("ASCII", "ascii"),
    ("8859/1", "iso8859-1"),
    ("8859/6", "iso8859-6"),
    ("8859/15", "iso8859-15"),
    ("UNICODE UTF-8", "utf-8"),
    ("UNICODE", "utf-8"),
    ("", "ascii"),
    (" unicode utf-8 ", "utf-8"),
])
def test_codec_for(declared, codec):
    """Each supported MSH-18 value maps to its Python codec; empty means ASCII."""
    assert codec_for(declared) == codec


@pytest.mark.parametrize("declared", [" ", "   "])
def test_codec_for_blank_msh18_is_ascii_as_empty(declared):
    """An MSH-18 of blanks (fixed-width senders pad fields) declares nothing, as an empty one:
    ASCII, not an unsupported character set that refuses the message."""
    assert codec_for(declared) == "ascii"
    assert decode("Ren\u00e9".encode("utf-8"), declared) == Decoded("Ren\u00e9", "utf-8", True)


@pytest.mark.parametrize("declared, codec", [
    ("UTF-8", "utf-8"), ("utf8", "utf-8"), ("ISO-8859-6", "iso8859-6"), ("windows-1256", "cp1256"),
])
def test_codec_for_common_aliases(declared, codec):
    """Unambiguous names that some systems write instead of table 0211's are understood."""
    assert codec_for(declared) == codec


@pytest.mark.parametrize("declared", ["KOI8-R", "UTF-7", "8859/99", "windows-1250"])
def test_codec_for_unknown(declared):
    """A value not in table 0211 is refused with CharsetError naming it."""
    with pytest.raises(CharsetError) as caught:
        codec_for(declared)
    assert declared in caught.value.reason
    assert "not a supported" in caught.value.reason


@pytest.mark.parametrize("declared", ["UNICODE UTF-16", "UNICODE UTF-32"])
def test_codec_for_wide_unicode_refused_with_reason(declared):
    """UTF-16/32 are refused because they cannot travel over MLLP byte framing."""
    with pytest.raises(CharsetError) as caught:
        codec_for(declared)
    assert "MLLP" in caught.value.reason


def test_arabic_in_8859_6_round_trips():
    """Arabic text encoded in ISO 8859-6 decodes back to the same text, without fallback."""
    raw = ARABIC.encode("iso8859-6")
    result = decode(raw, "8859/6")
    assert result.text == ARABIC
    assert result.codec == "iso8859-6" and result.fell_back is False


def test_utf8_french_and_arabic():
    """French and Arabic in UTF-8 decode exactly when UNICODE UTF-8 is declared."""
    text = FRENCH + " / " + ARABIC
    result = decode(text.encode("utf-8"), "UNICODE UTF-8")
    assert result.text == text and result.codec == "utf-8" and not result.fell_back


def test_declared_8859_6_but_windows_1256_with_fallback():
    """Bytes valid only in windows-1256 (here 0xDB ghain, 0xF4 o-circumflex) decode with the
    sender's cp1256 fallback, marked fell_back."""
    text = "غرفة Hôpital"
    raw = text.encode("cp1256")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("iso8859-6")
    result = decode(raw, "8859/6", fallback="cp1256")
    assert result.text == text
    assert result.codec == "cp1256" and result.fell_back is True


def test_declared_8859_6_but_windows_1256_c1_byte_with_fallback():
    """A windows-1256 letter in the C1 range (0x81 peh), which is no text in ISO 8859-6,
    decodes with the cp1256 fallback instead of becoming a control character."""
    text = "پرويز"
    raw = text.encode("cp1256")
    assert raw[:1] == b"\x81"
    result = decode(raw, "8859/6", fallback="cp1256")
    assert result.text == text and result.fell_back is True


def test_declared_8859_1_but_windows_1252_c1_byte_with_fallback():
    """Windows-1252 punctuation in the C1 range (0x92 apostrophe, 0x9C oe) sent as 8859/1
    decodes with the cp1252 fallback rather than as control characters."""
    text = "l’œdème"
    raw = text.encode("cp1252")
    result = decode(raw, "8859/1", fallback="cp1252")
    assert result.text == text and result.codec == "cp1252" and result.fell_back is True


def test_no_fallback_gives_offset_of_first_bad_byte():
    """Without a fallback, undecodable bytes raise CharsetError with the first bad offset."""
    raw = "ABC".encode() + "غ".encode("cp1256") + b"DE" + "ô".encode("cp1256")
    with pytest.raises(CharsetError) as caught:
        decode(raw, "8859/6")
    assert caught.value.offset == 3
    assert "0xdb" in caught.value.reason and "offset 3" in caught.value.reason


def test_fallback_that_also_fails():
    """When the fallback cannot decode either, CharsetError still names the first bad byte."""
    raw = b"MSH|ok\rPID|\xe9\xff\xfe"
    with pytest.raises(CharsetError) as caught:
        decode(raw, "UNICODE UTF-8", fallback="ascii")
    assert caught.value.offset == raw.index(b"\xe9")
    assert "fallback ascii" in caught.value.reason


def test_empty_msh18_with_utf8_bytes():
    """With MSH-18 empty (ASCII), UTF-8 bytes are read as UTF-8 and marked fell_back."""
    text = "Réda العلوي"
    result = decode(text.encode("utf-8"), "")
    assert result.text == text and result.codec == "utf-8" and result.fell_back is True


def test_empty_msh18_with_plain_ascii():
    """Plain ASCII with MSH-18 empty decodes as ASCII without fallback."""
    result = decode(b"MSH|^~\\&|LAB", "")
    assert result.codec == "ascii" and not result.fell_back


def test_declared_ascii_with_utf8_bytes_is_refused():
    """An explicit ASCII declaration does not silently accept UTF-8 bytes."""
    with pytest.raises(CharsetError) as caught:
        decode("é".encode("utf-8"), "ASCII")
    assert caught.value.offset == 0


def test_decode_unknown_declared_raises():
    """decode() refuses an unsupported MSH-18 before looking at the bytes."""
    with pytest.raises(CharsetError):
        decode(b"abc", "EBCDIC", fallback="cp1252")
