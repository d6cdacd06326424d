"""halfmq's own framed TCP protocol (docs/protocol.md): one ``ClientConnection`` per client."""
