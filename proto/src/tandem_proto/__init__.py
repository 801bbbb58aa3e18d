"""Tandem's wire contracts: `from tandem_proto.v1 import inference_pb2`."""
