"""Scapy layer of the KV handoff protocol (nodes/kvproto.py, docs/wire-format.md).

Every frame type is a Packet class with its fields in ``fields_desc``; ``PDKV`` dispatches on the
header's type byte, so ``PDKV(raw)`` parses a byte stream of back-to-back frames into a chain
(each frame's scapy payload is the next frame). Bound to TCP port ``DEFAULT_KV_PORT`` both
ways; a segment that does not start with the magic (the middle of a frame) stays ``Raw``.
Truncated input (a snaplen-limited capture) parses as far as the bytes go.

The SRD-like transport (nodes/srd.py) has one datagram per UDP packet: ``PDSR`` dispatches on
its type byte likewise and is bound to UDP port ``DEFAULT_KV_PORT`` both ways.
"""
from __future__ import annotations

import struct
from typing import Iterator

from scapy.config import conf
from scapy.fields import (ByteEnumField, ByteField, ConditionalField, FieldLenField, IntField, LongField,
                          ShortEnumField, ShortField, StrField, StrFixedLenField, StrLenField, XIntField,
                          XLongField, XShortField)
from scapy.layers.inet import TCP, UDP
from scapy.packet import Packet, bind_layers

from nodes.kvproto import DEFAULT_KV_PORT, HEADER_LEN, MAGIC, Code, FrameType
from nodes.srd import SRD_MAGIC, SRD_VERSION, TAG_LEN, SrdType

FRAME_TYPES = {t.value: t.name for t in FrameType}
CODES = {c.value: c.name for c in Code}


def _header(ftype: int = 0) -> list:
    return [
        StrFixedLenField("magic", MAGIC, 4),
        ByteField("version", 1),
        ByteEnumField("type", ftype, FRAME_TYPES),
        XShortField("flags", 0),
        IntField("length", None),   # body bytes after this 12-byte header; computed when None
    ]


def _request_id() -> list:
    return [
        FieldLenField("rid_len", None, length_of="request_id", fmt="B"),
        StrLenField("request_id", b"", length_from=lambda p: p.rid_len),
    ]


def _ack_body() -> list:
    """The receiver's verdict, the same in a TCP ACK frame and an SRD ACK datagram."""
    return [
        *_request_id(),
        ByteField("verified", 0),
        ShortEnumField("code", 0, CODES),
        LongField("bytes_verified", 0),
        FieldLenField("reason_len", None, length_of="reason", fmt="H"),
        StrLenField("reason", b"", length_from=lambda p: p.reason_len),
    ]


class PDKV(Packet):
    """A frame of unknown type (header and opaque body); also the dispatcher for all types."""
    name = "PDKV"
    fields_desc = _header() + [StrLenField("body", b"", length_from=lambda p: p.length)]
    frame_type: int | None = None

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args, **kargs):
        if not _pkt:
            return cls
        if _pkt[:4] != MAGIC[:len(_pkt[:4])]:
            return conf.raw_layer          # not a frame start: the middle of a frame
        return _BY_TYPE.get(_pkt[5], PDKV) if len(_pkt) >= 6 else PDKV

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.length is None:
            pkt = pkt[:8] + struct.pack(">I", len(pkt) - HEADER_LEN) + pkt[12:]
        return pkt + pay

    def guess_payload_class(self, payload: bytes):
        return PDKV if payload[:4] == MAGIC else conf.raw_layer


class PDKVHello(PDKV):
    name = "PDKV HELLO"
    frame_type = FrameType.HELLO
    fields_desc = _header(FrameType.HELLO) + [StrFixedLenField("nonce", b"\0" * 32, 32)]


class PDKVAuth(PDKV):
    name = "PDKV AUTH"
    frame_type = FrameType.AUTH
    fields_desc = _header(FrameType.AUTH) + [StrFixedLenField("nonce", b"\0" * 32, 32),
                                             StrFixedLenField("mac", b"\0" * 32, 32)]


class PDKVAuthOk(PDKV):
    name = "PDKV AUTH_OK"
    frame_type = FrameType.AUTH_OK
    fields_desc = _header(FrameType.AUTH_OK) + [StrFixedLenField("mac", b"\0" * 32, 32)]


_STRIPE_TRAILER = 6   # stripe u8, stripes u8, attempt u32 (nodes.kvproto._STRIPE)


def _striped(p: Packet) -> bool:
    """Whether a BEGIN carries the stripe trailer: a dissected frame's length leaves 6 bytes
    after the layout; a frame being built has ``stripes`` > 1."""
    lens = (p.length, p.rid_len, p.model_len, p.layout_len)
    if all(v is not None for v in lens):
        return p.length - (14 + 3 + p.rid_len + p.model_len + p.layout_len) == _STRIPE_TRAILER
    return (p.getfieldval("stripes") or 1) > 1


class PDKVBegin(PDKV):
    name = "PDKV BEGIN"
    frame_type = FrameType.BEGIN
    fields_desc = _header(FrameType.BEGIN) + [
        ShortField("num_layers", 0),    # "layers" would shadow Packet.layers()
        IntField("tokens", 0),
        LongField("total_bytes", 0),
        *_request_id(),
        FieldLenField("model_len", None, length_of="model", fmt="B"),
        StrLenField("model", b"", length_from=lambda p: p.model_len),
        FieldLenField("layout_len", None, length_of="layout", fmt="B"),
        StrLenField("layout", b"layer-major", length_from=lambda p: p.layout_len),
        # a striped transfer's BEGIN (one per connection) ends with its stripe, stripe count, attempt
        ConditionalField(ByteField("stripe", 0), _striped),
        ConditionalField(ByteField("stripes", 1), _striped),
        ConditionalField(IntField("attempt", 0), _striped),
    ]


class PDKVChunk(PDKV):
    name = "PDKV CHUNK"
    frame_type = FrameType.CHUNK
    fields_desc = _header(FrameType.CHUNK) + [
        *_request_id(),
        ShortField("layer", 0),
        LongField("offset", 0),
        FieldLenField("payload_len", None, length_of="data", fmt="I"),
        XIntField("crc32", 0),
        StrLenField("data", b"", length_from=lambda p: p.payload_len),
    ]


class PDKVEnd(PDKV):
    name = "PDKV END"
    frame_type = FrameType.END
    fields_desc = _header(FrameType.END) + [
        *_request_id(),
        LongField("total_bytes", 0),
        IntField("chunks", 0),
        XIntField("checksum", 0),
    ]


class PDKVAck(PDKV):
    name = "PDKV ACK"
    frame_type = FrameType.ACK
    fields_desc = _header(FrameType.ACK) + _ack_body()


_BY_TYPE: dict[int, type[PDKV]] = {int(c.frame_type): c for c in
                                   (PDKVHello, PDKVAuth, PDKVAuthOk, PDKVBegin, PDKVChunk, PDKVEnd, PDKVAck)}

# the largest fixed part (header + fields before a CHUNK's data, with a 255-byte request id)
MAX_FIELDS_LEN = HEADER_LEN + 1 + 255 + 2 + 8 + 4 + 4 + 1 + 255 + 1 + 255


def parse_frame(raw: bytes) -> PDKV | None:
    """One frame from the start of ``raw`` (which may stop early: a truncated capture), without
    what follows it; None when ``raw`` does not hold a frame header and its fixed fields."""
    if len(raw) < HEADER_LEN or raw[:4] != MAGIC:
        return None
    cls = _BY_TYPE.get(raw[5], PDKV)
    try:
        return cls(raw[:HEADER_LEN + struct.unpack(">I", raw[8:12])[0]])
    except (struct.error, ValueError, IndexError):
        return None


def iter_frames(pkt: Packet) -> Iterator[PDKV]:
    """The PDKV frames of a dissected packet, in order."""
    layer = pkt
    while layer and not isinstance(layer, PDKV):
        layer = layer.payload
    while isinstance(layer, PDKV):
        yield layer
        layer = layer.payload


bind_layers(TCP, PDKV, dport=DEFAULT_KV_PORT)
bind_layers(TCP, PDKV, sport=DEFAULT_KV_PORT)


# ---------------------------------------------------------------- SRD-like datagrams

SRD_TYPES = {t.value: t.name for t in SrdType}


def _srd_header(ftype: int = 0) -> list:
    return [
        StrFixedLenField("magic", SRD_MAGIC, 4),
        ByteField("version", SRD_VERSION),
        ByteEnumField("type", ftype, SRD_TYPES),
        XShortField("flags", 0),
        XLongField("session", 0),
    ]


def _tag() -> list:
    return [StrFixedLenField("tag", b"\0" * TAG_LEN, TAG_LEN)]


class PDSR(Packet):
    """An SRD datagram of unknown type (header, opaque rest); the dispatcher for all types."""
    name = "PDSR"
    fields_desc = _srd_header() + [StrField("body", b"")]
    srd_type: int | None = None

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args, **kargs):
        if not _pkt or len(_pkt) < 6 or _pkt[:4] != SRD_MAGIC:
            return conf.raw_layer if _pkt else cls
        return _SRD_BY_TYPE.get(_pkt[5], PDSR)


class PDSRReq(PDSR):
    name = "PDSR REQ"
    srd_type = SrdType.REQ
    fields_desc = _srd_header(SrdType.REQ)


class PDSRHello(PDSR):
    name = "PDSR HELLO"
    srd_type = SrdType.HELLO
    fields_desc = _srd_header(SrdType.HELLO) + [StrFixedLenField("nonce", b"\0" * 32, 32)]


class PDSRBegin(PDSR):
    name = "PDSR BEGIN"
    srd_type = SrdType.BEGIN
    fields_desc = _srd_header(SrdType.BEGIN) + [
        StrFixedLenField("nonce", b"\0" * 32, 32),
        StrFixedLenField("mac", b"\0" * 32, 32),
        IntField("packet_bytes", 8927),
        ShortField("num_layers", 0),
        IntField("tokens", 0),
        LongField("total_bytes", 0),
        *_request_id(),
        FieldLenField("model_len", None, length_of="model", fmt="B"),
        StrLenField("model", b"", length_from=lambda p: p.model_len),
        FieldLenField("layout_len", None, length_of="layout", fmt="B"),
        StrLenField("layout", b"layer-major", length_from=lambda p: p.layout_len),
    ] + _tag()


class PDSRGrant(PDSR):
    name = "PDSR GRANT"
    srd_type = SrdType.GRANT
    fields_desc = _srd_header(SrdType.GRANT) + [StrFixedLenField("mac", b"\0" * 32, 32),
                                                 LongField("rate_bps", 0)] + _tag()


class PDSRData(PDSR):
    name = "PDSR DATA"
    srd_type = SrdType.DATA
    fields_desc = _srd_header(SrdType.DATA) + [
        IntField("psn", 0),
        IntField("tsval", 0),
        ShortField("layer", 0),
        LongField("offset", 0),
        XIntField("crc32", 0),
    ] + _tag() + [StrField("data", b"")]


class PDSRSack(PDSR):
    name = "PDSR SACK"
    srd_type = SrdType.SACK
    fields_desc = _srd_header(SrdType.SACK) + [
        IntField("cum", 0),
        IntField("tsecr", 0),
        FieldLenField("bitmap_len", None, length_of="bitmap", fmt="H"),
        StrLenField("bitmap", b"", length_from=lambda p: p.bitmap_len),
    ] + _tag()


class PDSREnd(PDSR):
    name = "PDSR END"
    srd_type = SrdType.END
    fields_desc = _srd_header(SrdType.END) + [LongField("total_bytes", 0), IntField("packets", 0),
                                               XIntField("checksum", 0)] + _tag()


class PDSRAck(PDSR):
    name = "PDSR ACK"
    srd_type = SrdType.ACK
    fields_desc = _srd_header(SrdType.ACK) + _ack_body() + _tag()


_SRD_BY_TYPE: dict[int, type[PDSR]] = {int(c.srd_type): c for c in
                                       (PDSRReq, PDSRHello, PDSRBegin, PDSRGrant, PDSRData, PDSRSack, PDSREnd,
                                        PDSRAck)}


def parse_datagram(raw: bytes) -> PDSR | None:
    """One SRD datagram (possibly cut by the snaplen: parses as far as the bytes go); None when
    ``raw`` does not start with the SRD magic and a known type."""
    if len(raw) < 16 or raw[:4] != SRD_MAGIC or raw[5] not in _SRD_BY_TYPE:
        return None
    try:
        return _SRD_BY_TYPE[raw[5]](raw)
    except (struct.error, ValueError, IndexError):
        return None


bind_layers(UDP, PDSR, dport=DEFAULT_KV_PORT)
bind_layers(UDP, PDSR, sport=DEFAULT_KV_PORT)
