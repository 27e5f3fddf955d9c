"""infra/ manifests validate against the KubeRay CRD schemas in ../shared/crds, strictly:
a field the schema does not know (a typo Kubernetes would silently prune) fails too."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout (tests/unit/ is two below it)
CRDS = ROOT.parent / "shared" / "crds"
K8S = ROOT / "infra" / "k8s"


def _strict(schema):
    """Forbid unknown properties wherever the schema lists properties and does not
    declare them open (x-kubernetes-preserve-unknown-fields / additionalProperties)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=1)
def _crd_schemas():
    out = {}
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for v in crd["spec"]["versions"]:
            out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = _strict(v["schema"]["openAPIV3Schema"])
    return out


def _ray_documents():
    """(file, document) for every ray.io document, including RayJobs embedded in ConfigMaps."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if doc.get("kind") == "ConfigMap":
                for text in doc.get("data", {}).values():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and str(inner.get("apiVersion", "")).startswith("ray.io/"):
                        yield f"{path.name} (ConfigMap {doc['metadata']['name']})", inner
            elif str(doc.get("apiVersion", "")).startswith("ray.io/"):
                yield path.name, doc


pytestmark = pytest.mark.skipif(not CRDS.exists(), reason="../shared/crds not beside the checkout")


def test_every_kind_is_present():
    kinds = {doc["kind"] for _, doc in _ray_documents()}
    assert {"RayJob", "RayCronJob", "RayCluster"} <= kinds


@pytest.mark.parametrize("name, doc", list(_ray_documents()), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_manifest_validates_against_its_crd(name, doc):
    schema = _crd_schemas()[(doc["apiVersion"], doc["kind"])]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_a_typo_is_caught():
    schema = _crd_schemas()[("ray.io/v1", "RayJob")]
    doc = yaml.safe_load((K8S / "rayjob-embed.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc))


def test_nightly_entrypoints_and_config_agree():
    from sparse_embed.jobs.nightly_config import parse

    cm = yaml.safe_load((K8S / "nightly-config.yaml").read_text())
    parse(yaml.safe_load(cm["data"]["nightly.yaml"]))  # the shipped config is valid
    for name, doc in _ray_documents():
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        if "nightly" in spec.get("entrypoint", ""):
            assert spec["entrypoint"].split()[:2] == ["sparse-embed", "nightly"]
            mounts = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            assert any(m["mountPath"] == "/etc/sparse-embed" for m in mounts), name
