"""Serving: the engine, the OpenAI-compatible API, the router and the Ray Serve application."""
