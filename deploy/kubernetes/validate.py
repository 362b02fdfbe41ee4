#!/usr/bin/env python3
"""validate.py: checks the Kubernetes manifests of this directory without a cluster.

    python3 validate.py [--kubernetes-version X.Y.Z ...] [--self-test]

Needs kubernetes-validate (PyPI; deploy/check-deploy.sh installs it in a virtualenv), which
ships the JSON schemas of every built-in Kubernetes kind. Each document of every manifest
named by kustomization.yaml is checked:

- built-in kinds (Deployment, Service, Secret, ...) against kubernetes-validate's strict
  schemas (an unknown or misspelt field is an error) for each Kubernetes version given;
- the custom resources (KEDA's ScaledObject and TriggerAuthentication, the RabbitMQ Cluster
  Operator's RabbitmqCluster) against the schemas in schemas/, strict too, whose Kubernetes
  types (metadata, pod specs, resources, HPA behaviour) are kubernetes-validate's;
- a kind with no schema at all is an error, not a warning;
- quantities parse, and references between the objects: kustomization.yaml lists every manifest here; every Secret
  and ConfigMap key a pod or the TriggerAuthentication uses exists; probes name declared
  ports; the ScaledObject scales a Deployment here and watches the queue that the worker's
  --config file (in the ConfigMap) consumes; the Service selects pods of a Deployment and
  targets their ports.

--self-test breaks the manifests in memory in ways a reviewer could miss (a misspelt field in
each kind of schema, a wrong KEDA mode, a missing Secret key, a port name typo, ...) and
fails unless every one of them is refused, so a validator that checks nothing cannot pass.

Exit status 0 when everything passed, 1 otherwise; one line per document or failure.
"""

import argparse
import copy
import json
import pathlib
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate import utils as kv

HERE = pathlib.Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
# A resource.Quantity as the API server parses it (the schemas only say "string").
QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+)?$")


def load_manifests():
    """{file name: [documents]} for kustomization.yaml and every resource it lists."""
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    files = {"kustomization.yaml": [kustomization]}
    for name in kustomization.get("resources", []):
        path = HERE / name
        files[name] = [d for d in yaml.safe_load_all(path.read_text()) if d] if path.exists() else []
    return files


def custom_schemas():
    """{(apiVersion, kind): schema} of schemas/."""
    found = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        found[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return found


def k8s_definitions(version):
    """kubernetes-validate's strict definitions of the nearest version not above `version`."""
    wanted = kv.major_minor(version)
    nearest = [v for v in kv.all_versions() if kv.major_minor(v) <= wanted][-1]
    return kv.schema_contents(
        "kubernetes-json-schema/v%s-local-strict/_definitions.json" % nearest, version
    )


def check_schema(doc, version, customs, definitions):
    """None if `doc` passes its schema for `version`, else why not."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in customs:
        registry = referencing.Registry().with_resource(
            K8S_DEFINITIONS_ID, referencing.Resource.from_contents(definitions)
        )
        validator = jsonschema.Draft202012Validator(customs[key], registry=registry)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            return "%s: %s" % (".".join(str(p) for p in e.absolute_path) or "(top)", e.message)
        return None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        return "%s: %s" % (".".join(str(p) for p in e.path), e.message)
    except kv.SchemaNotFoundError:
        return "no schema for %s %s (neither built in nor in schemas/)" % key
    return None


def pods(files):
    """(file, Deployment, its pod spec) for every Deployment."""
    for name, docs in files.items():
        for doc in docs:
            if doc.get("kind") == "Deployment":
                yield name, doc, doc["spec"]["template"]["spec"]


def data_keys(files, kind):
    """{object name: set of its data keys} of every `kind` (Secret or ConfigMap)."""
    keys = {}
    for docs in files.values():
        for doc in docs:
            if doc.get("kind") == kind:
                name = doc["metadata"]["name"]
                keys[name] = set(doc.get("data", {})) | set(doc.get("stringData", {}))
    return keys


def check_references(files):
    """Problems with the references between the objects, as strings."""
    problems = []
    kustomization = files["kustomization.yaml"][0]
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in HERE.glob("*.yaml")} - {"kustomization.yaml"}
    for name in sorted(present - listed):
        problems.append("kustomization.yaml does not list %s" % name)
    for name in sorted(listed):
        if not files.get(name):
            problems.append("kustomization.yaml lists %s, which is missing or empty" % name)

    secrets, configmaps = data_keys(files, "Secret"), data_keys(files, "ConfigMap")

    def need(kind, table, obj, key, where):
        if obj not in table:
            problems.append("%s: %s %s is not defined here" % (where, kind, obj))
        elif key is not None and key not in table[obj]:
            problems.append("%s: %s %s has no key %s" % (where, kind, obj, key))

    deployments = {}
    for name, deployment, spec in pods(files):
        where = "%s %s" % (name, deployment["metadata"]["name"])
        deployments[deployment["metadata"]["name"]] = deployment
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in selector.items()):
            problems.append("%s: the selector does not match the pod labels" % where)
        for volume in spec.get("volumes", []):
            sources = [volume] + volume.get("projected", {}).get("sources", [])
            for source in sources:
                for kind, field, table, name_key in (
                    ("Secret", "secret", secrets, "secretName"),
                    ("ConfigMap", "configMap", configmaps, "name"),
                ):
                    if field in source:
                        ref = source[field]
                        obj = ref.get(name_key) or ref.get("name")
                        items = ref.get("items") or [{"key": None}]
                        for item in items:
                            need(kind, table, obj, item["key"], where)
        for container in spec["containers"]:
            for bound in ("requests", "limits"):
                for resource, value in container.get("resources", {}).get(bound, {}).items():
                    if not QUANTITY.match(str(value)):
                        problems.append("%s: %s.%s %r is no quantity" % (where, bound, resource, value))
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append("%s: %s uses port %s, not declared" % (where, probe, port))
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for missing in sorted(mounts - volumes):
                problems.append("%s: volume %s is mounted but not defined" % (where, missing))

    for name, docs in files.items():
        for doc in docs:
            where = "%s %s %s" % (name, doc.get("kind"), doc.get("metadata", {}).get("name"))
            if doc.get("kind") == "TriggerAuthentication":
                for ref in doc["spec"].get("secretTargetRef", []):
                    need("Secret", secrets, ref["name"], ref["key"], where)
            if doc.get("kind") == "ScaledObject":
                target = deployments.get(doc["spec"]["scaleTargetRef"]["name"])
                if target is None:
                    problems.append("%s: scaleTargetRef names no Deployment here" % where)
                    continue
                queues = set()
                for volume in target["spec"]["template"]["spec"].get("volumes", []):
                    ref = volume.get("configMap")
                    for item in (ref or {}).get("items", []):
                        text = next(
                            (
                                d.get("data", {}).get(item["key"])
                                for docs2 in files.values()
                                for d in docs2
                                if d.get("kind") == "ConfigMap"
                                and d["metadata"]["name"] == ref["name"]
                            ),
                            None,
                        )
                        if text is not None:
                            queues.add(tomllib.loads(text).get("queue", "warren.tasks"))
                for trigger in doc["spec"]["triggers"]:
                    if trigger["type"] == "rabbitmq":
                        queue = trigger["metadata"].get("queueName")
                        if queue not in queues:
                            problems.append(
                                "%s: watches queue %s, the worker consumes %s"
                                % (where, queue, sorted(queues))
                            )
            if doc.get("kind") == "Service":
                selected = [
                    d
                    for d in deployments.values()
                    if all(
                        d["spec"]["template"]["metadata"].get("labels", {}).get(k) == v
                        for k, v in doc["spec"].get("selector", {}).items()
                    )
                ]
                if not selected:
                    problems.append("%s: selects no Deployment here" % where)
                for port in doc["spec"].get("ports", []):
                    target = port.get("targetPort")
                    for d in selected:
                        names = {
                            p.get("name")
                            for c in d["spec"]["template"]["spec"]["containers"]
                            for p in c.get("ports", [])
                        }
                        if isinstance(target, str) and target not in names:
                            problems.append("%s: targetPort %s is no port of its pods" % (where, target))
    return problems


def validate(files, versions, customs, verbose):
    """Failure lines for `files` (empty: all passed)."""
    failures = []
    for version in versions:
        definitions = k8s_definitions(version)
        for name, docs in files.items():
            for doc in docs:
                if doc.get("kind") == "Kustomization":
                    continue
                label = "%s %s/%s (Kubernetes %s)" % (
                    name, doc.get("kind"), doc.get("metadata", {}).get("name"), version)
                why = check_schema(doc, version, customs, definitions)
                if why:
                    failures.append("FAIL %s: %s" % (label, why))
                elif verbose:
                    print("ok   %s" % label)
    failures.extend("FAIL references: %s" % p for p in check_references(files))
    return failures


def breakages():
    """(what, how to break the loaded manifests) for --self-test."""

    def doc(files, kind, name=None):
        for docs in files.values():
            for d in docs:
                if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
                    return d
        raise KeyError(kind)

    def worker(files):
        return doc(files, "Deployment", "warren-worker")

    def container(files):
        return worker(files)["spec"]["template"]["spec"]["containers"][0]

    return [
        ("a misspelt Deployment field", lambda f: worker(f)["spec"]["template"]["spec"].update(
            terminationGracePeriodSecond=45)),
        ("a probe port that is not a port or a number", lambda f: container(f)["readinessProbe"][
            "httpGet"].update(port="metric")),
        ("a resource request that is no quantity", lambda f: container(f)["resources"][
            "requests"].update(cpu="a lot")),
        ("a KEDA mode that does not exist", lambda f: doc(f, "ScaledObject")["spec"]["triggers"][0][
            "metadata"].update(mode="QueueLenght")),
        ("a misspelt rabbitmq trigger parameter", lambda f: doc(f, "ScaledObject")["spec"][
            "triggers"][0]["metadata"].update(queuename="warren.tasks")),
        ("a misspelt ScaledObject field", lambda f: doc(f, "ScaledObject")["spec"].update(
            maxReplicas=3)),
        ("a misspelt HPA behaviour field", lambda f: doc(f, "ScaledObject")["spec"]["advanced"][
            "horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(stabilisationWindowSeconds=1)),
        ("a misspelt TriggerAuthentication field", lambda f: doc(f, "TriggerAuthentication")[
            "spec"]["secretTargetRef"][0].update(secret="x")),
        ("a misspelt RabbitmqCluster field", lambda f: doc(f, "RabbitmqCluster")["spec"].update(
            replica=3)),
        ("a bad pod override in the RabbitmqCluster", lambda f: doc(f, "RabbitmqCluster")["spec"][
            "override"]["statefulSet"]["spec"]["template"]["spec"]["volumes"][0].update(secrett={})),
        ("a kind nobody has a schema for", lambda f: f["keda.yaml"].append(
            {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}})),
        ("a Secret key the pods need, missing", lambda f: doc(f, "Secret", "warren-broker")[
            "stringData"].pop("worker-amqp-url")),
        ("a Secret key KEDA needs, missing", lambda f: doc(f, "Secret", "warren-broker")[
            "stringData"].pop("keda-amqp-url")),
        ("the ScaledObject on another queue than the worker's", lambda f: doc(f, "ScaledObject")[
            "spec"]["triggers"][0]["metadata"].update(queueName="warren.other")),
        ("the ScaledObject on a Deployment that is not here", lambda f: doc(f, "ScaledObject")[
            "spec"]["scaleTargetRef"].update(name="warren-wroker")),
        ("a Service port aimed at no container port", lambda f: doc(f, "Service")["spec"]["ports"][
            0].update(targetPort="htp")),
        ("a manifest left out of kustomization.yaml", lambda f: f["kustomization.yaml"][0][
            "resources"].remove("keda.yaml")),
    ]


def self_test(files, versions, customs):
    """Fails unless the real manifests pass and every breakage is refused."""
    baseline = validate(files, versions[:1], customs, verbose=False)
    if baseline:
        print("self-test: the manifests themselves fail:\n" + "\n".join(baseline))
        return 1
    missed = 0
    for what, breakage in breakages():
        broken = copy.deepcopy(files)
        breakage(broken)
        failures = validate(broken, versions[:1], customs, verbose=False)
        if failures:
            print("refused as it should be: %s (%s)" % (what, failures[0]))
        else:
            print("NOT REFUSED: %s" % what)
            missed += 1
    total = len(breakages())
    print("self-test: %d of %d breakages refused" % (total - missed, total))
    return 1 if missed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", action="append", dest="versions",
                        help="Kubernetes version(s) to validate against (default: 1.30.0 and "
                        "the newest kubernetes-validate knows)")
    parser.add_argument("--self-test", action="store_true",
                        help="check that broken manifests are refused")
    args = parser.parse_args()
    versions = args.versions or ["1.30.0", kv.latest_version()]
    files, customs = load_manifests(), custom_schemas()
    if args.self_test:
        return self_test(files, versions, customs)
    failures = validate(files, versions, customs, verbose=True)
    for line in failures:
        print(line)
    count = sum(len(d) for n, d in files.items() if n != "kustomization.yaml")
    print("%d manifests (%d documents) against Kubernetes %s: %s" % (
        len(files) - 1, count, ", ".join(versions),
        "all valid" if not failures else "%d failures" % len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
