"""KServe's own floor: its ModelServer (REST and gRPC, uvloop where installed) with a model that
answers every inference at once with one constant score and does no other work.

Whatever a KServe predictor does per request comes on top of this, so its p50 at a rate, plus
the forward run alone at the same rate, is the least a ranking can take through KServe on this
machine. `bench/ranking_latency.py` starts it as its `kserve floor` lever:

    .venv/bin/python bench/kserve_floor.py --http-port 8080 --grpc-port 8081 --model ranker
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class Constant(Model):  # type: ignore[misc]  # KServe ships no type information
    """Ready at once; one FP32 score per request (v2, gRPC) or one prediction (v1)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True

    async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        if isinstance(payload, InferRequest):
            return InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                infer_outputs=[InferOutput("scores", [1], "FP32", [0.0])],
            )
        return {"predictions": [0.0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--model", default="ranker")
    args = parser.parse_args()
    server = ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=True, enable_latency_logging=False
    )
    for name in ("uvicorn.access", "kserve.trace"):  # as `mmrank predictor serve` without --access-log
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([Constant(args.model)])


if __name__ == "__main__":
    main()
