"""launch/tier1.py with placement=pipelined spawns its tier-2 servers and stops them: at a normal exit
and on SIGINT (the launcher in a real process; its children found through /proc). Tier 1's own threads
move off the servers' cores and back (pin_to_free_cores)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from glinthawk_jax.tier2_launch import pin_to_free_cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid: int) -> list[int]:
  """Live (non-zombie) child processes of pid running launch/tier2.py."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read()
    except OSError:
      continue
    if int(fields[1]) == pid and fields[0] != "Z" and b"launch/tier2.py" in cmdline:
      found.append(int(entry))
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _launch(tmp_path, max_tokens):
  input_path = tmp_path / "in.jsonl"
  input_path.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": list(range(3, 3 + n)),
                                            "max_tokens": max_tokens, "ignore_eos": True}) + "\n"
                                for i, n in enumerate((4, 9, 2))))
  cmd = [sys.executable, os.path.join(REPO, "launch", "tier1.py"), "--config=configs/tiny.py",
         "--config.placement=pipelined", "--config.tier2.spawn=2", f"--input={input_path}",
         f"--output={tmp_path / 'out.jsonl'}", "--progress=false"]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_children(proc, count=2, timeout_s=60):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and proc.poll() is None:
    pids = _children(proc.pid)
    if len(pids) == count:
      return pids
    time.sleep(0.1)
  raise AssertionError(f"no {count} tier-2 children (exit {proc.poll()}): {proc.stdout.read()[-2000:]}")


def test_launcher_spawns_and_stops_tier2_at_exit(tmp_path):
  proc = _launch(tmp_path, max_tokens=4)
  pids = _wait_for_children(proc)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  summary = json.loads(out[out.index("{\n"):])
  assert summary["placement"] == "pipelined" and summary["num_requests"] == 3
  assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert not any(_alive(p) for p in pids)


def test_sigint_stops_the_tier2_children(tmp_path):
  proc = _launch(tmp_path, max_tokens=200)
  pids = _wait_for_children(proc)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode != 0
  deadline = time.monotonic() + 30  # a server stopping gracefully on a loaded 2-core machine takes a while
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(_alive(p) for p in pids), out[-2000:]


def test_a_killed_launcher_leaves_no_tier2_server(tmp_path):
  proc = _launch(tmp_path, max_tokens=200)
  pids = _wait_for_children(proc)
  proc.send_signal(signal.SIGKILL)  # no atexit, no handler: the kernel's parent-death signal must do it
  proc.wait()
  deadline = time.monotonic() + 30
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(_alive(p) for p in pids)


def test_pin_to_free_cores_moves_every_thread_and_restores():
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    pytest.skip("needs two cores")
  started, release = threading.Event(), threading.Event()
  worker = threading.Thread(target=lambda: (started.set(), release.wait()))
  worker.start()
  started.wait()
  try:
    assert pin_to_free_cores([",".join(map(str, cores))]) is None  # servers take every core: nothing moves
    unpin = pin_to_free_cores([str(cores[0])])
    assert os.sched_getaffinity(worker.native_id) == os.sched_getaffinity(0) == set(cores[1:])
    unpin()
    assert os.sched_getaffinity(worker.native_id) == os.sched_getaffinity(0) == set(cores)
  finally:
    release.set()
    worker.join()


@pytest.mark.parametrize("huge_pages", [True, False])
def test_spawned_servers_hold_their_pool_on_huge_pages_as_configured(huge_pages, monkeypatch):
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      if "[never]" in f.read():
        pytest.skip("transparent huge pages are off on this host")
  except OSError:
    pytest.skip("no transparent huge pages here")
  from configs import tiny
  from glinthawk_jax.config import model_config
  from glinthawk_jax.tier2_launch import Tier2Servers

  # The opposite in this process's environment: the config decides, not what the child would inherit.
  monkeypatch.setenv("GLIBC_TUNABLES", "" if huge_pages else "glibc.malloc.hugetlb=1")
  c = tiny.get_config()
  c.placement, c.tier2.spawn, c.tier2.kv_cache_gb, c.tier2.huge_pages = "pipelined", 1, 0.25, huge_pages
  servers = Tier2Servers(c, model_config(c))
  try:
    with open(f"/proc/{servers.pids[0]}/smaps_rollup") as f:
      huge_kib = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))
  finally:
    servers.close()
  assert (huge_kib >= 0.5 * 0.25 * 2**20) == huge_pages  # most of the 256 MiB pool, or little of it


def test_spawned_servers_take_a_context_past_the_tiny_configs():
  from configs import tiny
  from glinthawk_jax.config import model_config
  from glinthawk_jax.tier2_launch import Tier2Servers

  c = tiny.get_config()  # servers start from configs/tiny.py, whose model allows 2048 positions
  c.placement, c.tier2.spawn, c.tier2.kv_cache_gb = "pipelined", 1, 0.05
  c.model.max_position_embeddings, c.engine.max_model_len = 8192, 4096
  servers = Tier2Servers(c, model_config(c))
  try:
    assert servers.client.allocate([0], expected_tokens=3000) == [0]
  finally:
    servers.close()
