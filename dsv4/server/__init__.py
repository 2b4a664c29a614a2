"""OpenAI-compatible serving layer for DeepSeek-V4: request mapping, output parsing, HTTP."""
