"""Peer implementations that ``twinflow bench`` measures twinflow against.

Each peer is a stand-alone program, written the way a user of that framework would
write it, that reads the benchmark's raw topic and writes rows to QuestDB. The harness
runs it as a subprocess with one argument, ``--spec PATH``: a JSON file of this shape::

    {
      "bootstrap": "127.0.0.1:9092",        # Kafka
      "topic": "bench.raw.ab12cd34",        # raw readings, key = entity id
      "deadletter_topic": "bench.deadletter.ab12cd34",
      "questdb_http": "127.0.0.1:9000",     # ILP/HTTP and /exec
      "table_prefix": "bench_ab12cd34_peer1_",
      "window_s": 10, "lateness_s": 5,      # tumbling, aligned to the epoch
      "sensors": {"flow": [0.0, 200.0], ...},   # valid range per sensor
      "seed": 1,
      "workers": 1                          # Bytewax peers: worker threads
    }

Messages on the topic follow twinflow's raw contract (:mod:`schemas.raw`), with
``ts`` in epoch milliseconds: single ``{"entity_id", "sensor", "ts", "value"}`` or
batched ``{"entity_id", "ts", "values": {sensor: value}}``. Some are malformed JSON,
some readings are out of range, and some are late (behind their entity's newest
reading by more than the lateness).

Every peer creates, before consuming, WAL tables with the same design as twinflow's
(SYMBOL entity/sensor, ``DEDUP UPSERT KEYS``), and writes:

- ``{prefix}readings``: one row per valid reading (late ones included), with at least
  ``ts, entity, sensor, value``;
- ``{prefix}sensor_windows``: one row per (entity, sensor, window) with at least
  ``ts`` (window start)``, entity, sensor, count, mean, min, max, std``.

It prints ``FIRST_CONSUME <epoch seconds>`` on stdout when it has its first message,
and runs until SIGINT or SIGTERM.
"""
