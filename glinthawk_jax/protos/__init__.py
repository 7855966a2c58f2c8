"""The tier-2 protocol: protobuf control messages (generated) and the raw tensor wire format."""
