"""MLLP framing and the one-message client, against a real listener on 127.0.0.1 (no database)."""

import threading
import time

import pytest
from hl7apy.mllp import AbstractHandler, MLLPServer

from apps.lis import mllp
from apps.lis.mllp import FrameReader, frame

from .lis_listener import MllpListener, ack_text, acks, free_port, silent

CONTROL = "HW0001"
ORU = ("MSH|^~\\&|HEMOWEB|LAB|LIS|LAB|20261201120000||ORU^R01^ORU_R01|HW0001|P|2.5.1\r"
       "PID|1||PAT-123^^^^PI||^^^^^^U\r"
       "OBR|1||ACC-1^HEMOWEB|58410-2^CBC W Auto Differential panel^LN|||||||||||||||||||||HM|F\r"
       "OBX|1|NM|770-8^Neutrophils/100 leukocytes^LN||62.5|%^%^UCUM|||||F")


def test_a_frame_split_into_single_bytes_is_put_back_together():
    reader, found = FrameReader(), []
    for byte in b"noise" + frame(ORU) + frame("MSH|second"):
        found += reader.feed(bytes([byte]))
    assert found == [ORU, "MSH|second"]  # the noise before VT is dropped


def test_two_frames_in_one_packet_are_two_messages():
    assert FrameReader().feed(frame("A") + frame("B") + b"\x0bC") == ["A", "B"]


def test_a_frame_that_never_ends_is_refused_past_the_limit():
    reader = FrameReader(max_frame=100)
    reader.feed(b"\x0b" + b"x" * 50)
    with pytest.raises(mllp.BadAck, match="without ending the MLLP frame"):
        reader.feed(b"x" * 60)


def test_an_aa_ack_is_a_delivery_and_the_listener_got_the_message_as_sent():
    with MllpListener() as lis:
        ack = mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=5)
    assert ack.delivered and ack.code == "AA" and ack.control_id == CONTROL
    assert lis.received == [ORU]


def test_an_ack_split_across_tcp_packets_is_read_whole():
    with MllpListener(acks("AA", text="stored", pieces=40)) as lis:
        ack = mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=5)
    assert ack.delivered and ack.text == "stored"


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_an_error_or_reject_ack_is_refused_with_the_lis_reason(code):
    with MllpListener(acks(code, text="Unknown accession")) as lis:
        with pytest.raises(mllp.Refused, match=f"answered {code}: Unknown accession") as refused:
            mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=5)
    assert refused.value.ack.code == code and "MSA|" in refused.value.answer


def test_the_reason_of_an_err_segment_is_read_when_msa_3_is_empty():
    answer = ack_text(ORU, "AE") + "ERR|||207^Application internal error^HL70357|E||||Patient unknown\r"
    ack = mllp.parse_ack(answer)
    assert (ack.code, ack.text) == ("AE", "Patient unknown")


def test_an_ack_for_another_message_id_is_not_a_delivery():
    with MllpListener(acks("AA", control_id="SOMEONE-ELSE")) as lis:
        started = time.monotonic()
        with pytest.raises(mllp.LisTimeout, match="acknowledged message SOMEONE-ELSE, not HW0001"):
            mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=0.5)
    assert time.monotonic() - started < 3


def test_a_late_ack_of_an_earlier_message_is_skipped_and_the_right_one_taken():
    def late_then_right(message):
        return [frame(ack_text(message, control_id="EARLIER")), frame(ack_text(message))]
    with MllpListener(late_then_right) as lis:
        assert mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=5).control_id == CONTROL


def test_a_lis_that_never_answers_times_out():
    with MllpListener(silent) as lis:
        started = time.monotonic()
        with pytest.raises(mllp.LisTimeout, match="no acknowledgement within 0.4 s"):
            mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=0.4)
        assert 0.35 < time.monotonic() - started < 3
    assert lis.received == [ORU]


def test_a_lis_that_is_down_is_unreachable():
    port = free_port()
    with pytest.raises(mllp.LisUnreachable, match=f"No connection to the LIS at 127.0.0.1:{port}"):
        mllp.send("127.0.0.1", port, ORU, CONTROL, timeout=2)


def test_a_lis_that_hangs_up_without_an_ack_is_unreachable():
    with MllpListener(lambda message: []) as lis:  # reads, answers nothing...
        lis.closing.set()  # ...and closes the connection
        with pytest.raises(mllp.LisUnreachable, match="closed the connection without an acknowledgement"):
            mllp.send(lis.host, lis.port, ORU, CONTROL, timeout=5)


@pytest.mark.parametrize("answer, reason", [
    ("not hl7 at all", "not a readable HL7 acknowledgement"),
    ("MSH|^~\\&|LIS|LAB|HEMOWEB|LAB|20261201||ACK|1|P|2.5.1\rMSA|ZZ|HW0001\r", "ZZ is none of"),
    ("MSH|^~\\&|LIS|LAB|HEMOWEB|LAB|20261201||ACK|1|P|2.5.1\r", "without an MSA segment"),
])
def test_an_unreadable_answer_is_a_bad_ack(answer, reason):
    with pytest.raises(mllp.BadAck, match=reason):
        mllp.parse_ack(answer)


class _Accept(AbstractHandler):
    def reply(self) -> str:
        return frame(ack_text(self.incoming_message.replace("\n", "\r"))).decode()


def test_hl7apy_s_own_mllp_server_accepts_the_framing():
    """Another implementation of MLLP (hl7apy's server) reads our frames and we read its answer."""
    server = MLLPServer("127.0.0.1", 0, {"ORU^R01^ORU_R01": (_Accept,)}, timeout=5)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        ack = mllp.send("127.0.0.1", server.server_address[1], ORU, CONTROL, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert ack.delivered and ack.control_id == CONTROL
