"""The broker's rules without I/O: lifecycles, the transaction table, the delivery core and
the log record formats. Engines drive them with the current time and act on what they
return; tests drive them with a made-up clock."""
