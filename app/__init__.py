"""The HTTP service: FastAPI app over model.load()."""
