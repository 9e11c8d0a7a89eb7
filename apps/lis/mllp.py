"""MLLP, the framing HL7 v2 travels in over TCP: VT (0x0b), the message, FS (0x1c) CR (0x0d).

A small client sends one message and reads one ACK within a time limit; `parse_ack` (hl7apy) judges
the ACK: MSA-1 AA/CA is a delivery, AE/AR/CE/CR a refusal with MSA-3 (or ERR-8) as its reason, and
an ACK whose MSA-2 is not the sent message's control id (MSH-10) is no delivery at all.
Plain Python, no Django. The message text carries the patient identifier: nothing here logs it.
"""

import socket
import time
from dataclasses import dataclass

from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

START = b"\x0b"
END = b"\x1c\x0d"
ENCODING = "utf-8"
DELIVERED = ("AA", "CA")
REFUSED = ("AE", "AR", "CE", "CR")
MAX_FRAME = 1 << 20  # an ACK is a few hundred bytes: more than a MiB without an end is no MLLP peer


class MllpError(Exception):
    """The message did not get through; the text says why in words a lab user understands."""

    def __init__(self, text: str, answer: str = ""):
        super().__init__(text)
        self.answer = answer  # the LIS's answer, when there was one


class LisUnreachable(MllpError):
    """No TCP connection (refused, no route, name not found) or it broke."""


class LisTimeout(MllpError):
    """Connected, but no complete ACK came within the time limit."""


class BadAck(MllpError):
    """An answer came, but it is not an ACK of this message (unreadable, or for another control id)."""


class Refused(MllpError):
    """The LIS answered AE/AR/CE/CR: it read the message and did not take it."""

    def __init__(self, ack: "Ack"):
        self.ack = ack
        super().__init__(f"The LIS answered {ack.code}" + (f": {ack.text}" if ack.text else " (no reason given)."),
                         answer=ack.raw)


def frame(message: str) -> bytes:
    """One message in its MLLP frame (segments separated by CR, as HL7 v2 wants them)."""
    return START + message.encode(ENCODING) + END


class FrameReader:
    """Collects bytes as TCP hands them over (a frame may come in many pieces, or several in one)."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self.buffer = b""
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[str]:
        """The frames completed by `data`; bytes outside a frame (noise before VT) are dropped."""
        self.buffer += data
        frames = []
        while True:
            start = self.buffer.find(START)
            if start < 0:
                self.buffer = b""
                break
            end = self.buffer.find(END, start + 1)
            if end < 0:
                self.buffer = self.buffer[start:]
                if len(self.buffer) > self.max_frame:
                    raise BadAck(f"The LIS sent more than {self.max_frame} bytes without ending the MLLP frame.")
                break
            frames.append(self.buffer[start + 1:end].decode(ENCODING, errors="replace"))
            self.buffer = self.buffer[end + len(END):]
        return frames


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2: the control id of the message it answers
    text: str  # MSA-3, else ERR-8: the LIS's reason
    raw: str

    @property
    def delivered(self) -> bool:
        return self.code in DELIVERED


def parse_ack(text: str) -> Ack:
    """Read an ACK with hl7apy; BadAck if it is not an HL7 message with an MSA segment."""
    try:
        message = parse_message(text.replace("\n", "\r").strip("\r"), find_groups=False)
        segments = {segment.name: segment for segment in reversed(message.children)}
        msa = segments.get("MSA")
        if msa is None:
            raise BadAck("The LIS answered without an MSA segment: not an acknowledgement.", answer=text)
        code, control_id, reason = (msa.msa_1.value or "").strip().upper(), msa.msa_2.value or "", msa.msa_3.value or ""
        if not reason and "ERR" in segments:
            reason = segments["ERR"].err_8.value or ""
    except HL7apyException as error:
        raise BadAck(f"The LIS's answer is not a readable HL7 acknowledgement ({error}).", answer=text) from error
    if code not in DELIVERED + REFUSED:
        raise BadAck(f"The LIS's acknowledgement code {code or '(empty)'} is none of AA, AE, AR, CA, CE, CR.",
                     answer=text)
    return Ack(code=code, control_id=control_id.strip(), text=reason.strip(), raw=text)


def check_ack(ack: Ack, control_id: str) -> Ack:
    """The ACK if it delivers message `control_id`; Refused or BadAck otherwise."""
    if ack.control_id != control_id:
        raise BadAck(f"The LIS acknowledged message {ack.control_id or '(no id)'}, not {control_id}: "
                     "not taken as delivered.", answer=ack.raw)
    if not ack.delivered:
        raise Refused(ack)
    return ack


def send(host: str, port: int, message: str, control_id: str, timeout: float = 10.0) -> Ack:
    """Send one message and wait for its ACK, at most `timeout` seconds in all.

    Returns the delivering ACK; raises LisUnreachable, LisTimeout, BadAck or Refused.
    An ACK for another message (a late answer to an earlier one) is skipped: the wait goes on.
    """
    deadline = time.monotonic() + timeout
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError as error:
        raise LisTimeout(f"No connection to the LIS at {host}:{port} within {timeout:g} s.") from error
    except OSError as error:
        raise LisUnreachable(f"No connection to the LIS at {host}:{port}: {error.strerror or error}.") from error
    reader, mismatch = FrameReader(), None
    with connection:
        try:
            connection.sendall(frame(message))
            while True:
                connection.settimeout(max(deadline - time.monotonic(), 0.001))
                data = connection.recv(65536)
                if not data:
                    raise mismatch or LisUnreachable(
                        f"The LIS at {host}:{port} closed the connection without an acknowledgement.")
                for answer in reader.feed(data):
                    try:
                        return check_ack(parse_ack(answer), control_id)
                    except BadAck as error:
                        mismatch = error
        except TimeoutError as error:
            raise LisTimeout(f"The LIS at {host}:{port} sent no acknowledgement within {timeout:g} s"
                             + (f" ({mismatch})" if mismatch else "."), answer=mismatch.answer if mismatch else ""
                             ) from error
        except OSError as error:
            raise LisUnreachable(f"The connection to the LIS at {host}:{port} broke: "
                                 f"{error.strerror or error}.") from error
