"""Generated protobuf modules (scripts/gen-proto) and the .proto files they come from."""
