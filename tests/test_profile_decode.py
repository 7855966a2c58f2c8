"""benchmarks/profile_decode.py end to end on the CPU, and the trace grouping it relies on."""

import gzip
import json

import pytest

from benchmarks import kernel_trace, profile_decode

HLO = """
ENTRY %main {
  %gemm_fusion_dot.82 = f32[2,128,12288]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.82_computation, metadata={op_name="jit(f)/while/body/dot_general"}
  %input_reduce_fusion.8 = f32[128,256,32]{2,1,0} fusion(%p, %q), kind=kInput, calls=%fused_reduce.8, metadata={op_name="jit(f)/while/body/decode_attention/reduce_sum"}
  %input_scatter_fusion.2 = bf16[2,2049,16,32,128]{4,3,2,1,0} fusion(%p, %k), kind=kInput, calls=%fused_scatter.2, metadata={op_name="jit(f)/while/body/kv_write/scatter"}
  %copy.3 = bf16[32,2049,16,32,128]{4,3,2,1,0} copy(%pool), metadata={op_name="jit(f)/while/body/copy"}
  %input_reduce_fusion = (f32[128]{0}, s32[128]{0}) fusion(%l), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(f)/while/body/sampling/argmax"}
  %while.2 = (s32[]) while(%t), condition=%c, body=%b, metadata={op_name="jit(f)/while"}
}
"""


def _trace(path, events):
  meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
          dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #7(Compute)")),
          dict(ph="M", name="thread_name", pid=1, tid=8, args=dict(name="XLA Ops")),
          dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU"))]
  with gzip.open(path, "wt") as f:
    json.dump(dict(traceEvents=meta + events), f)


def test_kernels_grouped_per_step_from_stream_lines(tmp_path):
  kernel = lambda name, us, tid=7, pid=1, **args: dict(ph="X", name=name, pid=pid, tid=tid, ts=0, dur=us, args=args)
  events = [kernel("gemm_fusion_dot_82", 300), kernel("gemm_fusion_dot_82", 300),
            kernel("input_reduce_fusion_8", 150), kernel("paged_decode_attention", 100),
            kernel("some_library_kernel", 50, tf_op="jit(f)/while/body/decode_attention/reduce_sum"),
            kernel("input_scatter_fusion_2", 40), kernel("copy_3", 60), kernel("input_reduce_fusion", 20),
            kernel("MemcpyD2H", 10), kernel("some_loop_fusion", 10),
            kernel("input_reduce_fusion_8", 999, tid=8),  # the XLA Ops line repeats stream kernels
            kernel("python_host_event", 999, pid=2)]
  path = tmp_path / "perfetto_trace.json.gz"
  _trace(path, events)
  assert kernel_trace.latest_trace(str(tmp_path)) == str(path)
  summary = kernel_trace.summarize(kernel_trace.kernel_events(str(path)), HLO, steps=2)
  groups = summary["group_ms_per_step"]
  assert groups == pytest.approx(dict(attention=0.15, kv_write=0.02, matmul=0.3, **{"copy/gather": 0.035},
                                      sampling=0.01, other=0.005))
  top = summary["top_kernels"][0]
  assert (top["kernel"], top["group"], top["launches_per_step"]) == ("gemm_fusion_dot_82", "matmul", 1.0)
  assert summary["launches_per_step"] == 5  # 10 stream kernels over 2 steps


def test_large_copies_found_in_hlo():
  copies = kernel_trace.large_copies(HLO, 64 << 20)
  assert [(c["name"], c["mib"]) for c in copies] == [("copy.3", 32 * 2049 * 16 * 32 * 128 * 2 / 2**20)]
  assert kernel_trace.large_copies(HLO, 1 << 40) == []


def test_profile_decode_small_runs_end_to_end(tmp_path, capsys):
  out = tmp_path / "pd.json"
  profile_decode.main(["--small", "--out", str(out), "--trace_dir", str(tmp_path / "traces"), "--iters", "1",
                       "--trace_calls", "1", "--variants", "xla/unrolled,pallas/unrolled"])
  report = json.loads(out.read_text())
  assert [r["variant"] for r in report["variants"]] == ["xla/unrolled", "pallas/unrolled"]
  for row in report["variants"]:
    assert row["step_ms"] > 0 and row["large_copies"] == [] and set(row["group_ms_per_step"]) == set(
        kernel_trace.GROUPS)
  # On the CPU XLA's thunks show as kernels; the interpreted Pallas kernel's run inside host loops.
  groups = report["variants"][0]["group_ms_per_step"]
  assert groups["matmul"] > 0 and groups["attention"] > 0
  assert "xla/unrolled" in capsys.readouterr().out


def test_decode_inputs_hold_the_live_pages_then_the_scratch_page():
  args = profile_decode.parse_args(["--small"])  # batch 4, context 16 + 8, 8 steps a call, page 16
  live = profile_decode.live_pages(args)
  assert live == 2  # 32 tokens after the call's steps
  inputs, num_pages = profile_decode.decode_inputs(args, profile_decode.model_shape(True).model, live + 2)
  tables = inputs["block_tables"]
  assert tables.shape == (4, 4) and (tables[:, live:] == 0).all()
  assert len(set(tables[:, :live].ravel().tolist())) == 4 * live and 0 < tables.max() < num_pages
