"""ServerProcess: the child's log survives the parent polling it (shared file offset)."""

import textwrap
import time

from tier2_cpu.process import ServerProcess


def test_polling_the_log_does_not_overwrite_the_childs_lines(tmp_path):
  script = tmp_path / "chatty.py"
  script.write_text(textwrap.dedent("""
      import sys, time
      for i in range(3000):
        print(f"line {i}", flush=True)
        if i % 100 == 0:
          time.sleep(0.001)
      print("tier2 ready on 127.0.0.1:1", flush=True)
      time.sleep(30)
  """))

  class Chatty(ServerProcess):
    launcher = str(script)

  server = Chatty([])
  try:
    polls, deadline = 0, time.monotonic() + 20
    while "ready on" not in server.output() and time.monotonic() < deadline:  # polls while the child writes
      assert server.process.poll() is None, server.output()[-2000:]
      polls += 1
    assert server.wait_ready(10) == "127.0.0.1:1"
    lines = server.output().splitlines()
    assert lines[:3000] == [f"line {i}" for i in range(3000)], f"log mangled after {polls} polls"
  finally:
    server.stop()
