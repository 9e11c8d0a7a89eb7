"""A real MLLP listener for the LIS tests: a TCP server on 127.0.0.1 (a free port) in a thread.

What it answers is up to the test: `answer(message)` returns the byte pieces to send back (sent one by
one with a pause, so that TCP hands them over apart), or None to never answer.
"""

import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable

from apps.lis.mllp import FrameReader, frame

Answer = Callable[[str], list[bytes] | None]


def control_id_of(message: str) -> str:
    return message.split("\r", 1)[0].split("|")[9]


def ack_text(message: str, code: str = "AA", text: str = "", control_id: str | None = None) -> str:
    """An HL7 v2.5.1 ACK of `message` (MSA-2 its MSH-10 unless `control_id` says otherwise)."""
    control = control_id_of(message) if control_id is None else control_id
    return (f"MSH|^~\\&|LIS|LAB|HEMOWEB|LAB|{time.strftime('%Y%m%d%H%M%S')}||ACK^R01^ACK|{uuid.uuid4().hex[:20]}|P|"
            f"2.5.1\rMSA|{code}|{control}|{text}\r")


def split(data: bytes, pieces: int) -> list[bytes]:
    size = max(1, -(-len(data) // pieces))
    return [data[i:i + size] for i in range(0, len(data), size)]


def acks(code: str = "AA", text: str = "", control_id: str | None = None, pieces: int = 1) -> Answer:
    return lambda message: split(frame(ack_text(message, code, text, control_id)), pieces)


def in_turn(*answers: Answer) -> Answer:
    """Each message gets the next answer; the last one answers all the rest."""
    queue = list(answers)

    def answer(message: str):
        return (queue.pop(0) if len(queue) > 1 else queue[0])(message)
    return answer


def silent(message: str) -> None:
    return None


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        listener: MllpListener = self.server.listener
        reader = FrameReader()
        self.request.settimeout(0.05)
        while not listener.closing.is_set():
            try:
                data = self.request.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for message in reader.feed(data):
                listener.received.append(message)
                pieces = listener.answer(message)
                if pieces is None:
                    continue  # never answers: keep the connection open until the test ends
                for piece in pieces:
                    self.request.sendall(piece)
                    if len(pieces) > 1:
                        time.sleep(0.005)


class MllpListener:
    def __init__(self, answer: Answer | None = None):
        self.answer = answer or acks("AA")
        self.received: list[str] = []
        self.closing = threading.Event()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.listener = self
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "MllpListener":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def free_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

