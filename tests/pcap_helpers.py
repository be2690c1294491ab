"""Crafted TCP conversations for pcap tests (analyzer, dissectors): exact segments, known times."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.packet import Packet

Address = tuple[str, int]


class Segments:
    """The packets of a crafted capture, one TCP segment every millisecond after ``t0``."""

    def __init__(self, t0: float):
        self.t = t0
        self.packets: list[Packet] = []

    def add(self, src: Address, dst: Address, seq: int, ack: int, flags: str, data: bytes = b"") -> None:
        self.t += 0.001
        p = IP(src=src[0], dst=dst[0]) / TCP(sport=src[1], dport=dst[1], seq=seq, ack=ack, flags=flags) / data
        p.time = self.t
        self.packets.append(p)
