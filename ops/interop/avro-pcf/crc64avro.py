#!/usr/bin/env python3
"""CRC-64-AVRO (Rabin) fingerprint, as defined in the Avro specification, for cross-checking.

Usage:
  python3 crc64avro.py '"int"'          # fingerprint of each argument
  python3 crc64avro.py < pcf-lines.txt   # fingerprint of each non-empty stdin line

Each input is taken as text, already in Parsing Canonical Form (this script does not normalize),
encoded as UTF-8. Output per input: <16 lowercase hex digits, 8 bytes little-endian>\t<input>,
the same format as AvroPcf (dev.ferry.ops.AvroPcf), so the two can be diffed.
Standard library only.
"""
import sys

EMPTY = 0xC15D213AA4D7A795
MASK64 = (1 << 64) - 1


def _table():
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp & MASK64)
    return table


FP_TABLE = _table()


def fingerprint64(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ FP_TABLE[(fp ^ b) & 0xFF]
    return fp


def le_hex(fp: int) -> str:
    return fp.to_bytes(8, "little").hex()


def main(argv):
    inputs = argv[1:] if len(argv) > 1 else [l.rstrip("\r\n") for l in sys.stdin]
    for text in inputs:
        if text.strip():
            print(f"{le_hex(fingerprint64(text.encode('utf-8')))}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
