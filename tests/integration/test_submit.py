"""`ddm submit` against a real Ray head with its dashboard and job server, token authentication on
(Ray's default for local clusters), started here and stopped by killing only its own process tree
(never `ray stop`: other Ray instances share this machine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from orchestrator.submit import build_entrypoint

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKEN = uuid.uuid4().hex + uuid.uuid4().hex  # this head's own token, never ~/.ray/auth_token
HEAD: dict[str, str] = {}  # the head's GCS address, for `ddm run --address`


def _env(**extra: str) -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "RAY_AUTH_TOKEN": TOKEN, **extra})
    return env


def _ddm(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the `ray start --block` process and everything under it (GCS, raylet, dashboard,
    workers, job drivers: workers call setsid, so the process group alone would miss them)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)
    proc.wait(timeout=15)


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with the dashboard (job server) on 127.0.0.1, every port chosen free."""
    temp = f"/tmp/ddmsub{os.getpid()}"  # short: Unix socket paths are capped near 107 bytes
    dash = _free_port()
    HEAD["gcs"] = f"127.0.0.1:{_free_port()}"
    cmd = ["ray", "start", "--head", "--block", f"--port={HEAD['gcs'].split(':')[1]}", "--include-dashboard=true",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--metrics-export-port={_free_port()}", "--num-cpus=2",
           '--resources={"island-a": 2, "island-b": 2}',  # the gmm preset's islands, as a cluster's nodes carry them
           f"--object-store-memory={150 * 2**20}",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(f"{temp}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(RAY_AUTH_MODE="token"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    raise AssertionError("the job server answered without a token: token auth is off")
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # up, and asking for the token
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = Path(f"{temp}.log").read_text()[-2000:]
                raise RuntimeError(f"Ray head with dashboard did not come up at {url}:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        _kill_tree(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        os.unlink(f"{temp}.log")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the code as the job's working dir, plus a file under runs/ that must not be uploaded."""
    work = tmp_path_factory.mktemp("checkout")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("common", "worker", "orchestrator"):
        shutil.copytree(ROOT / package, work / package, ignore=skip)
    (work / "cfg").mkdir()
    shutil.copy(ROOT / "deploy" / "islands.example.yaml", work / "cfg" / "islands.yaml")
    (work / "runs").mkdir()
    shutil.copy(ROOT / "deploy" / "islands.example.yaml", work / "runs" / "islands.yaml")
    return work


@pytest.mark.ray
@pytest.mark.slow
def test_ddm_submit_runs_the_command_as_a_ray_job_and_follows_its_logs(ray_head, checkout):
    from ray.job_submission import JobSubmissionClient

    t0 = time.monotonic()
    result = _ddm("submit", "--address", ray_head, "--working-dir", str(checkout), "--",
                  "config", "show", "--config", "cfg/islands.yaml", "--set", "seed=7")
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    first = out.splitlines()[0]
    assert first.startswith("submitted job raysubmit_") and ray_head in first, first
    job_id = first.split()[2]
    # The followed logs are the resolved config, computed on the cluster from the uploaded copy.
    for line in ("name: imagenet-xl2", "seed: 7", "- name: h100x8", "island-a10g: 1.0", "simulate: false"):
        assert line in out, line
    assert out.rstrip().endswith(f"job {job_id}: SUCCEEDED")

    client = JobSubmissionClient(ray_head, headers={"authorization": f"Bearer {TOKEN}"})
    info = client.get_job_info(job_id)
    assert info.status.value == "SUCCEEDED"
    assert info.entrypoint == "python -m orchestrator config show --config cfg/islands.yaml --set seed=7"
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")  # uploaded, not a local path
    assert "seed: 7" in client.get_job_logs(job_id)
    print(f"ddm submit round trip: {took:.1f} s")


@pytest.mark.ray
@pytest.mark.slow
def test_submit_api_reports_a_failed_job_and_never_uploads_runs(ray_head, checkout):
    # submit() in a fresh process, the address from RAY_ADDRESS. runs/islands.yaml exists locally,
    # but runs/ is excluded from the upload, so the job fails on the cluster with the CLI's error.
    code = ("import sys; from orchestrator.submit import submit; "
            f"print('STATUS', submit(None, ['config', 'show', '--config', 'runs/islands.yaml'], {str(checkout)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(RAY_ADDRESS=ray_head),
                            capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.rstrip().endswith("STATUS FAILED"), out
    assert "error: --config runs/islands.yaml: no such file" in out
    assert "submitted job raysubmit_" in out


@pytest.mark.ray
@pytest.mark.slow
def test_a_wrong_token_is_one_clear_line(ray_head):
    result = _ddm("submit", "--address", ray_head, "--", "config", "show", RAY_AUTH_TOKEN="0" * 64)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the Ray job server at {ray_head} refused us"), lines
    assert "RAY_AUTH_TOKEN" in lines[0]


# A short gmm run (two experts, a router) whose train stage starts Ray actors inside the job.
TINY_RUN = ["--preset", "gmm", "--until", "train", "--set", "data.gmm_items=512", "--set", "data.gmm_components=2",
            "--set", "clustering.num_experts=2", "--set", "clustering.num_fine_centroids=8",
            "--set", "training.duration_nimg=1024", "--set", "router.training.duration_nimg=512",
            "--set", "prepare.num_workers=1", "--set", "islands.simulate=false"]


@pytest.mark.ray
@pytest.mark.slow
def test_readme_submit_with_the_runtime_env_runs_to_completion(ray_head, tmp_path):
    """`ray job submit --runtime-env deploy/runtime_env.yaml` and `ddm submit --runtime-env ...`: the job's
    env vars (RAY_TRAIN_ENABLE_STATE_TRACKING, TOKENIZERS_PARALLELISM) win over the driver's defaults
    instead of failing ray.init's runtime-env merge. The plain CLI's job stops after prepare (its ray.init
    and Ray Data actors are where a merge would fail); `ddm submit`'s runs every stage to the router."""
    from ray.job_submission import JobSubmissionClient

    env = _env(RAY_AUTH_MODE="token")  # the plain Ray CLI sends the token only in token mode
    plain_store, ddm_store = tmp_path / "plain", tmp_path / "ddm"
    cli = subprocess.run(["ray", "job", "submit", "--address", ray_head, "--working-dir", ".",
                          "--runtime-env", "deploy/runtime_env.yaml", "--", "python", "-m", "orchestrator", "run",
                          "--run", str(plain_store), *TINY_RUN, "--until", "prepare"],  # the last --until wins
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    out = cli.stdout + cli.stderr
    assert cli.returncode == 0 and "succeeded" in out, out[-3000:]
    assert "Failed to merge" not in out
    assert (plain_store / "stages" / "prepare.json").is_file() and not (plain_store / "stages" / "cluster.json").exists()

    result = _ddm("submit", "--address", ray_head, "--runtime-env", "deploy/runtime_env.yaml", "--",
                  "run", "--run", str(ddm_store), *TINY_RUN, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    job_id = result.stdout.splitlines()[0].split()[2]
    assert result.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert (ddm_store / "router" / "export.json").is_file()
    client = JobSubmissionClient(ray_head, headers={"authorization": f"Bearer {TOKEN}"})
    info = client.get_job_info(job_id)
    assert info.runtime_env["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert "pip" in info.runtime_env


@pytest.mark.ray
@pytest.mark.slow
def test_cluster_mode_refuses_a_store_inside_the_jobs_working_dir(ray_head, checkout):
    result = _ddm("submit", "--address", ray_head, "--working-dir", str(checkout), "--",
                  "run", "--run", "runs/x", *TINY_RUN)
    assert result.returncode == 1
    assert "error: run store runs/x resolves to " in result.stdout and "runtime_resources" in result.stdout
    assert "s3://" in result.stdout and "--allow-local-store" in result.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_ddm_run_against_a_token_head_without_its_token_is_one_line(ray_head, tmp_path):
    t0 = time.monotonic()
    result = _ddm("run", "--address", HEAD["gcs"], "--run", str(tmp_path / "run"), "--quiet",
                  RAY_AUTH_TOKEN="0" * 64, RAY_AUTH_MODE="token")
    assert time.monotonic() - t0 < 60  # imports included; the refusal itself is immediate
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: the Ray cluster at {HEAD['gcs']} refused our token; set RAY_AUTH_MODE=token and "
                     "RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH)"], lines


def test_entrypoint_defaults_to_run():
    assert build_entrypoint([]) == "python -m orchestrator run"
    assert build_entrypoint(["--", "--config", "a b.yaml"]) == "python -m orchestrator run --config 'a b.yaml'"
    assert build_entrypoint(["status", "s3://r/x", "--json"]) == "python -m orchestrator status s3://r/x --json"


def test_no_cluster_is_one_clear_line():
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = _ddm("submit", "--address", url, "--", "config", "show")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no Ray job server answers at {url}; start one with `ray start --head` or pass --address"]


def test_bad_args_are_refused_before_anything_is_sent(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # unreachable: only local checks can produce these errors
    bad_config = _ddm("submit", "--address", url, "--", "config", "show", "--set", "clustering.num_experts=0")
    assert bad_config.returncode == 2
    assert bad_config.stderr.strip() == "error: config: clustering.num_experts = 0: Input should be greater than or equal to 1"
    bad_command = _ddm("submit", "--address", url, "--", "nonsense")
    assert bad_command.returncode == 2 and "invalid choice: 'nonsense'" in bad_command.stderr
    bad_dir = _ddm("submit", "--address", url, "--working-dir", str(tmp_path), "--", "config", "show")
    assert bad_dir.returncode == 2
    assert bad_dir.stderr.strip() == (f"error: --working-dir {tmp_path}: not a checkout of this project "
                                      "(no orchestrator/__main__.py)")
