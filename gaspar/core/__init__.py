"""Pure rules, with an injected clock and no I/O: dispatch, the queue, overload, admission,
the pool book, the agents' sessions."""
