"""Reading runs, sweeping configurations, reporting and fitting scaling laws.

Each tool is a module with a CLI (`python -m titan_linear.analysis.<name>`); heavy
dependencies (matplotlib, scipy) are imported inside the functions that need them.
"""
