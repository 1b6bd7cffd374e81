"""topology.cuda_mps: the modes, what prevents MPS, and a daemon started and quit (a fake control
binary on CPU machines; the real one with the ``gpu`` marker)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from alpagym_ray import cuda_mps


@pytest.mark.parametrize("value, mode", [(False, "false"), (True, "true"), ("auto", "auto"), ("AUTO", "auto")])
def test_modes_from_yaml_values(value, mode):
    assert cuda_mps.mode_of(value) == mode


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"topology.cuda_mps must be one of \['false', 'auto', 'true'\], got 'yes'"):
        cuda_mps.mode_of("yes")


def test_false_starts_nothing():
    assert cuda_mps.start(False, local_ray=True) is None


def test_why_not_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    assert "ray start" in cuda_mps.why_not(False, True, "/bin/x")
    assert "no CUDA device" in cuda_mps.why_not(True, False, "/bin/x")
    assert "not on the PATH" in cuda_mps.why_not(True, True, None)
    assert cuda_mps.why_not(True, True, "/bin/x") is None


@pytest.mark.parametrize("mode", ["auto", "true"])
@pytest.mark.parametrize("local_ray", [True, False])
def test_a_running_daemon_is_used_as_it_is(tmp_path, monkeypatch, capsys, mode, local_ray):
    (tmp_path / "control").touch()  # the daemon's control pipe
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert cuda_mps.start(mode, local_ray=local_ray) is None
    assert f"CUDA MPS: using the daemon already running ({tmp_path})" in capsys.readouterr().out
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    monkeypatch.setattr(cuda_mps, "DEFAULT_PIPE", str(tmp_path))  # `nvidia-cuda-mps-control -d` with no env
    assert cuda_mps.running_daemon() == str(tmp_path)
    monkeypatch.setattr(cuda_mps, "DEFAULT_PIPE", str(tmp_path / "none"))
    assert cuda_mps.running_daemon() is None


def test_joining_a_running_ray_without_a_daemon(monkeypatch, capsys):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(cuda_mps, "DEFAULT_PIPE", "/nonexistent/nvidia-mps")
    assert cuda_mps.start("auto", local_ray=False) is None
    assert "before `ray start`" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="cuda_mps=true: the run joins a running Ray"):
        cuda_mps.start(True, local_ray=False)


def test_auto_without_what_it_needs_says_why_and_runs_without(monkeypatch, capsys):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(cuda_mps, "DEFAULT_PIPE", "/nonexistent/nvidia-mps")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cuda_mps.start("auto", local_ray=True) is None
    assert "CUDA MPS off: no CUDA device is visible" in capsys.readouterr().out


def test_true_without_what_it_needs_is_an_error(monkeypatch):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(cuda_mps, "DEFAULT_PIPE", "/nonexistent/nvidia-mps")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="topology.cuda_mps=true: no CUDA device"):
        cuda_mps.start(True, local_ray=True)


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    """An ``nvidia-cuda-mps-control`` on the PATH that logs its arguments, stdin and pipe directory."""
    log = tmp_path / "calls.log"
    exe = tmp_path / "bin" / cuda_mps.CONTROL
    exe.parent.mkdir()
    exe.write_text(f"#!{sys.executable}\nimport os, sys\n"
                   f"open({str(log)!r}, 'a').write(repr((sys.argv[1:], os.environ['CUDA_MPS_PIPE_DIRECTORY'], "
                   "'' if sys.argv[1:] else sys.stdin.read())) + '\\n')\n"
                   "sys.exit(int(os.environ.get('FAKE_MPS_RC', '0')))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(cuda_mps, "DEFAULT_PIPE", str(tmp_path / "no-daemon"))
    for k in cuda_mps.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return log


def test_a_private_daemon_is_started_exported_and_quit(fake_control):
    daemon = cuda_mps.start("auto", local_ray=True)
    assert daemon is not None
    pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    assert pipe == f"{daemon.root}/pipe" and os.path.isdir(pipe)
    assert os.environ["CUDA_MPS_LOG_DIRECTORY"] == f"{daemon.root}/log"
    # a child process (as Ray's are) sees the daemon's pipe directory
    assert subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
                          capture_output=True, text=True).stdout.strip() == pipe
    daemon.stop()
    calls = [eval(line) for line in fake_control.read_text().splitlines()]
    assert calls == [(["-d"], pipe, ""), ([], pipe, "quit\n")]
    assert not any(k in os.environ for k in cuda_mps.ENV_KEYS)  # restored
    assert not os.path.exists(daemon.root)


def test_a_daemon_that_fails_to_start(fake_control, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_MPS_RC", "3")
    assert cuda_mps.start("auto", local_ray=True) is None
    assert "CUDA MPS off: nvidia-cuda-mps-control -d failed (exit 3)" in capsys.readouterr().out
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    with pytest.raises(RuntimeError, match=r"cuda_mps=true: nvidia-cuda-mps-control -d failed \(exit 3\)"):
        cuda_mps.start(True, local_ray=True)


def test_a_bad_mode_stops_the_train_command_before_anything_runs(tmp_path, capsys):
    from alpagym_ray.commands import train

    assert train.main([f"run_dir={tmp_path / 'run'}", "topology.cuda_mps=maybe"]) == 2
    assert "topology.cuda_mps must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_the_real_daemon_serves_a_cuda_child(monkeypatch):
    for k in cuda_mps.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    if cuda_mps.running_daemon():
        pytest.skip("an MPS daemon already runs on this machine")
    daemon = cuda_mps.start(True, local_ray=True)
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(float(torch.ones(4, device='cuda').sum()))"],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "4.0", out.stderr
        assert any(f.startswith("control") for f in os.listdir(f"{daemon.root}/log"))
    finally:
        daemon.stop()
