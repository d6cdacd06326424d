"""``python -m examples.webhook_receiver``: run the example receiver (see ``app.py``)."""

import sys

from examples.webhook_receiver.app import main

sys.exit(main())
