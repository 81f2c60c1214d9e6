"""Our GPT-2 for serving: the model and its weights (`gpt2`), a step's attention and metadata
(`attention`), CPU linear layers (`linear`), the exact greedy screen (`greedy`), and the
backend chosen once for the device (`backend`)."""

from server.model.attention import StepMeta, additive_mask
from server.model.backend import Backend
from server.model.gpt2 import GPT2, Block, GPT2Spec
from server.model.linear import Linear, bucket_rows

__all__ = ["GPT2", "GPT2Spec", "Block", "Backend", "StepMeta", "Linear", "additive_mask", "bucket_rows"]
