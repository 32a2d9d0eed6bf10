"""The shipped recipes (this folder is installed as the package `llmshearing.recipes`; see pyproject.toml)."""
