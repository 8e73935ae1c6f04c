"""Every attack of the hardening issue, each against a real daemon.

While an attack runs, an ordinary client (``attackkit.Probe``) is answered within 1 s and
the front end's memory stays within its budget; once it ends, the front end's open
descriptors and resident memory come back to their baseline. Each section names the
attack and the rule that answers it.
"""

from __future__ import annotations
