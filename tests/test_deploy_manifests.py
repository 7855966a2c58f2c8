"""Every launcher command line in deploy/ (Kubernetes YAML, the Slurm script) and in the deployment
docs passes only flags the launchers define and config keys the config tree has; values without
shell or Kubernetes variables are parsed by the launchers' own absl flags, so a renamed flag or key,
or a value of the wrong type, fails here."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from glinthawk_jax.config import REPO_ROOT

LAUNCHERS = ("launch/tier1.py", "launch/tier2.py")
DOCS = ("deploy/README.md", "docs/MULTI_HOST.md")

# Runs in a fresh process per launcher (each defines --config): imports the launcher without running
# main, parses each command line's arguments that are free of shell or Kubernetes variables with the
# real absl FLAGS (config_flags reads the --config.a.b overrides from sys.argv and defines a flag for
# each, removed again before the next line), then checks the names of the others.
_CHECKER = r"""
import json, runpy, sys
import ml_collections
from absl import flags
runpy.run_path(sys.argv[1], run_name="flag_check")
FLAGS = flags.FLAGS

def parse(args):
  for name in [n for n in FLAGS if n.startswith("config.")]:
    delattr(FLAGS, name)
  FLAGS.unparse_flags()
  sys.argv = ["check"] + args
  FLAGS(sys.argv)

def problems(args):
  found = []
  for arg in args:
    name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
    bool_negation = name.startswith("no") and name[2:] in FLAGS and FLAGS[name[2:]].boolean
    if not name:
      found.append(f"{arg!r}: not a --flag")
    elif not name.startswith("config.") and name not in FLAGS and not bool_negation:
      found.append(f"--{name}: no such flag")
  config_files = [a for a in args if a.startswith("--config=")]
  if len(config_files) != 1 or "$" in config_files[0]:
    found.append(f"{' '.join(config_files) or '--config'}: expected one literal config file")
  if found:
    return found
  try:
    parse([a for a in args if "$" not in a])
  except Exception as e:
    return [f"{type(e).__name__}: {e}"]
  for arg in args:
    key = arg[2:].partition("=")[0]
    if key.startswith("config.") and "$" in arg:
      node = FLAGS.config
      for part in key.split(".")[1:]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          found.append(f"--{key}: no such config key")
          break
        node = node[part]
      else:
        if isinstance(node, ml_collections.ConfigDict):
          found.append(f"--{key}: a section, not a value")
  return found

print(json.dumps([problems(args) for args in json.loads(sys.argv[2])]))
"""


def launcher_problems(launcher: str, command_lines: list[list[str]]) -> list[list[str]]:
  """For each argument list of `launcher`, what is wrong with it (empty = nothing)."""
  run = subprocess.run([sys.executable, "-c", _CHECKER, launcher, json.dumps(command_lines)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def shell_commands(text: str) -> list[tuple[str, list[str]]]:
  """(launcher, args) of each `python launch/tier*.py ...` in shell text, quoted `bash -c` bodies too.

  A command's arguments run to the end of its line or to a shell operator; every word in between is
  kept, so anything that is not a --flag shows up in the check instead of being skipped.
  """
  found = []
  lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|<>\n")
  lexer.whitespace, lexer.whitespace_split = " \t\r", True
  tokens = list(lexer)
  for i, token in enumerate(tokens):
    if any(f"{launcher} " in token for launcher in LAUNCHERS):  # a quoted script: look inside
      found += shell_commands(token)
    elif token in LAUNCHERS:
      args = []
      for arg in tokens[i + 1:]:
        if set(arg) <= set(";&|<>\n"):
          break
        args.append(arg)
      found.append((token, args))
  return found


def yaml_commands(path: str) -> list[tuple[str, list[str]]]:
  """(launcher, args) of each container in a multi-document Kubernetes YAML that runs a launcher."""
  found = []

  def visit(node):
    if isinstance(node, dict):
      if "image" in node:
        argv = [str(a) for a in node.get("command", []) + node.get("args", [])]
        hits = [i for i, a in enumerate(argv) if a in LAUNCHERS]
        found.extend((argv[i], argv[i + 1:]) for i in hits)
      for value in node.values():
        visit(value)
    elif isinstance(node, list):
      for value in node:
        visit(value)

  with open(path) as f:
    for document in yaml.safe_load_all(f):
      visit(document)
  return found


def markdown_commands(path: str) -> list[tuple[str, list[str]]]:
  with open(path) as f:
    blocks = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", f.read(), re.M | re.S)
  return [c for block in blocks for c in shell_commands(block)]


def _sources() -> dict[str, list[tuple[str, list[str]]]]:
  sources = {}
  for path in sorted(glob.glob(os.path.join(REPO_ROOT, "deploy", "kubernetes", "*.yaml"))):
    sources[os.path.relpath(path, REPO_ROOT)] = yaml_commands(path)
  for path in sorted(glob.glob(os.path.join(REPO_ROOT, "deploy", "slurm", "*.sbatch"))):
    with open(path) as f:
      sources[os.path.relpath(path, REPO_ROOT)] = shell_commands(f.read())
  for path in DOCS:
    sources[path] = markdown_commands(os.path.join(REPO_ROOT, path))
  return sources


@pytest.fixture(scope="module")
def sources():
  return _sources()


def test_every_source_runs_the_launchers_it_should(sources):
  launchers = {path: sorted(launcher for launcher, _ in found) for path, found in sources.items()}
  assert launchers["deploy/kubernetes/tier2.yaml"] == ["launch/tier2.py"]
  assert launchers["deploy/kubernetes/tier1-job.yaml"] == ["launch/tier1.py"]
  assert launchers["deploy/slurm/glinthawk.sbatch"] == ["launch/tier1.py", "launch/tier2.py"]
  for path in DOCS:
    assert set(launchers[path]) == set(LAUNCHERS), path


def test_every_flag_and_config_key_exists(sources):
  bad = []
  for launcher in LAUNCHERS:
    lines = [(path, args) for path, found in sources.items() for name, args in found if name == launcher]
    problems = launcher_problems(launcher, [args for _, args in lines])
    bad += [f"{path}: {launcher} {' '.join(args)}\n  {p}" for (path, args), p in zip(lines, problems) if p]
  assert not bad, "\n".join(bad)


def test_the_check_catches_renamed_flags_keys_and_bad_values():
  got = launcher_problems("launch/tier2.py", [
      ["--config=configs/tiny.py", "--kv_cache_gib=16", "--auth_token=$(TOKEN)"],
      ["--config=configs/tiny.py", "--config.engine.page_sise=16"],
      ["--config=configs/tiny.py", "--config.tier2.adresses=$ADDRESSES"],
      ["--config=configs/tiny.py", "--port=fifty"],
      ["--config=$CONFIG"],
      ["--config=configs/tiny.py", "--noshm", "--config.engine.page_size=32", "--port=$PORT"],
  ])
  assert got[0] == ["--kv_cache_gib: no such flag"]
  assert len(got[1]) == 1 and "page_sise" in got[1][0]  # config_flags' own error
  assert got[2] == ["--config.tier2.adresses: no such config key"]
  assert len(got[3]) == 1 and "fifty" in got[3][0]
  assert got[4] == ["--config=$CONFIG: expected one literal config file"]
  assert got[5] == []


def test_the_tier1_job_addresses_every_tier2_pod():
  with open(os.path.join(REPO_ROOT, "deploy", "kubernetes", "tier2.yaml")) as f:
    service, statefulset = yaml.safe_load_all(f)
  with open(os.path.join(REPO_ROOT, "deploy", "kubernetes", "tier1-job.yaml")) as f:
    (job,) = yaml.safe_load_all(f)
  name, replicas = statefulset["metadata"]["name"], statefulset["spec"]["replicas"]
  assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
  assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
  port = service["spec"]["ports"][0]["port"]
  ((_, args),) = yaml_commands(os.path.join(REPO_ROOT, "deploy", "kubernetes", "tier1-job.yaml"))
  addresses = [a.partition("=")[2] for a in args if a.startswith("--config.tier2.addresses=")][0]
  assert addresses.split(",") == [f"{name}-{i}.{service['metadata']['name']}:{port}" for i in range(replicas)]
  wait = job["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
  assert re.search(r"for i in ([\d ]+);", wait).group(1).split() == [str(i) for i in range(replicas)]
