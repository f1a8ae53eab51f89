"""Qwen2.5-Omni configuration as frozen dataclasses.

Reads a checkpoint's ``config.json`` in both forms that exist in the wild:

* the published form (written before transformers 5): ``rope_scaling`` + ``rope_theta``,
  ``torch_dtype``, vision ``embed_dim``, many defaulted fields omitted;
* the transformers-5 form written by ``save_pretrained``: ``rope_parameters``, ``dtype``.

Optional fields take transformers' defaults. The few shape fields that decide how
tensors are laid out (sizes, layer and head counts, vocabulary) are required: a config
that omits them would otherwise silently take the 7B defaults and mis-load a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import CheckpointError

# --------------------------------------------------------------------------------------
# helpers


def _get(d: dict, key: str, default: Any, *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in d and d[k] is not None:
            return d[k]
    return default


def _req(d: dict, key: str, where: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in d and d[k] is not None:
            return d[k]
    raise CheckpointError(f"config.json: required field '{where}.{key}' is missing")


def _rope(d: dict, default_theta: float, default_section=None) -> tuple[float, tuple[int, ...] | None]:
    """(rope_theta, mrope_section) from either ``rope_parameters`` or ``rope_scaling``+``rope_theta``."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    section = params.get("mrope_section", scaling.get("mrope_section", default_section))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", "mrope", "axial", None):
        raise CheckpointError(f"config.json: rope type '{rope_type}' is not supported (only default/mrope)")
    _check_value(theta, "float", "rope_theta", "rope parameters")
    if section is not None:
        if not isinstance(section, (list, tuple)):
            raise CheckpointError(f"config.json: mrope_section is {section!r}: expected a list of integers")
        section = tuple(section)
        _check_value(section, "tuple[int, ...]", "mrope_section", "rope parameters")
    return float(theta), section


def _tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_tuple(v) for v in x)
    return x


# Integer fields that count or size something: they must be positive (the others, token ids, indices and
# offsets, must not be negative).
_POSITIVE = ("size", "dim", "layers", "heads", "depth", "mult", "repeats", "window", "positions", "channels",
             "rates", "kernel", "bins", "seconds", "scale", "length", "embeds", "patch", "dilation")


def _check_value(v, ann: str, name: str, where: str):
    """``v`` (a field's value) checked against its annotation; CheckpointError naming the field if it is
    of the wrong type, not finite, or of the wrong sign."""
    def bad(what):
        raise CheckpointError(f"config.json: {where}.{name} is {v!r}: {what}")

    optional = ann.endswith("| None")
    base_ann = ann.replace("| None", "").strip()
    if v is None:
        if not optional:
            bad("a value is required")
        return
    if base_ann == "bool":
        if not isinstance(v, bool):
            bad("expected true or false")
    elif base_ann == "int":
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            bad("expected an integer")
        if name.endswith("_id"):
            return  # token ids: -1 is a "none" sentinel in some configs
        if v < 0 or (v == 0 and any(k in name for k in _POSITIVE)):
            bad("expected a positive integer" if any(k in name for k in _POSITIVE) else "expected an integer >= 0")
    elif base_ann == "float":
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            bad("expected a finite number")
        if v <= 0 and name in ("rms_norm_eps", "rope_theta"):
            bad("expected a positive number")
    elif base_ann == "str":
        if not isinstance(v, str):
            bad("expected a string")
    elif base_ann.startswith("tuple"):
        if not isinstance(v, tuple):
            bad("expected a list")
        inner = "tuple[int, ...]" if base_ann.startswith("tuple[tuple") else "int"
        for x in v:  # elements are indices or sizes: only their sign is checked
            _check_value(x, inner, "element", f"{where}.{name}")


class _Checked:
    """Frozen config dataclasses validate their fields on construction (from a config file or a preset):
    a value of the wrong type or sign is a CheckpointError naming ``<section>.<field>``, not a traceback
    from deep inside the model."""

    _where = "config"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if ann in ("bool", "int", "float", "str") or ann.startswith("tuple") or ann.endswith("| None"):
                _check_value(getattr(self, f.name), ann, f.name, self._where)


def _bool(v, name: str) -> bool:
    _check_value(v, "bool", name, "config")
    return v


def _int(v, where: str, name: str) -> int:
    """A config integer read before its dataclass is built (it feeds other fields' defaults)."""
    _check_value(v, "int", name, where)
    return v


# --------------------------------------------------------------------------------------
# thinker


@dataclass(frozen=True)
class TextConfig(_Checked):
    """The thinker's Qwen2 decoder (``Qwen2_5OmniTextConfig``)."""

    _where: ClassVar[str] = 'thinker_config.text_config'

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    use_sliding_window: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "thinker_config.text_config") -> "TextConfig":
        heads = _int(_req(d, "num_attention_heads", where), where, "num_attention_heads")
        hidden = _int(_req(d, "hidden_size", where), where, "hidden_size")
        theta, section = _rope(d, 1000000.0, (16, 24, 24))
        kv = _int(_get(d, "num_key_value_heads", heads), where, "num_key_value_heads")
        head_dim = _int(_get(d, "head_dim", hidden // heads), where, "head_dim")
        cfg = cls(
            vocab_size=_int(_req(d, "vocab_size", where), where, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(_req(d, "intermediate_size", where), where, "intermediate_size"),
            num_hidden_layers=_int(_req(d, "num_hidden_layers", where), where, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            hidden_act=_get(d, "hidden_act", "silu"),
            max_position_embeddings=_get(d, "max_position_embeddings", 32768),
            rms_norm_eps=_get(d, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            mrope_section=section,
            use_sliding_window=_get(d, "use_sliding_window", False),
            sliding_window=_get(d, "sliding_window", None),
        )
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config.json: {where}.num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise CheckpointError(
                f"config.json: {where} mrope_section {list(self.mrope_section)} sums to "
                f"{sum(self.mrope_section)}, but head_dim/2 is {self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"config.json: {where}.hidden_act '{self.hidden_act}' is not supported (silu)")
        if self.use_sliding_window:
            raise CheckpointError(f"config.json: {where}.use_sliding_window=true is not supported")


@dataclass(frozen=True)
class AudioConfig(_Checked):
    """The Whisper-style audio encoder (``Qwen2_5OmniAudioEncoderConfig``)."""

    _where: ClassVar[str] = 'thinker_config.audio_config'

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    scale_embedding: bool = False
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: _tuple(d[k]) for k in names if k in d and d[k] is not None})


@dataclass(frozen=True)
class VisionConfig(_Checked):
    """The ViT vision encoder (``Qwen2_5OmniVisionEncoderConfig``).

    ``hidden_size`` is the ViT width: the published config calls it ``embed_dim`` (1280);
    transformers' own default (3584) is not a published shape.
    """

    _where: ClassVar[str] = 'thinker_config.vision_config'

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {k: _tuple(d[k]) for k in names if k in d and d[k] is not None}
        if "embed_dim" in d and d["embed_dim"] is not None:
            kw["hidden_size"] = d["embed_dim"]
        if "in_chans" in d and "in_channels" not in d:
            kw["in_channels"] = d["in_chans"]
        kw["rope_theta"] = _rope(d, 10000.0)[0]
        return cls(**kw)


@dataclass(frozen=True)
class ThinkerConfig(_Checked):
    _where: ClassVar[str] = 'thinker_config'
    text: TextConfig
    audio: AudioConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    user_token_id: int = 872
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ThinkerConfig":
        if "text_config" not in d:
            raise CheckpointError("config.json: required field 'thinker_config.text_config' is missing")
        return cls(
            text=TextConfig.from_dict(d["text_config"]),
            audio=AudioConfig.from_dict(d.get("audio_config") or {}),
            vision=VisionConfig.from_dict(d.get("vision_config") or {}),
            # the thinker's own flag decides tying; text_config.tie_word_embeddings is unused
            tie_word_embeddings=_get(d, "tie_word_embeddings", False),
            audio_token_id=_get(d, "audio_token_index", 151646, "audio_token_id"),
            image_token_id=_get(d, "image_token_index", 151655, "image_token_id"),
            video_token_id=_get(d, "video_token_index", 151656, "video_token_id"),
            audio_start_token_id=_get(d, "audio_start_token_id", 151647),
            audio_end_token_id=_get(d, "audio_end_token_id", 151648),
            vision_start_token_id=_get(d, "vision_start_token_id", 151652),
            vision_end_token_id=_get(d, "vision_end_token_id", 151653),
            user_token_id=_get(d, "user_token_id", 872),
            position_id_per_seconds=_get(d, "position_id_per_seconds", 25),
            seconds_per_chunk=_get(d, "seconds_per_chunk", 2),
            pad_token_id=_get(d, "pad_token_id", None),
        )


# --------------------------------------------------------------------------------------
# talker and token2wav


@dataclass(frozen=True)
class TalkerConfig(_Checked):
    """The talker decoder over the codec vocabulary (``Qwen2_5OmniTalkerConfig``)."""

    _where: ClassVar[str] = 'talker_config'

    vocab_size: int = 8448
    embedding_size: int = 3584
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "TalkerConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {k: _tuple(d[k]) for k in names if k in d and d[k] is not None}
        for ours, theirs in (("audio_token_id", "audio_token_index"), ("image_token_id", "image_token_index"),
                             ("video_token_id", "video_token_index")):
            if theirs in d and d[theirs] is not None:
                kw[ours] = d[theirs]
        theta, section = _rope(d, 1000000.0, (16, 24, 24))
        kw["rope_theta"], kw["mrope_section"] = theta, section
        if "num_key_value_heads" not in kw and "num_attention_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        return cls(**kw)


@dataclass(frozen=True)
class DiTConfig(_Checked):
    """Token2Wav's flow-matching DiT (``Qwen2_5OmniDiTConfig``)."""

    _where: ClassVar[str] = 'token2wav_config.dit_config'

    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    ff_mult: int = 2
    emb_dim: int = 512
    head_dim: int = 64
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    block_size: int = 24
    look_ahead_layers: tuple[int, ...] = (10,)
    look_backward_layers: tuple[int, ...] = (0, 20)
    repeats: int = 2
    num_embeds: int = 8193
    mel_dim: int = 80
    enc_emb_dim: int = 192
    enc_dim: int = 128
    enc_channels: tuple[int, ...] = (256, 256, 256, 256, 768)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {k: _tuple(d[k]) for k in names if k in d and d[k] is not None}
        kw["rope_theta"] = _rope(d, 10000.0)[0]
        return cls(**kw)


@dataclass(frozen=True)
class BigVGANConfig(_Checked):
    """Token2Wav's vocoder (``Qwen2_5OmniBigVGANConfig``)."""

    _where: ClassVar[str] = 'token2wav_config.bigvgan_config'

    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (5, 3, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 7, 4, 4, 4, 4)

    @classmethod
    def from_dict(cls, d: dict) -> "BigVGANConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: _tuple(d[k]) for k in names if k in d and d[k] is not None})


@dataclass(frozen=True)
class Token2WavConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    bigvgan: BigVGANConfig = field(default_factory=BigVGANConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "Token2WavConfig":
        return cls(dit=DiTConfig.from_dict(d.get("dit_config") or {}),
                   bigvgan=BigVGANConfig.from_dict(d.get("bigvgan_config") or {}))


# --------------------------------------------------------------------------------------
# whole model


@dataclass(frozen=True)
class OmniConfig:
    thinker: ThinkerConfig
    talker: TalkerConfig | None = None
    token2wav: Token2WavConfig | None = None
    enable_audio_output: bool = True
    dtype: str | None = None  # the checkpoint's stored dtype ("torch_dtype" or "dtype")

    @classmethod
    def from_dict(cls, d: dict) -> "OmniConfig":
        if not isinstance(d, dict):
            raise CheckpointError("config.json: the top level is not a JSON object")
        mt = d.get("model_type")
        if mt == "qwen2_5_omni_thinker":  # a thinker-only checkpoint
            return cls(thinker=ThinkerConfig.from_dict(d), enable_audio_output=False,
                       dtype=d.get("dtype") or d.get("torch_dtype"))
        if mt != "qwen2_5_omni":
            raise CheckpointError(
                f"config.json: model_type '{mt}' is not a Qwen2.5-Omni model (expected 'qwen2_5_omni')"
            )
        if not isinstance(d.get("thinker_config"), dict):
            raise CheckpointError("config.json: required field 'thinker_config' is missing")
        talker = d.get("talker_config")
        t2w = d.get("token2wav_config")
        return cls(
            thinker=ThinkerConfig.from_dict(d["thinker_config"]),
            talker=TalkerConfig.from_dict(talker) if isinstance(talker, dict) else None,
            token2wav=Token2WavConfig.from_dict(t2w) if isinstance(t2w, dict) else None,
            enable_audio_output=_bool(d.get("enable_audio_output", True), "enable_audio_output"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )

    @classmethod
    def from_file(cls, path: str) -> "OmniConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json (not a Qwen2.5-Omni checkpoint directory)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """A transformers-5 form ``config.json`` dict (used to write the embedded default)."""
        t = self.thinker
        text = dataclasses.asdict(t.text)
        theta, section = text.pop("rope_theta"), text.pop("mrope_section")
        text.update(model_type="qwen2_5_omni_text",
                    rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)})
        vision = dataclasses.asdict(t.vision)
        vision.update(model_type="qwen2_5_omni_vision_encoder",
                      rope_parameters={"rope_type": "axial", "rope_theta": vision.pop("rope_theta")})
        thinker = dict(
            model_type="qwen2_5_omni_thinker", text_config=text,
            audio_config=dict(dataclasses.asdict(t.audio), model_type="qwen2_5_omni_audio_encoder"),
            vision_config=vision, tie_word_embeddings=t.tie_word_embeddings,
            audio_token_index=t.audio_token_id, image_token_index=t.image_token_id,
            video_token_index=t.video_token_id, audio_start_token_id=t.audio_start_token_id,
            audio_end_token_id=t.audio_end_token_id, vision_start_token_id=t.vision_start_token_id,
            vision_end_token_id=t.vision_end_token_id, user_token_id=t.user_token_id,
            position_id_per_seconds=t.position_id_per_seconds, seconds_per_chunk=t.seconds_per_chunk,
            pad_token_id=t.pad_token_id,
        )
        out = dict(model_type="qwen2_5_omni", architectures=["Qwen2_5OmniForConditionalGeneration"],
                   thinker_config=thinker, enable_audio_output=self.enable_audio_output,
                   dtype=self.dtype or "float32")
        if self.talker is not None:
            talker = dataclasses.asdict(self.talker)
            theta, section = talker.pop("rope_theta"), talker.pop("mrope_section")
            for ours, theirs in (("audio_token_id", "audio_token_index"), ("image_token_id", "image_token_index"),
                                 ("video_token_id", "video_token_index")):
                talker[theirs] = talker.pop(ours)
            talker.update(model_type="qwen2_5_omni_talker",
                          rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)})
            out["talker_config"] = talker
        if self.token2wav is not None:
            dit = dataclasses.asdict(self.token2wav.dit)
            dit.update(model_type="qwen2_5_omni_dit",
                       rope_parameters={"rope_type": "default", "rope_theta": dit.pop("rope_theta")})
            out["token2wav_config"] = dict(
                model_type="qwen2_5_omni_token2wav", dit_config=dit,
                bigvgan_config=dict(dataclasses.asdict(self.token2wav.bigvgan), model_type="qwen2_5_omni_bigvgan"))
        return out


def load_config(path: str) -> OmniConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return OmniConfig.from_file(path)


# --------------------------------------------------------------------------------------
# shape presets (random weights, for benchmarks)
#
# From the published Qwen/Qwen2.5-Omni-3B and -7B config.json files. Values marked
# UNCONFIRMED could not be checked against the published files from this machine (no
# network); they follow the Qwen2.5 family's published shapes.

_VISION_PUBLISHED = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=(7, 15, 23, 31))
_AUDIO_PUBLISHED = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128, n_window=100, max_source_positions=1500)


def preset(name: str) -> OmniConfig:
    """Published shapes: ``"3b"`` or ``"7b"``."""
    name = name.lower()
    if name == "3b":
        text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, head_dim=128)
        # talker 3B: 896 wide, 24 layers (confirmed); heads 14 / kv 2 / head_dim 64 /
        # intermediate 4864 UNCONFIRMED (Qwen2.5-0.5B shapes)
        talker = TalkerConfig(embedding_size=2048, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12))
        tie = False  # UNCONFIRMED
    elif name == "7b":
        text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, head_dim=128)
        # talker 7B: 896 wide, 24 layers (confirmed); heads 12 / kv 4 / head_dim 128 UNCONFIRMED
        talker = TalkerConfig(embedding_size=3584, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                              num_attention_heads=12, num_key_value_heads=4, head_dim=128)
        tie = False
    else:
        raise CheckpointError(f"unknown preset '{name}' (choose 3b or 7b)")
    thinker = ThinkerConfig(
        text=text,
        audio=AudioConfig(**_AUDIO_PUBLISHED, output_dim=text.hidden_size),
        vision=VisionConfig(**_VISION_PUBLISHED, out_hidden_size=text.hidden_size),
        tie_word_embeddings=tie,
    )
    t2w = Token2WavConfig(dit=DiTConfig(hidden_size=1024, num_hidden_layers=22, num_attention_heads=16),
                          bigvgan=BigVGANConfig(upsample_initial_channel=1536))
    return OmniConfig(thinker=thinker, talker=talker, token2wav=t2w, dtype="bfloat16")
