"""The evaluation harness: datasets, quality metrics against a full prefill, the runner and reports."""
