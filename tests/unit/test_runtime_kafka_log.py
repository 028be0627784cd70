"""kfast.runtime.kafka_log: librdkafka lines through logging, rate-limited."""

from __future__ import annotations

import logging

from kfast.runtime.kafka_log import KAFKA_LOGGER, KafkaLogAdapter, Throttle, kafka_logger_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throttle_one_line_per_interval_with_the_suppressed_count():
    clock = Clock()
    t = Throttle(10.0, clock=clock)
    assert t.allow("k") == 0
    assert t.allow("k") is None and t.allow("k") is None
    assert t.allow("other") == 0
    clock.now = 10.0
    assert t.allow("k") == 2
    assert t.allow("k") is None
    assert t.reset("k") == 1  # an outage ended: what was not logged since the last line
    assert t.allow("k") == 0


def test_throttle_keeps_a_bounded_number_of_keys():
    t = Throttle(10.0, max_keys=4)
    for i in range(100):
        t.allow(i)
    assert len(t._last) <= 4


def test_adapter_logs_librdkafka_lines_to_kfast_kafka(caplog):
    clock = Clock()
    adapter = KafkaLogAdapter("consumer", Throttle(10.0, clock=clock))
    caplog.set_level(logging.DEBUG, logger=KAFKA_LOGGER)
    # how confluent-kafka calls it
    for _ in range(50):
        adapter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect failed")
    adapter.log(logging.INFO, "%s [%s] %s", "CGRPOP", "rdkafka#consumer-1", "joined")
    clock.now = 11.0
    adapter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect failed")
    recs = [r for r in caplog.records if r.name == KAFKA_LOGGER]
    msgs = [(r.levelno, r.getMessage()) for r in recs]
    assert msgs == [
        (logging.ERROR, "[consumer] FAIL [rdkafka#consumer-1] Connect failed"),
        (logging.INFO, "[consumer] CGRPOP [rdkafka#consumer-1] joined"),
        (
            logging.ERROR,
            "[consumer] FAIL [rdkafka#consumer-1] Connect failed (49 similar lines suppressed)",
        ),
    ]


def test_syslog_levels_are_mapped(caplog):
    adapter = KafkaLogAdapter("dlq-producer")
    caplog.set_level(logging.DEBUG, logger=KAFKA_LOGGER)
    adapter.log(4, "%s [%s] %s", "REQTMOUT", "rdkafka#producer-1", "timed out")
    assert caplog.records[-1].levelno == logging.WARNING


def test_kafka_logger_config_keeps_a_user_logger():
    conf = kafka_logger_config({"bootstrap.servers": "x"}, "consumer")
    assert isinstance(conf["logger"], KafkaLogAdapter)
    mine = logging.getLogger("mine")
    assert kafka_logger_config({"logger": mine}, "consumer")["logger"] is mine
