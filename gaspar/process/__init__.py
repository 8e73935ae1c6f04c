"""Processes of their own: the fork server, the workers, the agent; blocking, no eventlet."""
