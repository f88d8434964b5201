"""The STT front end's small ONNX models (Silero VAD, GTCRN) on the CPU, one session per thread.

Both models are tiny and run hundreds of times a second per node, one short call each. ONNX
Runtime allows concurrent ``run`` calls on one session, but they contend inside it: GTCRN on two
front-end threads sharing a session took 1.6x the CPU per call and got 1.1x the calls through,
where a session per thread got 2.0x through at the same CPU per call (measured on the 2-core
machine). A session is a few hundred kilobytes, so each thread that runs a model opens its own.
"""

from __future__ import annotations

import threading
from pathlib import Path

import onnxruntime


class OnnxModel:
    """An ONNX model file and, per thread, the single-threaded session that runs it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self.session  # noqa: B018 - open one now, so a bad file fails at load, not mid-stream

    @property
    def session(self) -> onnxruntime.InferenceSession:
        """This thread's session (opened on its first use)."""
        session = getattr(self._local, "session", None)
        if session is None:
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 4
            opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            session = self._local.session = onnxruntime.InferenceSession(
                str(self.path), providers=["CPUExecutionProvider"], sess_options=opts
            )
        return session
