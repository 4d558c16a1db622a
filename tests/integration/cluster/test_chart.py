"""The Helm chart and plain manifests against the real API server: lint, server-side dry runs
for several value sets, and an install whose RBAC is enough for the operator and no more."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import yaml
from kubernetes import client

from testbed.control_plane import DELAY, EXIT_CODE
from testbed.operator_process import OperatorProcess
from tests.integration.cluster.conftest import ROOT, wait_for
from tests.integration.cluster.test_operator import Api, ftj_doc, reported

pytestmark = pytest.mark.cluster
CHART = ROOT / "charts" / "thaw"

VALUE_SETS = {
    "defaults": [],
    "namespaced with monitoring": [
        "--set",
        "watchNamespaces={thaw-a,thaw-b}",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "extraLabels.team=ml",
        "--set",
        "admission.allowedImages={registry.local/ml/,ghcr.io/thaw-dev/}",
        "--set",
        "admission.allowedPriorityClasses={batch-low}",
    ],
    "no metrics, no leader election, own service account": [
        "--set",
        "metrics.enabled=false",
        "--set",
        "metrics.dashboard.enabled=false",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=existing",
        "--set",
        "resources.limits.memory=512Mi",
        "--set",
        "admission.enabled=false",
    ],
}


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if args[0] == "template":  # offline rendering assumes Kubernetes 1.20 unless told; the chart needs >= 1.30
        args = (*args, "--kube-version", "1.34.0")
    return subprocess.run(
        [cluster._bin("helm"), f"--kubeconfig={cluster.kubeconfig_path}", *args],
        capture_output=True,
        text=True,
        check=check,
    )


@pytest.fixture(scope="module")
def chart_prereqs(cluster, crd):
    """The chart's own CRDs and stand-ins for prometheus-operator's."""
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "tests" / "fixtures" / "monitoring-crds.yaml"))
    for name in (
        "prometheusrules.monitoring.coreos.com",
        "servicemonitors.monitoring.coreos.com",
        "podmonitors.monitoring.coreos.com",
    ):
        cluster.kubectl("wait", "--for", "condition=established", f"crd/{name}", "--timeout=60s")
    for ns in ("thaw-a", "thaw-b", "thaw-dry", "thaw-system"):  # a server-side dry run creates no namespace
        cluster.kubectl("create", "namespace", ns, check=False)


def test_helm_lint_strict(cluster):
    out = helm(cluster, "lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_values_schema_rejects_bad_values(cluster):
    bad = ["--set", "replicaCount=9", "--set", "logFormat=xml", "--set", "admission.allowedImages={it's}"]
    out = helm(cluster, "template", "t", str(CHART), *bad, check=False)
    assert out.returncode != 0
    assert "/replicaCount" in out.stderr and "/logFormat" in out.stderr
    assert "/admission/allowedImages/0" in out.stderr  # a quote would break out of the policy's CEL literal


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_rendered_chart_passes_server_side_dry_run(cluster, chart_prereqs, values):
    rendered = helm(cluster, "template", "thaw", str(CHART), "--namespace", "thaw-dry", *VALUE_SETS[values]).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
    assert {"Deployment", "ClusterRole"} <= kinds
    assert ("ValidatingAdmissionPolicy" in kinds) == ("admission.enabled=false" not in VALUE_SETS[values])
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert out.returncode == 0, out.stderr


def test_plain_manifests_are_the_rendered_chart_and_apply(cluster, chart_prereqs):
    rendered = helm(cluster, "template", "thaw", str(CHART), "--namespace", "thaw-system").stdout
    committed = (ROOT / "manifests" / "install" / "thaw.yaml").read_text()
    assert committed.split("\n", 1)[1] == rendered, "run: make manifests"
    assert (CHART / "crds" / "finetunejobs.thaw.dev.yaml").read_text() == (
        ROOT / "manifests" / "crd" / "finetunejobs.thaw.dev.yaml"
    ).read_text(), "run: make crd"
    out = cluster.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "manifests" / "install"), check=False)
    assert out.returncode == 0, out.stderr


def _can(cluster, sa: str, verb: str, resource: str, namespace: str | None) -> bool:
    """resource: plural.group, plural.group/subresource, or leases.coordination.k8s.io/NAME."""
    if resource.startswith("leases."):  # a name, not a subresource
        args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{sa}"]
        args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
        return cluster.kubectl(*args, check=False).stdout.strip() == "yes"
    resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{sa}"]
    args += [f"--subresource={sub}"] if sub else []
    args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def _sa_kubeconfig(cluster, namespace: str, sa: str, path):
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig_path.read_text())
    admin["users"] = [{"name": "admin", "user": {"token": token}}]
    path.write_text(yaml.safe_dump(admin))
    return path


def test_install_gives_the_operator_enough_rbac_and_no_more(cluster, api, chart_prereqs, tmp_path):
    helm(cluster, "install", "thaw", str(CHART), "-n", "thaw-system", "--create-namespace", "--set", "replicaCount=0")
    try:
        sa = "thaw-system:thaw"
        # What it needs ...
        for verb, res, ns in [
            ("watch", "finetunejobs.thaw.dev", "any"),
            ("patch", "finetunejobs.thaw.dev/status", "x"),
            ("update", "finetunejobs.thaw.dev/finalizers", "x"),  # blockOwnerDeletion on its children
            ("create", "jobs.batch", "x"),
            ("patch", "jobs.batch", "x"),
            ("delete", "jobs.batch", "x"),  # the FineTuneJob's ttlSecondsAfterFinished
            ("list", "pods", "x"),  # failure reasons and rank 0's result
            ("create", "services", "x"),
            ("get", "services", "x"),
            ("create", "configmaps", "x"),
            ("patch", "configmaps", "x"),
            ("create", "persistentvolumeclaims", "x"),  # spec.dataCache
            ("get", "persistentvolumeclaims", "x"),
            ("create", "events", "x"),
            ("list", "events", "x"),  # a stage Job's FailedCreate (quota, admission)
            ("update", "leases.coordination.k8s.io/thaw-operator", "thaw-system"),  # its own Lease, by name
        ]:
            assert _can(cluster, sa, verb, res, None if ns == "any" else ns), (verb, res)
        # ... and nothing else: no Secrets at all (it never talks to the object store).
        for verb, res in [
            ("get", "secrets"),
            ("list", "secrets"),
            ("watch", "secrets"),
            ("create", "pods"),
            ("delete", "pods"),
            ("delete", "finetunejobs.thaw.dev"),
            ("patch", "finetunejobs.thaw.dev"),
            ("get", "deployments.apps"),
            ("delete", "services"),
            ("update", "configmaps"),
            ("delete", "persistentvolumeclaims"),  # deleted with the job by the garbage collector
            ("update", "leases.coordination.k8s.io"),  # only its own Lease, in its own namespace
            ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ]:
            assert not _can(cluster, sa, verb, res, "x"), (verb, res)
        assert not _can(cluster, sa, "get", "secrets", None)

        # The operator as that ServiceAccount (with leader election, as the chart runs it) drives a job to the end.
        kubeconfig = _sa_kubeconfig(cluster, "thaw-system", "thaw", tmp_path / "sa.kubeconfig")
        op = OperatorProcess(
            kubeconfig, tmp_path / "operator.log", extra=["--leader-election-namespace=thaw-system"], standalone=False
        ).start()
        ns = f"t-{uuid.uuid4().hex[:8]}"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
        try:
            k = Api(api, ns)
            annotations = {EXIT_CODE: "0", DELAY: "200ms", **reported({0: 0.6, 1: 0.7})}
            k.create(ftj_doc("rbac", f"file://{tmp_path}/store", stages=2, podAnnotations=annotations))
            st = k.phase("rbac", "Succeeded", 90)
            assert st["stageProgress"] == "2/2"
            assert "Forbidden" not in (tmp_path / "operator.log").read_text()
        finally:
            op.stop()
            client.CoreV1Api(api).delete_namespace(ns)
    finally:
        helm(cluster, "uninstall", "thaw", "-n", "thaw-system", check=False)


def _grant(api, ns: str, user: str, name: str, rules: list[dict] | None = None, cluster_role: str | None = None):
    """Bind `user` in `ns` to a new Role with `rules`, or to an existing ClusterRole."""
    rbac = client.RbacAuthorizationV1Api(api)
    if rules is not None:
        rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole" if cluster_role else "Role"}
    binding = {
        "metadata": {"name": name},
        "roleRef": {**ref, "name": cluster_role or name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    rbac.create_namespaced_role_binding(ns, binding)


def _as_user(cluster, user: str, ns: str):
    """create(name, **spec) as `user` in `ns`: '' when stored, else the API server's message."""
    from kubernetes import config
    from kubernetes.client.exceptions import ApiException

    api_client = config.new_client_from_config(str(cluster.kubeconfig_path))
    api_client.set_default_header("Impersonate-User", user)
    custom = client.CustomObjectsApi(api_client)

    def create(name: str, **spec) -> str:
        doc = ftj_doc(name, "s3://thaw/ckpt", stages=1)
        doc["spec"].update(spec)
        try:
            custom.create_namespaced_custom_object("thaw.dev", "v1alpha1", ns, "finetunejobs", doc)
            return ""
        except ApiException as err:
            return json.loads(err.body)["message"]

    return create


def test_namespaced_install_cannot_reach_other_namespaces(cluster, api, chart_prereqs):
    helm(
        cluster,
        "install",
        "thaw-ns",
        str(CHART),
        "-n",
        "thaw-ns-system",
        "--create-namespace",
        "--set",
        "replicaCount=0",
        "--set",
        "watchNamespaces={thaw-a}",
    )
    try:
        wait_for(lambda: _can(cluster, "thaw-ns-system:thaw-ns", "create", "jobs.batch", "thaw-a"), 30, what="RBAC")
        assert not _can(cluster, "thaw-ns-system:thaw-ns", "get", "secrets", "thaw-a")
        assert not _can(cluster, "thaw-ns-system:thaw-ns", "create", "jobs.batch", "thaw-b")
        assert not _can(cluster, "thaw-ns-system:thaw-ns", "list", "finetunejobs.thaw.dev", None)
        assert _can(cluster, "thaw-ns-system:thaw-ns", "list", "finetunejobs.thaw.dev", "thaw-a")
        # Its admission policy polices the namespaces it runs, and leaves the others to their own release.
        user, role = f"dave-{uuid.uuid4().hex[:6]}", f"ftj-{uuid.uuid4().hex[:6]}"
        rules = [{"apiGroups": ["thaw.dev"], "resources": ["finetunejobs"], "verbs": ["create"]}]
        for ns in ("thaw-a", "thaw-b"):
            _grant(api, ns, user, role, rules)
        in_a, in_b = _as_user(cluster, user, "thaw-a"), _as_user(cluster, user, "thaw-b")
        probe = lambda: in_a(f"{role}-{uuid.uuid4().hex[:6]}")  # noqa: E731
        wait_for(lambda: "may not create Jobs and pods in namespace thaw-a" in probe(), 60, what="the policy active")
        assert in_b(role) == ""
    finally:
        helm(cluster, "uninstall", "thaw-ns", "-n", "thaw-ns-system", check=False)
        custom = client.CustomObjectsApi(api)
        for ns in ("thaw-a", "thaw-b"):
            for item in custom.list_namespaced_custom_object("thaw.dev", "v1alpha1", ns, "finetunejobs")["items"]:
                name = item["metadata"]["name"]
                custom.delete_namespaced_custom_object("thaw.dev", "v1alpha1", ns, "finetunejobs", name)


def test_a_finetunejob_grants_nothing_its_author_lacks(cluster, api, chart_prereqs):
    """The chart's ValidatingAdmissionPolicy and aggregated roles on the real API server (RBAC
    authorizer, the clusterrole-aggregation controller): a user who may create FineTuneJobs but
    not Jobs and pods, or not read the Secret a job names, is refused with a line naming what;
    images, ServiceAccounts and PriorityClasses outside the chart's lists too, also for a user who
    holds only the built-in edit role."""
    helm(
        cluster, "install", "thaw-vap", str(CHART), "-n", "thaw-vap-system", "--create-namespace",
        "--set", "replicaCount=0", "--set", "admission.allowedImages={registry.local/ml/}",
        "--set", "admission.allowedServiceAccounts={trainer}", "--set", "admission.allowedPriorityClasses={batch-low}",
    )  # fmt: skip
    ns = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    grant = lambda *a, **kw: _grant(api, ns, *a, **kw)  # noqa: E731
    as_user = lambda user: _as_user(cluster, user, ns)  # noqa: E731
    core.create_namespace({"metadata": {"name": ns}})
    try:
        core.create_namespaced_secret(ns, {"metadata": {"name": "s3"}, "stringData": {"AWS_ACCESS_KEY_ID": "x"}})

        grant("alice", "author", [{"apiGroups": ["thaw.dev"], "resources": ["finetunejobs"], "verbs": ["create"]}])
        create = as_user("alice")
        # The policy is in force once the API server has loaded it (a few seconds after install).
        probe = lambda: create(f"probe-{uuid.uuid4().hex[:6]}")  # noqa: E731 - a fresh name: one may slip in
        wait_for(lambda: "may not create Jobs and pods" in probe(), 60, what="the admission policy active")
        assert "a FineTuneJob runs Jobs and pods for its author: alice may not create Jobs and pods in namespace " in (
            create("nopods")
        )
        grant("alice", "pods", [{"apiGroups": ["", "batch"], "resources": ["pods", "jobs"], "verbs": ["create"]}])
        wait_for(lambda: create("plain") == "", 30, what="alice may create a plain job once she may create pods")
        secret = {"uri": "s3://thaw/ckpt", "credentialsSecret": "s3"}
        said = create("withsecret", checkpoint=secret)
        assert f"spec.checkpoint.credentialsSecret: alice may not get Secret s3 in namespace {ns}" in said, said
        assert "spec.imagePullSecrets: alice may not get every Secret named" in create("pull", imagePullSecrets=["s3"])
        grant("alice", "s3", [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s3"], "verbs": ["get"]}])
        wait_for(lambda: create("withsecret", checkpoint=secret) == "", 30, what="the Secret she may read")
        said = create("evil", image="docker.io/someone/miner:1")
        assert "spec.image: docker.io/someone/miner:1 is not an allowed image" in said and "registry.local/ml/" in said
        assert create("ours", image="registry.local/ml/thaw-trainer:1") == ""
        said = create("builder", serviceAccountName="builder")
        assert "spec.serviceAccountName: builder is not one the chart allows" in said, said
        assert create("trainer", serviceAccountName="trainer") == ""
        said = create("urgent", priorityClassName="system-cluster-critical")
        assert "spec.priorityClassName: system-cluster-critical is not allowed" in said, said
        assert create("low", priorityClassName="batch-low") == ""

        # The built-in edit role carries FineTuneJobs (aggregated), and the same limits hold for it.
        grant("bob", "bob-edit", cluster_role="edit")
        bob = as_user("bob")
        wait_for(lambda: bob("bobs") == "", 60, what="edit aggregating the FineTuneJob role")
        assert "is not an allowed image" in bob("bobs-evil", image="docker.io/someone/miner:1")
        grant("carol", "carol-view", cluster_role="view")
        can = lambda verb: cluster.kubectl(
            "auth", "can-i", verb, "finetunejobs.thaw.dev", "--as=carol", "-n", ns, check=False
        )  # noqa: E731
        wait_for(lambda: can("get").stdout.strip() == "yes", 60, what="view aggregating the FineTuneJob role")
        assert can("create").stdout.strip() == "no"

        items = client.CustomObjectsApi(api).list_namespaced_custom_object("thaw.dev", "v1alpha1", ns, "finetunejobs")
        stored = {o["metadata"]["name"] for o in items["items"]}
        assert {n for n in stored if not n.startswith("probe-")} == {
            "plain",
            "withsecret",
            "ours",
            "trainer",
            "low",
            "bobs",
        }
    finally:
        core.delete_namespace(ns)
        helm(cluster, "uninstall", "thaw-vap", "-n", "thaw-vap-system", check=False)
