"""Every code block of the README and docs runs as written (issue 18).

* Python blocks (```` ```python ````) of each file run in order in one fresh interpreter
  (8 fake CPU devices, so the multi-device examples run too). A block that cannot run on
  one machine starts with ``# doc-test: skip (<reason>)``; it must give a reason and still
  compile.
* Shell blocks (```` ```bash ````): every ``python -m experiments.main`` command runs as
  written with ``--config.stop_after_step=0`` added (config, data, model, optimizer,
  first checkpoint: everything but the training loop) in the default suite; the README's
  main job runs in full, followed by ``python -m experiments.plot`` on its workdir, in the
  slow suite (CI's slow stage). Installing and the test command itself are what CI runs.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^# doc-test: skip \((.+)\)\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(path: pathlib.Path, language: str) -> list[tuple[int, str]]:
  """``(first line, source)`` of every fenced block of ``language`` in ``path``."""
  out, inside, start, lines = [], None, 0, []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    match = FENCE.match(line)
    if match is None:
      if inside is not None:
        lines.append(line)
    elif inside is None:  # an opening fence
      inside, start, lines = match.group(1), number, []
    else:  # the closing fence
      if inside == language:
        out.append((start, "\n".join(lines)))
      inside = None
  return out


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["PYTHONPATH"] = str(ROOT)
  return env


PYTHON_DOCS = [p for p in DOCS if _blocks(p, "python")]


@pytest.mark.parametrize("path", PYTHON_DOCS, ids=[p.name for p in PYTHON_DOCS])
def test_python_blocks_run_as_written(path, tmp_path):
  script = []
  for line, source in _blocks(path, "python"):
    first = source.splitlines()[0] if source else ""
    if first.startswith("# doc-test"):
      match = SKIP.match(first)
      assert match and match.group(1).strip(), f"{path.name}:{line}: skip needs a reason"
      compile(source, f"{path.name}:{line}", "exec")  # still valid Python
      continue
    script.append(f"# --- {path.name}:{line}\n{source}\n")
  assert script, f"{path.name} has no runnable block"
  program = tmp_path / "blocks.py"
  program.write_text("\n".join(script))
  result = subprocess.run(
    [sys.executable, str(program)],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=_env(),
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-4000:]


def _shell_commands(path: pathlib.Path) -> list[tuple[int, list[str]]]:
  out = []
  for line, source in _blocks(path, "bash"):
    for command in re.split(r"&&|\n", source):
      argv = shlex.split(command.strip())
      if argv:
        out.append((line, argv))
  return out


def _classify(argv: list[str]) -> str:
  if argv[0] in (".", "source", "pip", "pip3") or argv[1:3] in (["-m", "venv"], ["-m", "pip"]):
    return "setup"
  if argv[:3] == ["python", "-m", "pytest"]:
    return "tests"
  if argv[:3] == ["python", "-m", "experiments.main"]:
    return "experiment"
  return "other"


SHELL = [(p, line, argv) for p in DOCS for line, argv in _shell_commands(p)]


def test_every_shell_command_is_known():
  kinds = {(p.name, line, " ".join(argv)): _classify(argv) for p, line, argv in SHELL}
  assert "experiment" in kinds.values() and "tests" in kinds.values()
  unknown = [k for k, kind in kinds.items() if kind == "other"]
  assert not unknown, f"add a check for these documented commands: {unknown}"


def _with_workdir(argv: list[str], workdir: pathlib.Path) -> list[str]:
  argv = list(argv)
  argv[argv.index("--workdir") + 1] = str(workdir)
  return [sys.executable, *argv[1:]]


EXPERIMENTS = [(p, line, argv) for p, line, argv in SHELL if _classify(argv) == "experiment"]


@pytest.mark.parametrize(
  "path,line,argv", EXPERIMENTS, ids=[f"{p.name}:{line}" for p, line, _ in EXPERIMENTS]
)
def test_documented_experiment_commands_start(path, line, argv, tmp_path):
  command = _with_workdir(argv, tmp_path / "run") + ["--config.stop_after_step=0"]
  result = subprocess.run(
    command, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900
  )
  assert result.returncode == 0, f"{path.name}:{line}: {result.stderr[-3000:]}"
  assert (tmp_path / "run" / "config.json").is_file()


@pytest.mark.slow
def test_readme_main_job_and_plot_run_as_written(tmp_path):
  (_, line, argv), *_ = [(p, n, a) for p, n, a in EXPERIMENTS if p.name == "README.md"]
  workdir = tmp_path / "main_job"
  env = dict(_env(), XLA_FLAGS="")
  run = subprocess.run(
    _with_workdir(argv, workdir), capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Final test accuracy" in run.stdout + run.stderr
  plot = subprocess.run(
    [sys.executable, "-m", "experiments.plot", str(workdir)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
  )
  assert plot.returncode == 0, plot.stderr[-3000:]
  assert any((workdir / "plots").glob("*.png"))
