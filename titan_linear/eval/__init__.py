"""Evaluation tools: what a ratio of linear layers costs in quality, from the command line.

Each tool is `python -m titan_linear.eval.<name> --config TOML --checkpoint DIR ...` (or
`--random-init`), builds the model as training does (titan_linear/cli.py), runs on CPU or
GPU, writes a JSON result (and a PNG where a picture says more), and stops on bad input
with one line naming the flag and the value, exit status 2.
"""
