"""Front ends: protocols translated into engine calls (``native``: halfmq's TCP protocol;
``http``: the admin API and console)."""
