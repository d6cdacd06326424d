"""An example webhook receiver: verifies halfmq's signatures and applies each message once."""
