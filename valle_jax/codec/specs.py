"""Codec facts, one table: sample rate, hop, levels, codebook size, frame rates (no imports beyond the stdlib).

Two frame rates exist per codec: the exact one (sample_rate / hop_length: 75 for EnCodec at 24 kHz, 86.13 for DAC
at 44.1 kHz), used to turn frames into seconds of audio, and the reference's rounded timing constant (spec 1.6:
75 for EnCodec/Vocos, 87 for DAC), which it uses for durations in its datasets and which our prepared datasets
store as `frames_per_second` for the same purpose.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CodecKind(str, enum.Enum):
    ENCODEC = "encodec"
    VOCOS = "vocos"  # EnCodec codes, decoded by Vocos (the reference's default decoder)
    DAC = "dac"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CodecSpec:
    sample_rate: int
    hop_length: int
    levels: int  # the reference's number of levels (8 for EnCodec/Vocos at 6 kbps, 9 for DAC)
    codebook_size: int
    allowed_levels: tuple[int, ...]
    reference_fps: int  # the reference's rounded frame rate for durations (spec 1.6)
    encoder: str  # the codec whose codes these are (Vocos decodes EnCodec codes)
    decodable_levels: tuple[int, ...] = ()  # level counts the decoder takes (the first levels of the codes)

    def decode_levels(self, made: int) -> int:
        """How many of the first `made` levels the decoder uses: all of them where it takes any count, else the
        largest count it takes that is <= made (Vocos is conditioned on 2, 4, 8 or 16 levels only)."""
        fits = [n for n in self.decodable_levels if n <= made]
        if not fits:
            raise ValueError(f"{made} code level(s): this codec decodes {', '.join(map(str, self.decodable_levels))} "
                             "levels")
        return max(fits)

    @property
    def frames_per_second(self) -> float:
        """Exact code frames per second of audio."""
        return self.sample_rate / self.hop_length


CODEC_SPECS: dict[str, CodecSpec] = {
    # EnCodec's and DAC's decoders sum the given levels' embeddings (any count); Vocos is trained per bandwidth
    CodecKind.ENCODEC.value: CodecSpec(24000, 320, 8, 1024, (2, 4, 8, 16, 32), 75, "encodec", tuple(range(1, 33))),
    CodecKind.VOCOS.value: CodecSpec(24000, 320, 8, 1024, (2, 4, 8, 16), 75, "encodec", (2, 4, 8, 16)),
    CodecKind.DAC.value: CodecSpec(44100, 512, 9, 1024, tuple(range(1, 10)), 87, "dac", tuple(range(1, 10))),
}


def codec_spec(kind: str) -> CodecSpec:
    """The spec of codec `kind`; a clear error names the allowed kinds."""
    try:
        return CODEC_SPECS[str(kind)]
    except KeyError:
        raise ValueError(f"codec {kind!r}: expected one of {', '.join(CODEC_SPECS)}") from None
