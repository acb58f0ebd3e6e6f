"""Where a run's processes run: here (`local`), N processes on this machine (`deepspeed`), or a Kubernetes Job.

    launch_local(settings, cfg, run_id, run_dir)                 # one process: this one (DeepSpeed, world 1)
    launch_deepspeed(settings, cfg, run_id, run_dir, nproc=2)     # `python -m deepspeed.launcher.runner` (gloo on CPU)
    objs = k8s_manifest(settings, cfg, run_id, nproc=8); print(to_yaml(objs)); submit(objs)

`deepspeed` writes the resolved config to RUN_DIR/config.yaml and starts the DeepSpeed launcher, which
spawns `python -m trainer.recipe` once per rank with RANK/WORLD_SIZE/MASTER_* set (on a machine without
GPUs it still runs N CPU processes; the recipe picks gloo). `k8s` builds, with the `kubernetes` client's
models, a ConfigMap holding that config and a Job whose one pod runs `klong train --launcher deepspeed
--nproc <gpus>` on the data home's PersistentVolumeClaim, with GPU requests, /dev/shm for NCCL, and the
Kafka settings in env (so lineage events reach the same topics). `submit` creates both in the namespace
of the current kubeconfig and follows the Job until it succeeds or fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from core.settings import Settings
from schemas.errors import ConfigError, KlongError
from trainer.config import RunConfig, dump_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_MOUNT = "/etc/klong"
_DIST_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE", "LOCAL_SIZE"}


def launch_local(settings: Settings, cfg: RunConfig, run_id: str, run_dir: Path,
                 resume: Optional[Path] = None) -> int:
    from trainer.recipe import run

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        run(settings, cfg, run_id, run_dir, resume)
    finally:  # the group of one stays up for another local run here; its env must not leak into children
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0


def deepspeed_command(settings: Settings, run_id: str, run_dir: Path, nproc: int, master_port: int,
                      resume: Optional[Path] = None) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(master_port), "--no_local_rank", "--module", "trainer.recipe",
           "--home", str(settings.home), "--run-dir", str(run_dir), "--run-id", run_id]
    if settings.bootstrap_servers:
        cmd += ["--bootstrap-servers", settings.bootstrap_servers]
    cmd += ["--topic-prefix", settings.topics.prefix]
    if resume:
        cmd += ["--resume", str(resume)]
    return cmd


def launch_deepspeed(settings: Settings, cfg: RunConfig, run_id: str, run_dir: Path, nproc: int,
                     resume: Optional[Path] = None) -> int:
    from services.broker import free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    # The launcher sets each rank's RANK/WORLD_SIZE/MASTER_*; stale values (a local run in this process) must go.
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(deepspeed_command(settings, run_id, run_dir, nproc, free_port(), resume), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        raise


# ---- Kubernetes ---------------------------------------------------------------------------------


def k8s_name(run_id: str) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-', <= 63 chars) for the Job and its ConfigMap."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"klong-train-{run_id}".lower()).strip("-")
    return name[:63].rstrip("-")


def _pod_path(settings: Settings, cfg: RunConfig, path: Path) -> str:
    """A path under the local data home -> the same path under the pod's mount of the home."""
    try:
        return str(Path(cfg.k8s.home_mount) / Path(path).resolve().relative_to(settings.home))
    except ValueError:
        return str(path)


def k8s_manifest(settings: Settings, cfg: RunConfig, run_id: str, nproc: Optional[int] = None,
                 resume: Optional[Path] = None) -> list:
    """[V1ConfigMap, V1Job] for one training run."""
    from kubernetes import client

    k = cfg.k8s
    gpus = nproc if nproc is not None else k.gpus
    bootstrap = k.bootstrap_servers or settings.bootstrap_servers
    if cfg.lineage and (not bootstrap or re.search(r"(^|,)(127\.0\.0\.1|localhost)(:|,|$)", bootstrap)):
        raise ConfigError("k8s.bootstrap_servers: the pod needs a Kafka it can reach for lineage events "
                          f"(got {bootstrap or 'none'}; the embedded broker on this machine is not reachable from "
                          "the cluster): set k8s.bootstrap_servers=host:port, or lineage=false")
    name = k8s_name(run_id)
    labels = {"app.kubernetes.io/name": "klong-trainer", "klong/run-id": k8s_name(run_id)[len("klong-train-"):]}
    command = ["klong", "train", "--home", k.home_mount, "--dataset", cfg.dataset, "--mode", cfg.mode,
               "--config", f"{CONFIG_MOUNT}/config.yaml", "--launcher", "deepspeed", "--nproc", str(max(gpus, 1)),
               "--run-id", run_id]
    if resume:
        command += ["--resume", _pod_path(settings, cfg, resume)]
    env = [client.V1EnvVar(name="KLONG_HOME", value=k.home_mount),
           client.V1EnvVar(name="KLONG_TOPIC_PREFIX", value=settings.topics.prefix)]
    if bootstrap:
        env.append(client.V1EnvVar(name="KLONG_BOOTSTRAP_SERVERS", value=bootstrap))
    env_from = [client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=k.kafka_secret))] if k.kafka_secret else None
    limits = {"cpu": k.cpu, "memory": k.memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container = client.V1Container(
        name="trainer", image=k.image, command=command, env=env, env_from=env_from,
        resources=client.V1ResourceRequirements(requests={"cpu": k.cpu, "memory": k.memory}, limits=limits),
        volume_mounts=[client.V1VolumeMount(name="home", mount_path=k.home_mount),
                       client.V1VolumeMount(name="config", mount_path=CONFIG_MOUNT, read_only=True),
                       client.V1VolumeMount(name="shm", mount_path="/dev/shm")])
    volumes = [client.V1Volume(name="home", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                   claim_name=k.home_pvc)),
               client.V1Volume(name="config", config_map=client.V1ConfigMapVolumeSource(name=name)),
               client.V1Volume(name="shm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory"))]
    pod = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(containers=[container], volumes=volumes, restart_policy="Never",
                              service_account_name=k.service_account))
    job = client.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=client.V1ObjectMeta(name=name, namespace=k.namespace, labels=labels),
        spec=client.V1JobSpec(template=pod, backoff_limit=k.backoff_limit,
                              ttl_seconds_after_finished=k.ttl_seconds_after_finished))
    config_map = client.V1ConfigMap(
        api_version="v1", kind="ConfigMap", metadata=client.V1ObjectMeta(name=name, namespace=k.namespace, labels=labels),
        data={"config.yaml": dump_yaml(cfg)})
    return [config_map, job]


def to_dicts(objs: list) -> list[dict]:
    from kubernetes import client

    return [client.ApiClient().sanitize_for_serialization(o) for o in objs]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable `|` blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(objs: list) -> str:
    return yaml.dump_all(to_dicts(objs), Dumper=_Dumper, sort_keys=False)


def submit(objs: list, poll_s: float = 5.0, out=None) -> int:
    """Creates the ConfigMap and the Job in the current kubeconfig's cluster; follows the Job to its end."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config_map, job = objs
    out = out or sys.stdout
    try:
        config.load_kube_config()
    except Exception as e:  # the loader raises several unrelated types (ConfigException, OSError, TypeError)
        raise ConfigError(f"no usable kubeconfig ({e}); use --dry-run to print the manifest instead") from e
    ns, name = job.metadata.namespace, job.metadata.name
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    try:
        core.create_namespaced_config_map(ns, config_map)
        batch.create_namespaced_job(ns, job)
    except ApiException as e:
        raise KlongError(f"Kubernetes refused job {ns}/{name}: {e.status} {e.reason}: {e.body}") from e
    print(f"submitted job {ns}/{name}; logs: kubectl logs -n {ns} -f job/{name}", file=out, flush=True)
    last = None
    while True:
        st = batch.read_namespaced_job_status(name, ns).status
        now = (st.active or 0, st.succeeded or 0, st.failed or 0)
        if now != last:
            print(f"job {name}: active {now[0]}, succeeded {now[1]}, failed {now[2]}", file=out, flush=True)
            last = now
        if st.succeeded:
            return 0
        if st.failed and st.failed > job.spec.backoff_limit:
            return 1
        time.sleep(poll_s)
