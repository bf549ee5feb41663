"""`longspec cost`: what a speculative round costs on this device, and the tau a draft needs to beat plain decoding."""

from .report import markdown_table, plot, write_outputs
from .runner import DEFAULT_TREES, SCHEMA, CostSettings, kernel_rows, per_unit, run_cost

__all__ = ["DEFAULT_TREES", "SCHEMA", "CostSettings", "kernel_rows", "markdown_table", "per_unit", "plot", "run_cost",
           "write_outputs"]
