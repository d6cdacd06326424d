"""One module per benchmarked system, each with a harness-side ``Server`` and a
worker-side ``Client`` (see ``benchmarks.systems.base``): ``halfmq``, ``rabbitmq``,
``nats_js`` (NATS JetStream), ``redis_streams``."""
