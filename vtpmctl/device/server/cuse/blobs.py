"""State blobs over CUSE: chunked PTM_GET/SET_STATEBLOB ioctls (docs/protocol.md#state-blobs).

A blob moves in 3072-byte ioctl chunks, or, in blob mode, through read()
and write() on the device between the ioctls that open and close it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from vtpmctl.device.protocol import (
    MESSAGES,
    SET_STATEBLOB_MAX,
    STATE_BLOB_CHUNK,
    BlobType,
    Cmd,
    Res,
    decode_ioctl_request,
    encode_ioctl_response,
)
from vtpmctl.engine.tpm import Engine


class BlobUpload:
    """SET_STATEBLOB over CUSE (docs/protocol.md#state-blobs), reassembled.

    Chunks of exactly 3072 bytes say "more follows"; a shorter one (even
    empty) ends the blob. An empty first chunk of a new transfer opens the
    streaming mode instead, where write() calls carry the bytes until the
    next (normally empty) chunk ends it. A chunk of another blob type starts
    a new transfer.
    """

    def __init__(self) -> None:
        self.blob_type: int | None = None
        self.state_flags = 0
        self.streaming = False
        self._data = bytearray()

    def reset(self) -> None:
        self.blob_type = None
        self.state_flags = 0
        self.streaming = False
        self._data = bytearray()

    @property
    def active(self) -> bool:
        return self.blob_type is not None

    def _append(self, data: bytes | memoryview) -> None:
        # Keep one byte past the limit so the commit can tell the blob is too big.
        room = SET_STATEBLOB_MAX + 1 - len(self._data)
        if room > 0:
            self._data += data[:room]

    def chunk(self, blob_type: int, state_flags: int, data: bytes) -> bytes | None:
        """Take one ioctl chunk; the whole blob when this chunk ends it."""
        if blob_type != self.blob_type:
            self.reset()
            self.blob_type = blob_type
            if not data:
                self.streaming = True
                return None
        self.state_flags = state_flags
        self._append(data)
        if len(data) == STATE_BLOB_CHUNK:
            return None
        blob = bytes(self._data)
        self.reset()
        return blob

    def write(self, data: bytes | memoryview) -> None:
        """Bytes streamed with write() between the opening and the closing ioctl."""
        self._append(data)


@dataclass
class BlobDownload:
    """One GET_STATEBLOB blob, generated once and handed out in pieces.

    See docs/protocol.md#state-blobs.

    A transfer that starts at offset 0 generates a fresh blob; the chunks of
    one transfer therefore all come from the same bytes (one IV when
    encrypted). ``after_send`` runs once the last byte has gone out.
    """

    blob_type: int
    request_flags: int
    blob: bytes
    state_flags: int
    after_send: Callable[[], None] | None = None
    read_pos: int | None = None  # not None: read() streams the rest from here
    sent_all: bool = False

    def chunk(self, offset: int) -> bytes:
        data = self.blob[offset : offset + STATE_BLOB_CHUNK]
        end = offset + len(data)
        self.read_pos = end if end < len(self.blob) else None
        self._note_sent(end)
        return data

    def read(self, size: int) -> bytes:
        """read() in blob mode; a short read ends the mode."""
        pos = self.read_pos or 0
        data = self.blob[pos : pos + size]
        end = pos + len(data)
        self.read_pos = end if len(data) == size else None
        self._note_sent(end)
        return data

    def _note_sent(self, end: int) -> None:
        if end >= len(self.blob):
            self.sent_all = True

    def take_after_send(self) -> Callable[[], None] | None:
        """The post-transfer action, once, when everything has been sent."""
        if not self.sent_all:
            return None
        action, self.after_send = self.after_send, None
        return action


class BlobTransfer:
    """The state blobs of one opener of the device.

    ``upload`` and ``download`` are shared with the server's read() and
    write() handlers; the server's lock ``mu`` guards them (the reader
    thread and the worker both reach them).
    """

    def __init__(self, engine: Engine, mu: threading.Lock) -> None:
        self.engine = engine
        self._mu = mu
        self.upload = BlobUpload()
        self.download: BlobDownload | None = None

    def reset(self) -> None:
        """Forget any transfer in progress (caller holds the lock)."""
        self.upload.reset()
        self.download = None

    def get(self, data: bytes) -> tuple[bytes, Callable[[], None] | None]:
        """Answer one PTM_GET_STATEBLOB: the reply and what to run once it is sent."""
        req = decode_ioctl_request(Cmd.GET_STATEBLOB, data)
        blob_type, flags, offset = req["type"], req["state_flags"], req["offset"]
        download = self.download
        if (
            offset == 0
            or download is None
            or download.blob_type != blob_type
            or download.request_flags != flags
        ):
            reply = self.engine.control(
                Cmd.GET_STATEBLOB, {"state_flags": flags, "type": blob_type, "offset": 0}
            )
            if reply.result != Res.SUCCESS:
                with self._mu:
                    self.download = None
                return encode_ioctl_response(Cmd.GET_STATEBLOB, {"result": reply.result}), None
            download = BlobDownload(
                blob_type, flags, reply.data, reply.fields.get("state_flags", 0), reply.after_send
            )
        with self._mu:
            self.download = download
            chunk = download.chunk(offset)
        out = encode_ioctl_response(
            Cmd.GET_STATEBLOB,
            {
                "result": Res.SUCCESS,
                "state_flags": download.state_flags,
                "totlength": len(download.blob),
                "length": len(chunk),
            },
            chunk,
        )
        return out, download.take_after_send()

    def set(self, data: bytes) -> bytes:
        """Answer one PTM_SET_STATEBLOB chunk; the last one hands the blob to the engine."""
        req = decode_ioctl_request(Cmd.SET_STATEBLOB, data)
        blob_type, flags, length = req["type"], req["state_flags"], req["length"]

        def result(rc: int) -> bytes:
            return encode_ioctl_response(Cmd.SET_STATEBLOB, {"result": rc})

        start = MESSAGES[Cmd.SET_STATEBLOB].ioctl_request.size()
        with self._mu:
            if not MESSAGES[Cmd.SET_STATEBLOB].allowed(self.engine.running):
                self.upload.reset()
                return result(Res.BAD_ORDINAL)
            if length > STATE_BLOB_CHUNK or blob_type not in BlobType._value2member_map_:
                self.upload.reset()
                return result(Res.BAD_PARAMETER)
            blob = self.upload.chunk(blob_type, flags, data[start : start + length])
        if blob is None:
            return result(Res.SUCCESS)
        if len(blob) > SET_STATEBLOB_MAX:
            return result(Res.FAIL)
        reply = self.engine.control(
            Cmd.SET_STATEBLOB, {"state_flags": flags, "type": blob_type, "length": len(blob)}, blob
        )
        return result(reply.result)
