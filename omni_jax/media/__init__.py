"""Media inputs for the Thinker: audio, images and video, read and preprocessed without torch, and
the prompt placeholders they fill. Each gives transformers' ``Qwen2_5OmniProcessor`` numbers
(checked in ``tests/test_media.py``).

Where each part lives:

* :mod:`.audio` — audio files and arrays to 16 kHz mono, log-mel features and their mask, the
  audio token count, WAV writing;
* :mod:`.image` — image loading, ``smart_resize``, torch's uint8 antialiased bicubic resize, the
  fused normalisation, patches for the vision encoder;
* :mod:`.video` — video decoding, qwen-omni-utils' frame sampling, the per-frame size,
  ``video_second_per_grid``;
* :mod:`.chat` — the media placeholder tokens and their expansion in the prompt;
* :mod:`.settings` — reading the checkpoint's processor settings files; :mod:`.configs` —
  :func:`processor_configs`, both components' settings together.

Dependencies: numpy, librosa (audio files and resampling), Pillow (decoding image files), PyAV
(``av``; video files and audio tracks). Pillow and PyAV are imported only when needed.
"""

from .audio import (AudioFeatureConfig, audio_inputs, audio_token_count, feature_attention_mask, load_audio, log_mel,
                    write_wav)
from .chat import (AUDIO_BOS_TOKEN, AUDIO_EOS_TOKEN, AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, expand_placeholders,
                   video_with_audio_placeholder)
from .image import (MIN_IMAGE_SIDE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionProcessConfig, image_inputs, load_image,
                    normalize_video, patchify, resize_frames, smart_resize)
from .configs import processor_configs
from .settings import PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, VIDEO_PREPROCESSOR_CONFIG
from .video import (Video, load_video, load_video_audio, num_sampled_frames, sample_indices, video_frame_size,
                    video_inputs)

__all__ = [
    "AudioFeatureConfig", "load_audio", "log_mel", "feature_attention_mask", "audio_token_count", "audio_inputs",
    "write_wav",
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "MIN_IMAGE_SIDE", "VisionProcessConfig", "smart_resize", "load_image",
    "resize_frames", "normalize_video", "patchify", "image_inputs",
    "Video", "num_sampled_frames", "sample_indices", "load_video_audio", "load_video", "video_frame_size",
    "video_inputs",
    "AUDIO_TOKEN", "IMAGE_TOKEN", "VIDEO_TOKEN", "AUDIO_BOS_TOKEN", "AUDIO_EOS_TOKEN", "video_with_audio_placeholder",
    "expand_placeholders",
    "PROCESSOR_CONFIG", "PREPROCESSOR_CONFIG", "VIDEO_PREPROCESSOR_CONFIG", "processor_configs",
]
