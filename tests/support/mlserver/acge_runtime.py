"""An MLServer runtime that serves an acge model directory (model.json + its
TorchScript file) over the Open Inference Protocol, for tests/remote.rs and
benches/remote-load.sh: the inputs, in order, are the module's tensors (INT64), the
output `scores` is its `[B, P]` probabilities (FP32). A real MLServer (from PyPI,
scripts/setup-mlserver.sh) runs it; only this class is ours."""
import json
import os

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class TorchScriptRuntime(MLModel):
    async def load(self) -> bool:
        directory = await get_model_uri(self._settings)
        with open(os.path.join(directory, "model.json")) as f:
            meta = json.load(f)
        torch.set_num_threads(1)
        self.module = torch.jit.load(os.path.join(directory, meta["file"]), map_location="cpu")
        self.module.eval()
        return True

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        tensors = [torch.from_numpy(np.ascontiguousarray(NumpyCodec.decode_input(i)).astype(np.int64))
                   for i in request.inputs]
        with torch.no_grad():
            scores = self.module(*tensors).float().numpy()
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("scores", scores)],
        )
