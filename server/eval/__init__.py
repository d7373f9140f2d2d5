"""The evaluation harness: datasets, quality metrics, the runner and its report."""
