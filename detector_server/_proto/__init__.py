"""Generated gRPC/protobuf code for protos/rwood/v1/detector.proto (see generate.py)."""
