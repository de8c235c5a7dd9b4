"""Audio codecs for valle_jax: EnCodec 24 kHz, Vocos (decoding EnCodec codes) and DAC 44.1 kHz.

The codecs are torch models.  They run in a *sidecar*: a separate process started with multiprocessing's
spawn context that imports torch and owns the model, so the JAX process never imports torch (this package
imports neither torch nor jax).  See `client.CodecClient`.

    from valle_jax.codec import CodecClient, read_audio, write_wav, read_codes, write_codes

    wav, sr = read_audio("prompt.flac")                      # soundfile -> float32 mono
    head, sr = read_audio("long.flac", seconds=3.1)          # only the first 3.1 s is decoded
    with CodecClient("encodec") as codec:                     # weights from $TORCH_HOME/hub/checkpoints
        [codes] = codec.encode([wav], sr)                     # np.int16 [T, 8]
        [audio] = codec.decode([codes])                       # np.float32 [T * 320] at 24 kHz
    write_wav("out.wav", audio, codec.sample_rate)
    codes, metadata = read_codes("data/qnt.enc")              # the reference's .enc/.dac files

Install (torch must stay the CPU build 2.13.0, so pin it in every command that could pull torch in):

    pip install torch==2.13.0 torchaudio==2.11.0 encodec==0.1.1 vocos==0.1.0 soundfile
    python -m valle_jax.codec.torchaudio_fix     # PyPI's torchaudio links CUDA libs: drop its native
                                                 # extension so it runs in pure-Python mode (no-op where
                                                 # torchaudio already imports)
    # DAC (optional): descript-audiotools pins protobuf<3.20, which would break orbax/grain; install it
    # without dependencies plus what it imports:
    pip install torch==2.13.0 argbind docstring-parser ffmpy flatten-dict importlib-resources julius \\
        randomname rich tensorboard markdown2 pyloudnorm
    pip install --no-deps descript-audio-codec==1.0.0 descript-audiotools==0.7.2
"""

from .audio import ENCODE_MARGIN_SECONDS, AudioFileError, read_audio, to_mono, write_wav
from .client import (
    CODEC_SPECS,
    CodecClient,
    CodecCrashError,
    CodecError,
    CodecSpec,
    CodecTimeoutError,
    share_gpu_with_codec,
)
from .files import CodecFileError, read_codes, write_codes
from .specs import CodecKind, codec_spec
from .weights import MissingWeightsError, WeightsChecksumError

# Codes the reference pads with for silence, one per level.
SILENCE_CODES = {
    "encodec": (62, 424, 786, 673, 622, 986, 570, 948),
    "vocos": (62, 424, 786, 673, 622, 986, 570, 948),
    "dac": (568, 804, 10, 674, 364, 981, 568, 378, 731),
}

__all__ = [
    "AudioFileError",
    "CODEC_SPECS",
    "CodecClient",
    "CodecCrashError",
    "CodecError",
    "CodecFileError",
    "CodecKind",
    "CodecSpec",
    "CodecTimeoutError",
    "ENCODE_MARGIN_SECONDS",
    "MissingWeightsError",
    "SILENCE_CODES",
    "WeightsChecksumError",
    "codec_spec",
    "read_audio",
    "share_gpu_with_codec",
    "read_codes",
    "to_mono",
    "write_codes",
    "write_wav",
]
