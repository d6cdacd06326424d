"""``python -m broker [OPTIONS]`` is ``halfmq broker [OPTIONS]``."""

import sys

from broker.cli import broker_main

if __name__ == "__main__":
    sys.exit(broker_main(sys.argv[1:]))
