"""dsv4: inference engine and OpenAI-compatible server for the DeepSeek-V4 model family."""

from dsv4.config import PRESETS, ModelConfig
from dsv4.model import load_model

__all__ = ["ModelConfig", "PRESETS", "load_model"]
__version__ = "0.1.0"
