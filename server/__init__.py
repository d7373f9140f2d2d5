"""The HTTP sidecar: an OpenAI-compatible FastAPI app over one Engine, its model worker, auth,
settings, metrics and a small client."""
