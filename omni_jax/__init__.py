"""omni-jax: Qwen2.5-Omni (Thinker, Talker, Token2Wav) in JAX.

    import omni_jax
    model = omni_jax.load("path/to/Qwen2.5-Omni-3B", dtype="bfloat16")
    out = model.generate(messages=[{"role": "user", "content": "Hello!"}], max_new_tokens=64)
    print(out.text[0])
"""

from .api import GenerateOutput, Generation, OmniModel, StreamEvent, load
from .config import OmniConfig, load_config, preset
from .errors import CheckpointError, InputError, OmniError
from .sharding import make_mesh
from .training import train_loss

__version__ = "0.1.0"

__all__ = ["load", "OmniModel", "Generation", "GenerateOutput", "StreamEvent", "OmniConfig", "load_config", "preset",
           "OmniError", "CheckpointError", "InputError", "make_mesh", "train_loss", "default_model_path"]


def default_model_path() -> str:
    """Directory of the embedded default model (built on first use, then cached)."""
    from .default_model import ensure_default_model

    return ensure_default_model()
