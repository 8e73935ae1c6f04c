"""gaspar's benchmark suite: handlers, baseline servers, a C load generator and the runner."""
