# Serves Roboflow Inference Server's HTTP API on loopback (PROTOCOL.md §9).
import argparse
import os

import uvicorn
from inference.core.interfaces.http.http_api import HttpInterface
from inference.core.managers.base import ModelManager
from inference.core.managers.decorators.fixed_size_cache import WithFixedSizeCache
from inference.core.registries.roboflow import RoboflowModelRegistry
from inference.models.utils import ROBOFLOW_MODEL_TYPES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("this launcher serves on loopback only")
    # The app mounts these folders relative to the working directory.
    for folder in ("inference/landing/out/static", "inference/landing/out/_next/static"):
        os.makedirs(folder, exist_ok=True)
    model_manager = WithFixedSizeCache(
        ModelManager(model_registry=RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES)),
        max_size=4,
    )
    app = HttpInterface(model_manager).app
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
