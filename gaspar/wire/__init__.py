"""The wire: framing of requests and replies, sans-IO."""
