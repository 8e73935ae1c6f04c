"""Sphinx configuration for gaspar's documentation (``sphinx-build -W docs <out>``)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.dirname(HERE))  # gaspar itself, from this checkout

import gaspar  # noqa: E402

project = "gaspar"
author = "gaspar developers"
copyright = "2012-2026, gaspar developers"
release = version = gaspar.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "gaspar_settings"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
exclude_patterns = ["_build", "Dockerfile", "*.service"]
html_theme = "alabaster"
html_title = f"gaspar {release}"
nitpicky = False
