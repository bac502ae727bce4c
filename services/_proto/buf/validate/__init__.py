"""Generated protobuf and gRPC code. DO NOT EDIT; see scripts/gen_protos.py."""
