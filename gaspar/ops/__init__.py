"""What operators use: logs, telemetry, metrics, statsd, top, the control client, keys."""
