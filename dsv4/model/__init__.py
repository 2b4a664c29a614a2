"""The DeepSeek-V4 network, its checkpoint formats, and the simple per-sequence cache."""

from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
from dsv4.model.loader import CheckpointError, load_model
from dsv4.model.sequence_cache import SequenceCache
from dsv4.model.writer import random_state_dict, write_checkpoint

__all__ = [
    "DeepseekV4ForCausalLM", "SequenceCache", "load_model", "CheckpointError",
    "random_state_dict", "write_checkpoint",
]
