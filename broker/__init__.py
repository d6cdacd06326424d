"""The halfmq broker: ``Broker`` and ``BrokerConfig`` for embedding, ``halfmq broker`` to run it.

    from broker import Broker, BrokerConfig
    async with Broker(BrokerConfig(data_dir=path, port=0, http_port=0, tx_timeout=1.0)) as b:
        b.address    # "127.0.0.1:PORT"
        b.http_url   # "http://127.0.0.1:PORT"
"""

from broker.app import Broker
from broker.config import BrokerConfig, load_config

__all__ = ["Broker", "BrokerConfig", "load_config"]
