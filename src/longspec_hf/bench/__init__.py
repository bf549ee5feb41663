"""`longspec bench`: speculative decoders against plain `generate()` on the same prompts, in one run."""

from .methods import (
    BASELINE,
    Method,
    MethodOutput,
    autoregressive,
    compiled_static,
    default_methods,
    early_exit,
    longspec,
    prompt_lookup,
    self_draft,
    specpv_settings,
    speculative,
)
from .report import markdown_table, plot, write_outputs
from .runner import SCHEMA, BenchSettings, run_bench, summarize
from .workloads import LONGBENCH_TEMPLATES, Workload, offline_workloads, parse_workload

__all__ = [
    "BASELINE", "LONGBENCH_TEMPLATES", "SCHEMA", "BenchSettings", "Method", "MethodOutput", "Workload",
    "autoregressive", "compiled_static", "default_methods", "early_exit", "longspec", "markdown_table",
    "offline_workloads", "parse_workload", "plot", "prompt_lookup", "run_bench", "self_draft", "specpv_settings",
    "speculative", "summarize", "write_outputs",
]
