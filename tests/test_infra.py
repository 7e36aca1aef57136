"""The deployment files in infra/ parse, agree with each other and name things that exist: one Ray version
(the pinned one), one image, entrypoints that are real modules taking those flags, configs that load."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from tests.procs import ROOT

INFRA = ROOT / "infra"
RAY_VERSION = "2.60.0"
APP_DIR = "/home/ray/app"  # WORKDIR in infra/Dockerfile: the repository's files live here in the image


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_manifests() -> dict[str, list[dict]]:
    return {str(p.relative_to(ROOT)): docs(p) for p in sorted(INFRA.rglob("*.yaml"))}


def rayjobs() -> list[dict]:
    return [d for ds in all_manifests().values() for d in ds if d.get("kind") == "RayJob"]


def cluster_specs() -> list[dict]:
    specs = [d["spec"] for ds in all_manifests().values() for d in ds if d.get("kind") == "RayCluster"]
    return specs + [j["spec"]["rayClusterSpec"] for j in rayjobs()]


def images() -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image" and isinstance(v, str):
                    found.add(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for name, ds in all_manifests().items():
        if "k8s/cronjobs" not in name:  # the CronJobs run kubectl, not the job
            walk(ds)
    return found


def test_every_manifest_parses_and_has_what_its_kind_needs():
    kinds = {d.get("kind") for ds in all_manifests().values() for d in ds}
    assert {"RayCluster", "RayJob", "CronJob", "Kustomization"} <= kinds
    assert len(rayjobs()) == 2
    for job in rayjobs():
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["metadata"]["generateName"]  # a new RayJob per scheduled run
    aws = docs(INFRA / "aws" / "cluster.yaml")[0]
    assert aws["provider"]["type"] == "aws" and aws["head_node_type"] in aws["available_node_types"]


def test_one_ray_version_everywhere():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"ray\[[^\]]*\]==' + re.escape(RAY_VERSION) + '"', pyproject)
    assert f"ray=={RAY_VERSION}" in (ROOT / "constraints.txt").read_text()
    base = re.search(r"^FROM (\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-"), base
    for spec in cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION


def test_one_image_everywhere_and_the_same_cluster_shape():
    imgs = images()
    assert len(imgs) == 1, imgs
    aws = docs(INFRA / "aws" / "cluster.yaml")[0]
    assert aws["docker"]["image"] in imgs
    specs = cluster_specs()
    assert all(s == specs[0] for s in specs), "RayCluster and RayJob cluster specs differ"
    head = specs[0]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"]
    gpu = [g for g in specs[0]["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]
           ["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    prod = load_config(ROOT / "jobs" / "configs" / "prod.yaml")
    assert prod.train.use_gpu and prod.train.num_workers <= sum(g["maxReplicas"] for g in gpu)


def test_dockerfile_copies_what_exists_into_the_app_dir():
    text = (INFRA / "Dockerfile").read_text()
    assert f"WORKDIR {APP_DIR}" in text
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src


def entrypoints() -> list[str]:
    out = [j["spec"]["entrypoint"] for j in rayjobs()]
    for path in (INFRA / "k8s" / "raycluster.yaml", INFRA / "aws" / "cluster.yaml"):
        out += re.findall(r"-- (python -m jobs\.\S+ .*)$", path.read_text(), re.M)
    return out


@pytest.mark.parametrize("entrypoint", entrypoints())
def test_entrypoints_name_real_modules_flags_and_configs(entrypoint, capsys):
    argv = shlex.split(re.sub(r"\$\(date [^)]*\)", "2026-01-04", entrypoint))
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    module = importlib.import_module(argv[2])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = capsys.readouterr().out
    args = argv[3:]
    for a in args:
        if a.startswith("--"):
            assert a in help_text, f"{argv[2]} has no flag {a}"
    config = args[args.index("--config") + 1]
    assert config.startswith(f"{APP_DIR}/"), config
    local = ROOT / config[len(APP_DIR) + 1:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    load_config(local, sets)  # exists and validates, overrides included


def test_cronjobs_create_the_rayjobs_from_the_generated_configmap():
    kust = docs(INFRA / "k8s" / "kustomization.yaml")[0]
    gen = kust["configMapGenerator"][0]
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True
    for f in gen["files"] + kust["resources"]:
        assert (INFRA / "k8s" / f).exists(), f
    crons = [d for d in docs(INFRA / "k8s" / "cronjobs.yaml") if d["kind"] == "CronJob"]
    assert len(crons) == 2
    for c in crons:
        pod = c["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["volumes"][0]["configMap"]["name"] == gen["name"]
        cmd = pod["containers"][0]["command"]
        assert cmd[:3] == ["kubectl", "create", "-f"]
        assert Path(cmd[3]).name in gen["files"]
        assert c["spec"]["concurrencyPolicy"] == "Forbid"


def test_runtime_env_keeps_the_upload_small():
    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert {".git", ".venv", "data", "artifacts", "output"} <= set(env["excludes"])
    assert "pip" not in env and "conda" not in env  # dependencies come from the image / the head's venv
