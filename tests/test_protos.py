"""The committed protobuf code is what glinthawk_jax/protos/regenerate.sh makes of tier2.proto.

Compares the serialized descriptor and the gRPC method names rather than the text, so the check
holds whichever grpcio-tools version the test machine has.
"""

import ast
import pathlib
import re

from grpc_tools import protoc

from glinthawk_jax.protos import tier2_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "glinthawk_jax" / "protos"


def _serialized_descriptor(pb2_source: str) -> bytes:
  match = re.search(r"AddSerializedFile\((b'.*?')\)", pb2_source, re.S)
  assert match, "no AddSerializedFile(...) in the generated module"
  return ast.literal_eval(match.group(1))


def _methods(grpc_source: str) -> set[str]:
  return set(re.findall(r"'(/glinthawk\.tier2\.\w+/\w+)'", grpc_source))


def test_generated_code_is_current(tmp_path):
  rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(PROTOS / "tier2.proto")])
  assert rc == 0
  fresh = tmp_path / "glinthawk_jax" / "protos"
  assert tier2_pb2.DESCRIPTOR.serialized_pb == _serialized_descriptor(
      (fresh / "tier2_pb2.py").read_text()), "tier2_pb2.py is stale: run glinthawk_jax/protos/regenerate.sh"
  committed = _methods((PROTOS / "tier2_pb2_grpc.py").read_text())
  assert committed == _methods((fresh / "tier2_pb2_grpc.py").read_text()), \
      "tier2_pb2_grpc.py is stale: run glinthawk_jax/protos/regenerate.sh"
  assert {"/glinthawk.tier2.Tier2/Handshake", "/glinthawk.tier2.Tier2/Stats"} <= committed


def test_generated_code_has_no_runtime_version_pin():
  """Code from newer grpcio-tools refuses older grpcio/protobuf runtimes (the GPU image's)."""
  for name in ("tier2_pb2.py", "tier2_pb2_grpc.py"):
    text = (PROTOS / name).read_text()
    assert "ValidateProtobufRuntimeVersion" not in text and "GRPC_GENERATED_VERSION" not in text, name
