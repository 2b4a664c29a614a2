"""Triton kernels of the hot ops (see dsv4.ops for which runs where). Importing a module here
imports triton; dsv4.ops imports them only when an op is set to "triton"."""
