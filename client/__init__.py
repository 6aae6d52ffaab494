"""A Python client of the voice-embed service (httpx only: no torch), and ``python -m client``.

from client import Client
with Client("http://localhost:8000") as c:
    print(c.classify("clip.wav").label, len(c.embed("clip.wav").vector))
"""

from client.api import AsyncClient, Client
from client.results import (
    BatchItem,
    Classification,
    Embedding,
    Identification,
    LabelScore,
    Match,
    ModelRef,
    ServiceError,
    Speaker,
    SpeakerVerification,
    Verification,
)

__all__ = [
    "AsyncClient",
    "BatchItem",
    "Classification",
    "Client",
    "Embedding",
    "Identification",
    "LabelScore",
    "Match",
    "ModelRef",
    "ServiceError",
    "Speaker",
    "SpeakerVerification",
    "Verification",
]
