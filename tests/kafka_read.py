#!/usr/bin/env python3
"""Reads Kafka topics with confluent-kafka (librdkafka), a client independent of the ingest.

Every partition of each topic is read from the earliest offset (tansu's ListOffsets LATEST is
unreliable, so we never ask for the end): until --expect records arrived and --linger more
seconds passed without a new one (so duplicates beyond the expected count show up), or until
--timeout. Prints one JSON object per record on stdout.
"""
import argparse
import base64
import json
import sys
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--brokers", required=True)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--linger", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("topics", nargs="+")
    a = p.parse_args()
    consumer = Consumer({
        "bootstrap.servers": a.brokers,
        "group.id": "kafka-read-py",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    })
    deadline = time.monotonic() + a.timeout
    # Topics appear when their first record is produced; wait for each.
    partitions = []
    for topic in a.topics:
        while True:
            md = consumer.list_topics(topic, timeout=5)
            t = md.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                partitions += [TopicPartition(topic, p, -2) for p in t.partitions]  # -2: earliest
                break
            if time.monotonic() > deadline:
                sys.exit(f"topic {topic} never appeared")
            time.sleep(0.2)
    consumer.assign(partitions)
    count = 0
    last = time.monotonic()
    while time.monotonic() < deadline:
        m = consumer.poll(0.2)
        now = time.monotonic()
        if m is None:
            if count >= a.expect and now - last >= a.linger:
                break
            continue
        if m.error():
            raise KafkaException(m.error())
        count += 1
        last = now
        print(json.dumps({
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
            "key": (m.key() or b"").decode(),
            "value_b64": base64.b64encode(m.value() or b"").decode(),
            "timestamp_ms": m.timestamp()[1],
            "headers": {k: (v or b"").decode() for k, v in (m.headers() or [])},
        }))
    consumer.close()


if __name__ == "__main__":
    main()
