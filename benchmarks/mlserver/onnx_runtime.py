"""A minimal MLServer runtime for ONNX models: MLServer ships none (its docs point to Triton).

It runs the model file named by ``parameters.uri`` with ONNX Runtime on the CPU, one thread per
operator and one across operators (as infercore's ONNX loader does by default), so the two serve
the same file the same way. Inputs are decoded with MLServer's NumPy codec (every V2 tensor by
name); every model output comes back as a V2 tensor. MLServer's adaptive batcher
(``max_batch_size`` / ``max_batch_time`` in model-settings.json) merges concurrent requests along
the first dimension before ``predict`` and splits the answers after it.

Used by ``benchmarks/bench.py`` (the MLServer peer); runs inside ``benchmarks/.venv-mlserver``.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )
