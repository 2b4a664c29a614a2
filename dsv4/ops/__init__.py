"""Hot ops of the model behind one registry (torch reference or Triton kernel); see registry."""

from dsv4.ops.registry import OPS, SPECS, configure, parse_spec, resolve

__all__ = ["OPS", "SPECS", "configure", "parse_spec", "resolve"]
