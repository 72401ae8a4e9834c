"""HL7 v2 protocol vocabularies in one place: ACK codes, table 0357 error conditions,
table 0516 severities, table 0155 acknowledgement conditions. Closed sets, as enums."""
from __future__ import annotations

from enum import Enum


class AckCode(str, Enum):
    """MSA-1 (HL7 table 0008)."""

    APPLICATION_ACCEPT = "AA"
    APPLICATION_ERROR = "AE"
    APPLICATION_REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    COMMIT_ERROR = "CE"
    COMMIT_REJECT = "CR"

    @property
    def positive(self) -> bool:
        return self in (AckCode.APPLICATION_ACCEPT, AckCode.COMMIT_ACCEPT)


class Outcome(str, Enum):
    """What happened to a message, independent of the acknowledgement mode."""

    ACCEPT = "accept"
    ERROR = "error"
    REJECT = "reject"

    def ack_code(self, enhanced: bool) -> AckCode:
        """Original mode answers AA/AE/AR, enhanced mode (MSH-15/16 valued) CA/CE/CR."""
        return _ACK_CODES[(self, enhanced)]


_ACK_CODES = {
    (Outcome.ACCEPT, False): AckCode.APPLICATION_ACCEPT,
    (Outcome.ERROR, False): AckCode.APPLICATION_ERROR,
    (Outcome.REJECT, False): AckCode.APPLICATION_REJECT,
    (Outcome.ACCEPT, True): AckCode.COMMIT_ACCEPT,
    (Outcome.ERROR, True): AckCode.COMMIT_ERROR,
    (Outcome.REJECT, True): AckCode.COMMIT_REJECT,
}


class ErrorCondition(int, Enum):
    """ERR-3, HL7 table 0357 (message error condition codes)."""

    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    VALUE_TOO_LONG = 104
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return _CONDITION_TEXT[self]


_CONDITION_TEXT = {
    ErrorCondition.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCondition.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCondition.DATA_TYPE_ERROR: "Data type error",
    ErrorCondition.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCondition.VALUE_TOO_LONG: "Value too long",
    ErrorCondition.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCondition.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCondition.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCondition.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCondition.UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    ErrorCondition.DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    ErrorCondition.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCondition.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


class Severity(str, Enum):
    """ERR-4, HL7 table 0516."""

    ERROR = "E"
    FATAL = "F"
    INFORMATION = "I"
    WARNING = "W"


class AckCondition(str, Enum):
    """MSH-15 / MSH-16, HL7 table 0155: when the sender wants an acknowledgement."""

    ALWAYS = "AL"
    NEVER = "NE"
    ERROR_ONLY = "ER"
    SUCCESS_ONLY = "SU"

    def wants(self, positive: bool) -> bool:
        if self is AckCondition.ALWAYS:
            return True
        if self is AckCondition.NEVER:
            return False
        return positive if self is AckCondition.SUCCESS_ONLY else not positive


class AppErrorCode(str, Enum):
    """ERR-5 application error codes of this gateway (our own table, "MA-HIE-ERR")."""

    CONTROL_ID_REUSED = "CONTROL_ID_REUSED"
    CHARSET_INVALID = "CHARSET_INVALID"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    NOT_HL7 = "NOT_HL7"
    BATCH_COUNT_MISMATCH = "BATCH_COUNT_MISMATCH"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    SENDER_NOT_ALLOWED = "SENDER_NOT_ALLOWED"
    FACILITY_MISMATCH = "FACILITY_MISMATCH"
    MESSAGE_TYPE_NOT_ALLOWED = "MESSAGE_TYPE_NOT_ALLOWED"
    SOURCE_NOT_ALLOWED = "SOURCE_NOT_ALLOWED"

    @property
    def text(self) -> str:
        return _APP_ERROR_TEXT[self]


APP_ERROR_TABLE = "MA-HIE-ERR"

_APP_ERROR_TEXT = {
    AppErrorCode.CONTROL_ID_REUSED: "Control id already used for a different message",
    AppErrorCode.CHARSET_INVALID: "Bytes not valid in the declared character set",
    AppErrorCode.FRAME_TOO_LARGE: "Message larger than the listener accepts",
    AppErrorCode.NOT_HL7: "Not an HL7 v2 message",
    AppErrorCode.BATCH_COUNT_MISMATCH: "Batch trailer count does not match its content",
    AppErrorCode.STORE_UNAVAILABLE: "Message could not be stored; send it again",
    AppErrorCode.SENDER_NOT_ALLOWED: "Sender not allowed on this listener",
    AppErrorCode.FACILITY_MISMATCH: "Sending facility is not the one the certificate names",
    AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED: "Message type not allowed for this type of facility",
    AppErrorCode.SOURCE_NOT_ALLOWED: "Sender not allowed from this network address",
}
