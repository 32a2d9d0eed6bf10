"""lm-eval tasks defined on local files, shipped with llmshearing (`llmshearing eval --tasks llmshearing_mc`)."""
