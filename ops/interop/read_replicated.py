#!/usr/bin/env python3
"""Reads a table topic that Ferry replicated, with clients Ferry did not write, and prints the
table it describes: one JSON object per live key, in key order.

    read_replicated.py confluent     BOOTSTRAP TOPIC REGISTRY_URL
    read_replicated.py single-object BOOTSTRAP TOPIC SCHEMA_TOPIC

confluent:     confluent-kafka's AvroDeserializer with a SchemaRegistryClient (the Confluent wire
               format: magic 0, 4-byte schema id, Avro body).
single-object: fastavro; every schema published in SCHEMA_TOPIC is fingerprinted here
               (CRC-64-AVRO of its Parsing Canonical Form, computed by fastavro, not taken from the
               topic's keys), and each record is decoded with the schema whose fingerprint its
               header carries (C3 01, 8-byte fingerprint, Avro body).

Values become JSON as: timestamps in microseconds since the epoch (UTC), dates as ISO text, the
rest as they decode. The output is what `ferry apply` wrote to the destination table, if both
are right. Exits 2 with a message naming the record on anything it cannot decode.
"""

import datetime
import io
import json
import sys

from confluent_kafka import Consumer, TopicPartition

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def plain(v):
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        d = v - EPOCH
        return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if hasattr(v, "hex") and type(v).__name__ == "UUID":
        return str(v)
    return v


def records(bootstrap, topic):
    """(partition, offset, key, value) of every record up to the current end, in offset order
    per partition."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ferry-interop-reader",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    md = c.list_topics(topic, timeout=10)
    if topic not in md.topics or md.topics[topic].error is not None:
        sys.exit(f"topic {topic} not found in {bootstrap}")
    out = []
    for p in sorted(md.topics[topic].partitions):
        low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high <= low:
            continue
        c.assign([TopicPartition(topic, p, low)])
        while True:
            m = c.poll(10)
            if m is None:
                sys.exit(f"{topic}[{p}]: no record within 10 s before offset {high}")
            if m.error():
                if m.error().code() == -191:  # _PARTITION_EOF
                    break
                sys.exit(f"{topic}[{p}]: {m.error()}")
            out.append((p, m.offset(), m.key(), m.value()))
            if m.offset() + 1 >= high:
                break
    c.close()
    return out


def confluent_decoders(registry_url, topic):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient({"url": registry_url})
    key_de = AvroDeserializer(client)
    value_de = AvroDeserializer(client)
    kctx = SerializationContext(topic, MessageField.KEY)
    vctx = SerializationContext(topic, MessageField.VALUE)
    return (lambda b: key_de(b, kctx)), (lambda b: value_de(b, vctx))


def single_object_decoders(bootstrap, schema_topic):
    import fastavro
    from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

    by_fp = {}
    for _, _, _, value in records(bootstrap, schema_topic):
        if value is None:
            continue
        parsed = parse_schema(json.loads(value))
        fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
        # fastavro's hex is the fingerprint's bytes least significant first, as the header has it.
        by_fp[bytes.fromhex(fp)] = parsed

    def decode(b):
        if b[:2] != b"\xc3\x01" or len(b) < 10:
            raise ValueError(f"not single-object encoded: {b[:10].hex()}")
        schema = by_fp.get(bytes(b[2:10]))
        if schema is None:
            raise ValueError(f"no published schema has fingerprint {b[2:10].hex()} "
                             f"(known: {sorted(k.hex() for k in by_fp)})")
        return fastavro.schemaless_reader(io.BytesIO(b[10:]), schema)

    return decode, decode


def main():
    if len(sys.argv) != 5 or sys.argv[1] not in ("confluent", "single-object"):
        sys.exit(__doc__)
    mode, bootstrap, topic, extra = sys.argv[1:]
    if mode == "confluent":
        key_of, value_of = confluent_decoders(extra, topic)
    else:
        key_of, value_of = single_object_decoders(bootstrap, extra)
    table = {}
    for p, off, key, value in records(bootstrap, topic):
        try:
            k = plain(key_of(key)) if key is not None else None
            v = plain(value_of(value))
        except Exception as e:  # noqa: BLE001 - report which record, then stop
            print(f"{topic}[{p}]@{off}: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
        ident = json.dumps(k, sort_keys=True)
        if v["op"] == "d":
            table.pop(ident, None)
        elif v["op"] == "t":
            table.clear()
        else:
            table[ident] = v["after"]
    for ident in sorted(table, key=lambda s: json.loads(s).get("id", 0) if s != "null" else 0):
        print(json.dumps(table[ident], sort_keys=True))


if __name__ == "__main__":
    main()
