"""The eventlet front end: the only package that imports eventlet."""
