"""dsv4: inference engine and OpenAI-compatible server for the DeepSeek-V4 model family."""

from dsv4.config import PRESETS, ModelConfig
from dsv4.engine_args import EngineArgs
from dsv4.errors import InvalidRequestError
from dsv4.llm import LLM, CompletionOutput, RequestOutput
from dsv4.model import load_model
from dsv4.sampling_params import SamplingParams
from dsv4.structured_outputs import StructuredOutputsParams

__all__ = ["ModelConfig", "PRESETS", "load_model", "LLM", "EngineArgs", "SamplingParams",
           "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput", "InvalidRequestError"]
__version__ = "0.1.0"
