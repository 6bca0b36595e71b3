#!/usr/bin/env python3
"""Writes the committed fuzz corpus of DHCP packets, core/tests/corpus/dhcp/*.bin: malformed,
hostile and odd requests that `core/tests/dhcp_corpus.rs` feeds to the packet decoder and
the reply decision (each file as is, then mutated by a property test).

The name says what the decoder must make of a file:
  malformed-*  rejected before any decision (too short, no cookie, impossible option length)
  silent-*     decoded, and no reply is sent
  any-*        decoded or rejected, either way the invariants of the test hold
Re-run after editing (the output is deterministic): scripts/dhcp-corpus.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "core", "tests", "corpus", "dhcp")
SEEDS = os.path.join(HERE, "..", "core", "src", "dhcp", "testdata")

COOKIE = bytes([99, 130, 83, 99])
KNOWN = bytes.fromhex("02005e100086")  # holds 192.168.48.86 in the test's table
STRANGER = bytes.fromhex("02005e100099")  # holds nothing
SERVER = bytes([192, 168, 48, 77])


def header(op=1, htype=1, hlen=6, mac=KNOWN, xid=0x1234ABCD, flags=0, ciaddr=b"\0" * 4,
           yiaddr=b"\0" * 4, siaddr=b"\0" * 4, giaddr=b"\0" * 4, sname=b"", file=b""):
    chaddr = mac.ljust(16, b"\0")[:16]
    return (struct.pack("!BBBBIHH", op, htype, hlen, 0, xid, 0, flags) + ciaddr + yiaddr
            + siaddr + giaddr + chaddr + sname.ljust(64, b"\0")[:64] + file.ljust(128, b"\0")[:128])


def opt(code, data):
    return bytes([code, len(data)]) + data


def packet(msg_type, *options, end=True, **hdr):
    body = header(**hdr) + COOKIE
    if msg_type is not None:
        body += opt(53, bytes([msg_type]))
    for o in options:
        body += o
    if end:
        body += b"\xff"
    return body


DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8

corpus = {
    # Rejected before decoding.
    "malformed-empty": b"",
    "malformed-one-byte": b"\x01",
    "malformed-header-minus-one": packet(DISCOVER)[:239],
    "malformed-no-cookie": header() + b"\0\0\0\0" + opt(53, b"\x01") + b"\xff",
    "malformed-cookie-reversed": header() + COOKIE[::-1] + opt(53, b"\x01") + b"\xff",
    "malformed-option-80-length-1": packet(DISCOVER, opt(80, b"\0")),
    "malformed-option-81-length-2": packet(DISCOVER, opt(81, b"\0\0")),
    "malformed-option-81-split-too-short": packet(DISCOVER, opt(81, b"\0"), opt(81, b"\0")),
    "malformed-option-94-length-2": packet(DISCOVER, opt(94, b"\0\0")),
    "malformed-option-151-length-0": packet(DISCOVER, opt(151, b"")),
    "malformed-option-153-length-3": packet(DISCOVER, opt(153, b"\0\0\0")),
    # Decoded, never answered.
    "silent-bootreply": packet(OFFER, op=2),
    "silent-op-zero": packet(DISCOVER, op=0),
    "silent-op-255": packet(DISCOVER, op=255),
    "silent-htype-token-ring": packet(DISCOVER, htype=6),
    "silent-hlen-16": packet(DISCOVER, hlen=16),
    "silent-hlen-255": packet(DISCOVER, hlen=255),
    "silent-hlen-0": packet(DISCOVER, hlen=0),
    "silent-no-message-type": packet(None, opt(55, bytes([1, 3, 6]))),
    "silent-discover-stranger": packet(DISCOVER, mac=STRANGER),
    "silent-request-other-server": packet(REQUEST, opt(54, bytes([10, 0, 0, 1])),
                                          opt(50, bytes([192, 168, 48, 86]))),
    "silent-request-stranger": packet(REQUEST, opt(50, bytes([192, 168, 48, 86])), mac=STRANGER),
    "silent-server-messages": packet(ACK),
    "silent-nak-from-a-client": packet(NAK),
    "silent-release-other-server": packet(RELEASE, opt(54, bytes([10, 0, 0, 1]))),
    # Anything, as long as the invariants hold.
    "any-message-type-0": packet(0),
    "any-message-type-255": packet(255),
    "any-message-type-empty": header() + COOKIE + bytes([53, 0, 255]),
    "any-message-type-long": header() + COOKIE + bytes([53, 4, 1, 3, 5, 7, 255]),
    "any-no-end": packet(DISCOVER, end=False),
    "any-options-past-the-end": header() + COOKIE + bytes([53, 1, 1, 55, 200, 1, 3]),
    "any-pad-only": header() + COOKIE + b"\0" * 1000,
    "any-requested-ip-3-bytes": packet(REQUEST, opt(50, bytes([192, 168, 48]))),
    "any-requested-ip-broadcast": packet(REQUEST, opt(50, b"\xff" * 4)),
    "any-server-id-empty": packet(REQUEST, opt(54, b""), opt(50, bytes([192, 168, 48, 86]))),
    "any-server-id-ours-short": packet(REQUEST, opt(54, SERVER[:3])),
    "any-client-id-empty": packet(DISCOVER, opt(61, b"")),
    "any-client-id-255": packet(DISCOVER, opt(61, b"\x01" * 255)),
    "any-parameter-list-255": packet(DISCOVER, opt(55, bytes(range(255)))),
    "any-parameter-list-repeats": packet(DISCOVER, opt(55, bytes([6] * 200))),
    "any-max-size-zero": packet(DISCOVER, opt(57, b"\0\0")),
    "any-max-size-one-byte": packet(DISCOVER, opt(57, b"\x02")),
    "any-max-size-huge": packet(DISCOVER, opt(57, b"\xff\xff"), opt(55, bytes(range(1, 120)))),
    "any-lease-time-short": packet(REQUEST, opt(51, b"\0\0")),
    "any-overload-file-sname": packet(DISCOVER, opt(52, b"\x03"),
                                      sname=b"\x35\x01\x03\xff", file=b"\x37\xf0\x01"),
    "any-overload-bad-length-in-file": packet(DISCOVER, opt(52, b"\x01"), file=bytes([80, 1, 0, 255])),
    "any-overload-bad-length-in-sname": packet(DISCOVER, opt(52, b"\x02"), sname=bytes([81, 1, 0, 255])),
    "any-overload-bad-value": packet(DISCOVER, opt(52, b"\x09")),
    "any-overload-empty": packet(DISCOVER, opt(52, b"")),
    "any-relay-info-lying": packet(DISCOVER, opt(82, bytes([1, 200, 0, 2, 3, 1, 2]))),
    "any-relay-info-empty": packet(DISCOVER, opt(82, b"")),
    "any-domain-search-loop": packet(INFORM, opt(119, bytes([0xC0, 0x00]))),
    "any-vendor-class-binary": packet(DISCOVER, opt(60, bytes(range(256))[:255])),
    "any-hostname-nul": packet(DISCOVER, opt(12, b"a\0b\xff")),
    "any-giaddr-broadcast": packet(DISCOVER, giaddr=b"\xff" * 4, flags=0x8000),
    "any-ciaddr-broadcast-request": packet(REQUEST, ciaddr=b"\xff" * 4),
    "any-inform-from-nowhere": packet(INFORM),
    "any-inform-stranger": packet(INFORM, ciaddr=bytes([192, 168, 48, 99]), mac=STRANGER),
    "any-decline-without-address": packet(DECLINE, opt(54, SERVER)),
    "any-decline-not-ours": packet(DECLINE, opt(54, SERVER), opt(50, bytes([192, 168, 48, 88]))),
    "any-release-wrong-address": packet(RELEASE, opt(54, SERVER), ciaddr=bytes([192, 168, 48, 88])),
    "any-request-all-zero-address": packet(REQUEST, opt(54, SERVER), opt(50, b"\0" * 4)),
    "any-every-message-type": header() + COOKIE + b"".join(opt(53, bytes([t])) for t in range(1, 19)) + b"\xff",
    "any-long-option-split": packet(DISCOVER, opt(55, bytes(range(1, 256))), opt(55, bytes(range(1, 256)))),
    "any-jumbo": packet(DISCOVER, *[opt(224 + (i % 30), bytes([i % 256]) * 255) for i in range(255)]),
}

# The captured requests of real clients, cut at every interesting length.
for name in sorted(os.listdir(SEEDS)):
    if not name.endswith(".bin"):
        continue
    with open(os.path.join(SEEDS, name), "rb") as f:
        seed = f.read()
    stem = name[:-4]
    for cut in (0, 100, 235, 236, 239):
        corpus[f"malformed-{stem}-cut-{cut}"] = seed[:cut]
    for cut in (240, 241, 243, 250, len(seed) - 1):
        corpus[f"any-{stem}-cut-{cut}"] = seed[:cut]
    corpus[f"any-{stem}-doubled"] = seed + seed

os.makedirs(OUT, exist_ok=True)
for old in os.listdir(OUT):
    if old.endswith(".bin"):
        os.remove(os.path.join(OUT, old))
for name, data in sorted(corpus.items()):
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(data)
print(f"{len(corpus)} packets in {os.path.relpath(OUT)}")
