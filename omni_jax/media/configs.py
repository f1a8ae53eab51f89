"""The audio and vision preprocessing settings of a checkpoint directory together (the file
readers are in :mod:`.settings`, the settings' classes in :mod:`.audio` and :mod:`.image`)."""

from __future__ import annotations

from .audio import AudioFeatureConfig
from .image import VisionProcessConfig
from .settings import _processor_settings, _warn_ignored


def processor_configs(directory: str | None) -> tuple[AudioFeatureConfig, VisionProcessConfig]:
    """The audio and vision preprocessing settings of a checkpoint directory, read as
    ``Qwen2_5OmniProcessor.from_pretrained`` of transformers 5 reads them.

    Both layouts are read: the nested ``processor_config.json`` that transformers 5's
    ``save_pretrained`` writes (sections ``image_processor``, ``video_processor`` and
    ``feature_extractor``) and the flat ``preprocessor_config.json`` of the published
    checkpoints (with ``video_preprocessor_config.json``, if present, for video). Per component,
    ``processor_config.json``'s section takes precedence, and the flat file is read only for a
    component it has no section for (transformers' own order). Missing settings take the
    published values. Settings omni-jax does not apply (unknown keys, unsupported values) give
    one warning per file naming them; malformed values raise :class:`CheckpointError` naming the
    file and the key.
    """
    found, unknown = _processor_settings(directory)
    audio, vision = AudioFeatureConfig._from_found(found), VisionProcessConfig._from_found(found)
    _warn_ignored(unknown, list(found.values()))
    return audio, vision
