"""The agent's log format: one complete line per change, also for a batch logged as one record."""

from __future__ import annotations

import json
import logging

from overlay.agent import KeyValueFormatter


def _record(msg: str, created: float, level: int = logging.INFO) -> logging.LogRecord:
    record = logging.LogRecord("overlay.kernel", level, __file__, 1, msg, None, None)
    record.created, record.msecs = created, (created % 1) * 1000
    return record


def test_every_line_of_a_multi_line_record_gets_the_full_prefix() -> None:
    batch = (
        "event=route_set dst=10.0.0.0/26 nhid=7\nevent=neighbour_set dev=vxlan.calico ip=10.0.0.1"
    )
    text = KeyValueFormatter().format(_record(batch, 1_700_000_000.25))
    prefix = "ts=2023-11-14T22:13:20.250Z level=info logger=overlay.kernel "
    assert text.split("\n") == [
        prefix + "event=route_set dst=10.0.0.0/26 nhid=7",
        prefix + "event=neighbour_set dev=vxlan.calico ip=10.0.0.1",
    ]


def test_json_gives_one_object_per_line_as_for_a_single_line_record() -> None:
    fmt = KeyValueFormatter(as_json=True)
    lines = fmt.format(_record('event=a x=1\nevent=b y="q"', 1_700_000_000.5)).split("\n")
    assert [json.loads(line) for line in lines] == [
        {"ts": "2023-11-14T22:13:20.500Z", "level": "info", "logger": "overlay.kernel", "msg": m}
        for m in ("event=a x=1", 'event=b y="q"')
    ]
    single = fmt.format(_record("event=a x=1", 1_700_000_000.5))
    assert single == lines[0]


def test_timestamp_follows_each_record_across_seconds() -> None:
    fmt = KeyValueFormatter()
    stamps = [
        fmt.format(_record("event=x", t)).split()[0]
        for t in (1_700_000_000.999, 1_700_000_001.0, 1_700_000_000.5)
    ]
    assert stamps == [
        "ts=2023-11-14T22:13:20.999Z",
        "ts=2023-11-14T22:13:21.000Z",
        "ts=2023-11-14T22:13:20.500Z",
    ]
