"""CLI subcommands, one module each; every module has `register(subparsers)` that adds its parser
and sets `func` to the callable that runs it."""

COMMANDS = ("demo", "eval", "bench", "ingest", "retrieve", "serve", "query", "cache", "config", "calibrate")
