"""The naive baseline: the seed's approach served plainly.

fp32, the network called inside the request handler (a plain ``def`` endpoint, so FastAPI runs
each request on its thread pool, concurrently), torch's default thread settings, no batching,
no warm-up. The decoder and front end are the service's own, so the comparison is about how
inference is served, not about audio handling.

    WEIGHTS_DIR=weights uvicorn bench.naive:app --port 8001
"""

from __future__ import annotations

import json
import os

import safetensors.torch
import torch
from fastapi import FastAPI, UploadFile

from model.audio import decode, to_mono
from model.features import FeatureConfig, LogMelSpectrogram
from model.resnet import ResNet18

WEIGHTS_DIR = os.environ.get("WEIGHTS_DIR", "weights")

net = ResNet18()
net.load_state_dict(safetensors.torch.load_file(os.path.join(WEIGHTS_DIR, "model.safetensors")))
net.eval()
with open(os.path.join(WEIGHTS_DIR, "manifest.json")) as f:
    front_end = LogMelSpectrogram(FeatureConfig(**json.load(f)["features"]))
app = FastAPI()


@app.post("/embed")
def embed(file: UploadFile) -> dict[str, list[float]]:
    wave = to_mono(decode(file.file.read()), 16000)
    with torch.no_grad():
        _logits, embedding = net(front_end(wave[None]))
    return {"embedding": embedding[0].tolist()}
