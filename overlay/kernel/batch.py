"""One NETLINK_ROUTE socket that sends many requests per sendmsg and reads the error acks.

rtnetlink processes a multi-message send synchronously and in order, and an error in one
message does not stop the rest; a failed request is always acked, a successful one only if it
asks to be. So a batch of ~1000 messages costs one syscall to send plus one recv per failure
and one for a final acked no-op, and each error ack maps back to its request by sequence
number.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from overlay.kernel import nlmsg

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MAX_BATCH_BYTES = 64 * 1024
MAX_BATCH_MSGS = 1000
RCVBUF = 32 * 1024 * 1024
SNDBUF = 4 * 1024 * 1024
RECV_TIMEOUT_S = 30.0

_SEQ = struct.Struct("=I")
_HDR_HEAD = struct.Struct("=IHH")  # nlmsghdr: len, type, flags
_FLAGS_SEQ = struct.Struct("=HI")  # nlmsghdr from offset 6: flags, seq
_END_FLAGS = nlmsg.NLM_F_REQUEST | nlmsg.NLM_F_ACK

# A chunk ready to send: (messages with sequence numbers and end marker, index of its first
# message, first sequence number, message count).
_Chunk = tuple[bytearray, int, int, int]


class DumpInterrupted(Exception):
    """The kernel's table changed during a dump (NLM_F_DUMP_INTR); retry it."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` with the calling context in network namespace `netns` (None: the current one).

    setns() only changes the calling thread, so a short-lived thread does it and the caller's
    thread never leaves its namespace. Sockets keep the namespace they were created in.
    """
    if netns is None:
        return fn()
    path = netns if netns.startswith("/") else f"/var/run/netns/{netns}"
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            failure.append(OSError(exc.errno, f"netns {netns!r}: {exc.strerror}"))
            return
        try:
            _setns(fd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def open_rtnl(netns: str | None = None, groups: int = 0) -> socket.socket:
    """A NETLINK_ROUTE socket (in `netns` if given) with big buffers and extended acks."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            for opt, size in ((33, RCVBUF), (32, SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, size)
                except PermissionError:
                    plain = socket.SO_RCVBUF if opt == 33 else socket.SO_SNDBUF
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
            for opt in (nlmsg.NETLINK_EXT_ACK, nlmsg.NETLINK_CAP_ACK, nlmsg.NETLINK_GET_STRICT_CHK):
                # Older kernels: plain acks and client-side filtering still work.
                with contextlib.suppress(OSError):
                    sock.setsockopt(nlmsg.SOL_NETLINK, opt, 1)
            sock.bind((0, groups))
        except BaseException:
            sock.close()
            raise
        return sock

    return in_netns(netns, make)


class RtnlSocket:
    """Batched requests and dumps over one rtnetlink socket. Not thread-safe."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.sock = open_rtnl(netns)
        self.sock.settimeout(RECV_TIMEOUT_S)
        self._seq = 1
        self._buf = bytearray(1024 * 1024)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self, count: int) -> int:
        base = self._seq
        self._seq = (self._seq + count) % 0x7FFF0000 or 1
        if base + count >= 0x7FFF0000:  # keep a chunk's numbers contiguous
            base, self._seq = 1, count + 1
        return base

    def batch(
        self,
        messages: Iterable[bytes],
        max_bytes: int = MAX_BATCH_BYTES,
        max_msgs: int = MAX_BATCH_MSGS,
    ) -> list[tuple[int, int, str]]:
        """Send every message (its NLM_F_ACK flag is cleared); return (index, errno, text) per
        failed message, index counting from 0 in `messages`. Failures never stop the others.

        The kernel does its work inside sendall(), which releases the GIL, so a sender thread
        sends chunk k while this thread takes chunk k+1 from `messages` (a generator that
        encodes lazily runs in parallel with the kernel). Chunks are sent strictly in order,
        one at a time: an object created in one exists for the next.
        """
        chunks = self._chunks(iter(messages), max_bytes, max_msgs)
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if second is None:  # one chunk at most: no thread needed
            return self._send_chunk(*first) if first is not None else []
        failures: list[tuple[int, int, str]] = []
        errors: list[BaseException] = []
        # Room for one chunk only, so put() blocks whenever the sender wants the next one:
        # that hands it the GIL at once. Otherwise it would wait for the GIL's 5 ms switch
        # interval, longer than encoding a chunk takes, and only run while we wait.
        todo: queue.Queue[_Chunk | None] = queue.Queue(maxsize=1)

        def send() -> None:
            while (chunk := todo.get()) is not None:
                if errors:
                    continue  # drain, so that put() never blocks forever
                try:
                    failures.extend(self._send_chunk(*chunk))
                except BaseException as exc:
                    errors.append(exc)

        sender = threading.Thread(target=send, name="rtnl-batch")
        sender.start()
        try:
            for chunk in itertools.chain((first, second), chunks):
                if errors:
                    break
                todo.put(chunk)
        finally:
            todo.put(None)
            sender.join()
        if errors:
            raise errors[0]
        return failures

    def _chunks(self, messages: Iterator[bytes], max_bytes: int, max_msgs: int) -> Iterator[_Chunk]:
        """(buffer, index of its first message, first seq, count) per chunk of at most
        `max_msgs` messages and `max_bytes` bytes (or one bigger message)."""
        start = 0
        pending = next(messages, None)
        while pending is not None:
            chunk = [pending]
            size = len(pending)
            pending = None
            for msg in messages:
                if len(chunk) == max_msgs or size + len(msg) > max_bytes:
                    pending = msg
                    break
                chunk.append(msg)
                size += len(msg)
            count = len(chunk)
            base = self._next_seq(count + 1)
            # Success acks are not requested: the kernel acks a failed request regardless,
            # and one recv per success ack was most of the Python time of a batch. A trailing
            # NLMSG_NOOP asking for an ack marks the end: rtnetlink handles a send's messages
            # in order.
            buf = bytearray(b"".join(chunk))
            off = 0
            for seq in range(base, base + count):
                length, _type, flags = _HDR_HEAD.unpack_from(buf, off)
                _FLAGS_SEQ.pack_into(buf, off + 6, flags & ~nlmsg.NLM_F_ACK, seq)
                off += (length + 3) & ~3
            buf += nlmsg.NLMSG_HDR.pack(16, nlmsg.NLMSG_NOOP, _END_FLAGS, base + count, 0)
            yield buf, start, base, count
            start += count

    def _send_chunk(
        self, buf: bytearray, start: int, base: int, count: int
    ) -> list[tuple[int, int, str]]:
        """Send one chunk from _chunks() and read its error acks up to the end marker's."""
        end_seq = base + count
        self.sock.sendall(buf)
        failures: list[tuple[int, int, str]] = []
        rbuf = self._buf
        while True:
            try:
                n = self.sock.recv_into(rbuf)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Error acks were dropped: outcomes unknown, report every message as failed.
                return [
                    (start + j, errno.ENOBUFS, "ack lost (receive buffer)") for j in range(count)
                ]
            for msg_type, _flags, seq, payload in nlmsg.iter_messages(rbuf[:n]):
                if msg_type != nlmsg.NLMSG_ERROR:
                    continue
                if seq == end_seq:
                    return failures
                err, text = nlmsg.parse_error(payload)
                if err and base <= seq < end_seq:
                    failures.append((start + seq - base, err, text or os.strerror(err)))

    def dump(self, request: bytes) -> Iterator[tuple[int, memoryview]]:
        """Send a dump request and yield (msg_type, payload) for every reply message.

        Raises DumpInterrupted if the kernel flags the dump as inconsistent, OSError on an
        error reply. The iterator must be exhausted before the socket is used again, and a
        payload is only valid until the next item is requested (it views a reused buffer).
        """
        seq = self._next_seq(1)
        req = bytearray(request)
        _SEQ.pack_into(req, 8, seq)
        self.sock.sendall(req)
        interrupted = False
        while True:
            n = self.sock.recv_into(self._buf)
            for msg_type, flags, mseq, payload in nlmsg.iter_messages(memoryview(self._buf)[:n]):
                if mseq != seq:
                    continue
                if flags & nlmsg.NLM_F_DUMP_INTR:
                    interrupted = True
                if msg_type == nlmsg.NLMSG_DONE:
                    # A dump that fails to start reports its error in the DONE payload.
                    if len(payload) >= 4 and (err := -struct.unpack_from("=i", payload)[0]) > 0:
                        ext = nlmsg.parse_attrs(payload, 4).get(nlmsg.NLMSGERR_ATTR_MSG)
                        raise OSError(
                            err, bytes(ext or b"").rstrip(b"\0").decode() or os.strerror(err)
                        )
                    if interrupted:
                        raise DumpInterrupted()
                    return
                if msg_type == nlmsg.NLMSG_ERROR:
                    err, text = nlmsg.parse_error(payload)
                    if err:
                        raise OSError(err, text or os.strerror(err))
                    return
                yield msg_type, payload

    def links(self) -> dict[int, str]:
        """ifindex -> name for every link in the socket's namespace."""
        out: dict[int, str] = {}
        for _t, payload in self.dump(nlmsg.dump_links()):
            index, name, _flags = nlmsg.decode_link(payload)
            out[index] = name
        return out
