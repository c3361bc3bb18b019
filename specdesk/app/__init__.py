"""The agent console: settings, chat service, Gradio UI, CLI, OpenAI-compatible /v1 and /metrics."""
