"""Recipe 3: malformed input never crashes the flow and is never lost.

Hypothesis draws bad messages (see :mod:`tests.chaos.fuzz`). The step is fuzzed
directly with many examples; then one derandomized corpus, with the 10 MB message and
duplicates of good ones, goes through the real flow on a real broker.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import msgspec
import pytest
import yaml
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.workload import WorkloadConfig, sensor_ranges, twin_model
from connectors.kafka import TopicSpec, client_config, ensure_topics
from schemas.transport import InputMessage
from tests.chaos.fuzz import bad_messages, ten_megabytes, wall_ms
from tests.chaos.harness import PARTITIONS, FlowRun, Workload
from twinflow.detection import DetectorConfig
from twinflow.settings import load_settings
from twinflow.twin import PartitionTwins
from twinflow.twin_model import load_twin_model

pytestmark = [pytest.mark.chaos]
CONFIG = WorkloadConfig(entities=20, sensors=4, readings=20 * 4 * 60)
ENTITIES = CONFIG.entity_ids()
RANGES = sensor_ranges(CONFIG)
NOW_MS = wall_ms()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "model.yaml"
    path.write_text(yaml.safe_dump(twin_model(CONFIG)))
    return path


def _good(count: int, start_ms: int) -> list[bytes]:
    """Valid single-form readings, one per (entity, sensor, second)."""
    names = sorted(RANGES)
    return [
        msgspec.json.encode(
            {
                "entity_id": ENTITIES[i % len(ENTITIES)],
                "sensor": names[(i // len(ENTITIES)) % len(names)],
                "ts": start_ms + (i // (len(ENTITIES) * len(names))) * 1000,
                "value": sum(RANGES[names[(i // len(ENTITIES)) % len(names)]]) / 2,
            }
        )
        for i in range(count)
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(bad_messages(ENTITIES, RANGES, NOW_MS), min_size=1, max_size=20))
def test_every_bad_message_is_one_dead_letter_and_good_ones_stay(
    model_path: Path, bad: list[bytes]
) -> None:
    twins = PartitionTwins(load_twin_model(model_path), load_settings().flow, DetectorConfig())
    # Bad ones alone, then mixed with good ones.
    alone = twins.step([InputMessage("fuzz", 0, i, NOW_MS, p) for i, p in enumerate(bad)], 1_000)
    assert len(alone.dead_letters) == len(bad) and not len(alone.readings)
    good = _good(10, NOW_MS - 60_000)
    payloads = [*bad, *good]
    messages = [InputMessage("fuzz", 0, i, NOW_MS, p) for i, p in enumerate(payloads)]
    out = twins.step(messages, 1_000)
    offsets = sorted(letter.source.offset for letter in out.dead_letters)
    assert offsets == list(range(len(bad))), [p[:80] for p in bad]
    assert all(letter.reason for letter in out.dead_letters)
    assert len(out.readings) == len(good)


def test_a_ten_megabyte_message_is_one_small_dead_letter(model_path: Path) -> None:
    twins = PartitionTwins(load_twin_model(model_path), load_settings().flow, DetectorConfig())
    payload = ten_megabytes(ENTITIES[0], sorted(RANGES)[0], NOW_MS)
    (letter,) = twins.step([InputMessage("fuzz", 0, 0, NOW_MS, payload)], 1_000).dead_letters
    assert letter.payload_size == len(payload) and letter.payload_b64 is None
    assert len(letter.payload_excerpt) <= 512


@pytest.mark.integration
def test_a_fuzzed_corpus_through_the_real_flow_is_dead_lettered_exactly(
    workload: Workload, chaos_dir: Path, chaos_table: list[dict[str, object]]
) -> None:
    """One derandomized corpus: bad messages, the 10 MB one, good ones sent twice."""
    corpus: list[bytes] = []

    # Ten derandomized lists of 40: one list of 400 is past Hypothesis' entropy budget.
    @settings(
        max_examples=10,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(bad_messages(ENTITIES, RANGES, wall_ms()), min_size=40, max_size=40))
    def draw(bad: list[bytes]) -> None:
        corpus.extend(bad)

    draw()
    corpus.append(ten_megabytes(ENTITIES[0], sorted(RANGES)[0], wall_ms()))
    good = _good(2000, wall_ms() - 3_600_000)
    topic = f"chaos.fuzz.{uuid.uuid4().hex[:8]}"
    settings_ = workload.settings
    ensure_topics(
        settings_.kafka, [TopicSpec(topic, PARTITIONS, {"max.message.bytes": "12000000"})]
    )
    producer = Producer(client_config(settings_.kafka, **{"message.max.bytes": 12_000_000}))
    failures: list[object] = []

    def report(error: object, _message: object) -> None:
        if error is not None:
            failures.append(error)

    # The same empty message at offset 0 of every partition, at the same time: dead
    # letters that differ only in their partition, all of which must be kept.
    stamp = wall_ms()
    for partition in range(PARTITIONS):
        producer.produce(topic, b"", partition=partition, timestamp=stamp, on_delivery=report)
    # Keyed by entity, like a bridge does; good ones twice (the second copy is a
    # duplicate, kept once), bad ones between.
    keyed = [(ENTITIES[i % len(ENTITIES)], payload) for i, payload in enumerate(good)]
    bad = [(None, payload) for payload in corpus]
    for key, payload in [*keyed[:1000], *bad, *keyed, *keyed[1000:]]:
        producer.produce(topic, payload, key=key, on_delivery=report)
        producer.poll(0)
    corpus.extend([b""] * PARTITIONS)
    assert producer.flush(60) == 0 and not failures, failures[:3]

    model = chaos_dir / "fuzz-model.yaml"
    model.write_text(yaml.safe_dump(twin_model(CONFIG)))
    fuzz = Workload(settings_, topic, model, 0, workload.expected)
    run = FlowRun(fuzz, chaos_dir, "fuzz")
    readings, letters = run.tables.readings.name, run.tables.deadletters.name
    try:
        run.start()
        deadline = time.monotonic() + 180
        while True:
            assert run.running(), f"the flow crashed on the corpus:\n{run.log_tail()}"
            counts = run.counts()
            if counts["readings"] >= len(good) and counts["deadletters"] >= len(corpus):
                break
            assert time.monotonic() < deadline, f"incomplete: {counts}\n{run.log_tail()}"
            time.sleep(0.5)
        time.sleep(2)  # anything extra (a duplicate) would show up by now
        assert run.running(), f"the flow crashed on the corpus:\n{run.log_tail()}"
        counts = run.counts()
        distinct = run.sql.exec(
            f'SELECT count() FROM (SELECT DISTINCT ts, entity, sensor FROM "{readings}")'
        ).rows[0][0]
        reasons = dict(
            run.sql.exec(f'SELECT reason, count() FROM "{letters}" ORDER BY 2 DESC').rows
        )
        chaos_table.append(
            {
                "fault": f"3. fuzz: {len(corpus)} bad messages (10 MB one included) + duplicates",
                "runs": run.starts,
                "lost": len(good) - distinct + len(corpus) - counts["deadletters"],
                "duplicates": counts["readings"] - distinct,
                "mismatches": 0,
                "notes": ", ".join(f"{reason} {n}" for reason, n in reasons.items()),
            }
        )
    finally:
        run.stop()
    assert counts["readings"] == distinct == len(good)
    assert counts["deadletters"] == len(corpus), reasons
    run.drop()
