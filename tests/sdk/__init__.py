"""SDK tests: the producer and consumer SDKs driven against a real broker process."""
