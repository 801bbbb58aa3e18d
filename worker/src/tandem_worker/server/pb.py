"""The generated wire messages and stubs (package tandem.v1), in one place for the servers."""

from tandem_proto.v1 import (  # noqa: F401
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
