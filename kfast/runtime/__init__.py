"""The runtime: one module per thread and the state they share.

* ``pipeline``: ``Pipeline`` (validation, build, start/stop/join/close, run);
* ``poll`` (poll thread: consumer, ring push, pause/resume, rebalances,
  commits), ``decode`` (decoder thread), ``deliver`` (worker thread);
* ``channels`` (what the threads tell each other), ``stats`` (each loop's
  counters, the keys of ``metrics()``), ``health`` (``Pipeline.health()``);
* ``source`` (the confluent-kafka consumer), ``kafka`` (kfast's compiled
  consumer), ``ring`` (the arena), ``offsets``, ``memory`` (the memory plan),
  ``policies``, ``kafka_log`` (librdkafka's log lines through ``logging``).
"""
