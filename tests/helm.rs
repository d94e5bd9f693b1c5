//! The Helm chart on the real control plane: lint, schema refusals, server-side dry-run of the rendered
//! manifests, install/upgrade/uninstall, and the operator binary running with exactly the chart's RBAC
//! and under its ValidatingAdmissionPolicy (its client impersonates the chart's ServiceAccount) through
//! the core flow, refused where it must be; next to it the verifier (`verify`), impersonating its own
//! ServiceAccount, authenticating the operator's tokens with nothing but list + watch on ScimDirectories.
//!
//! Pods never run here (no kubelet): the Deployments are checked as objects, and the binary runs on the
//! host with each Deployment's own args and environment.

#[path = "helm/rendered.rs"]
mod rendered;
#[path = "helm/secret_write_policy.rs"]
mod secret_write_policy;
mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use envtest::ControlPlane;
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{SelfSubjectAccessReview, SelfSubjectRulesReview};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scim_token_operator::api::ScimDirectory;
use scim_token_operator::token::Token;
use serde::Deserialize;
use serde_json::{Value, json};
use support::{Env, HttpResponse, Operator, fresh_log, http_request, sha256, wait_for};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/scim-token-operator");
const BASIC: &str = include_str!("../examples/basic.yaml");

/// Runs `cmd` with `stdin`; returns (success, stdout, stderr).
fn run(mut cmd: Command, stdin: Option<&str>) -> (bool, String, String) {
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn helm(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    let mut cmd = cp.helm();
    cmd.args(args);
    run(cmd, None)
}

/// Every object of a multi-document YAML stream.
fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm template` of the chart, parsed; panics with helm's message on failure.
fn render(cp: &ControlPlane, release: &str, namespace: &str, sets: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    for set in sets {
        args.extend(["--set", set]);
    }
    let (ok, out, err) = helm(cp, &args);
    assert!(ok, "helm template {sets:?} failed: {err}");
    parse_docs(&out)
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut matching = objects.iter().filter(|o| o["kind"] == kind);
    let found = matching.next().unwrap_or_else(|| panic!("no {kind} rendered"));
    assert!(matching.next().is_none(), "more than one {kind} rendered");
    found
}

/// The one object of `kind` belonging to `component` (`operator` or `verifier`, its
/// `app.kubernetes.io/component` label) outside any watched namespace's RBAC.
fn find_of<'a>(objects: &'a [Value], kind: &str, component: &str) -> &'a Value {
    let mut matching = of_component(objects, kind, component);
    let found = matching.next().unwrap_or_else(|| panic!("no {component} {kind} rendered"));
    assert!(matching.next().is_none(), "more than one {component} {kind} rendered");
    found
}

fn of_component<'a>(objects: &'a [Value], kind: &str, component: &str) -> impl Iterator<Item = &'a Value> + use<'a> {
    let (kind, component) = (kind.to_owned(), component.to_owned());
    objects.iter().filter(move |o| {
        o["kind"] == kind.as_str() && o["metadata"]["labels"]["app.kubernetes.io/component"] == component.as_str()
    })
}

/// Whether a label selector (`matchLabels`, and `matchExpressions` with `In`) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_labels = selector["matchLabels"].as_object().into_iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector["matchExpressions"].as_array().into_iter().flatten().all(|e| {
        assert_eq!(e["operator"], "In", "only In is understood here");
        e["values"].as_array().unwrap().iter().any(|v| labels.get(e["key"].as_str().unwrap()) == Some(v))
    });
    by_labels && by_expressions
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects.iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect()
}

/// The rules of a rendered Role or ClusterRole as (apiGroup/resource, sorted verbs, resourceNames).
fn rules(role: &Value) -> BTreeSet<String> {
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| {
            let groups: Vec<String> = serde_json::from_value(rule["apiGroups"].clone()).unwrap();
            let resources: Vec<String> = serde_json::from_value(rule["resources"].clone()).unwrap();
            let mut verbs: Vec<String> = serde_json::from_value(rule["verbs"].clone()).unwrap();
            verbs.sort();
            let names = rule.get("resourceNames").map(|n| format!(" names={n}")).unwrap_or_default();
            groups.into_iter().flat_map(move |g| {
                let (verbs, names) = (verbs.clone(), names.clone());
                resources.clone().into_iter().map(move |r| format!("{g}/{r}: {}{names}", verbs.join(",")))
            })
        })
        .collect()
}

/// What the operator calls (src/controller/, src/cli.rs) and nothing more: a change here is a change
/// to the operator's privileges and must be deliberate.
const OPERATOR_RULES: [&str; 4] = [
    "scim.tokenops.dev/scimdirectories: list,watch",
    "scim.tokenops.dev/scimdirectories/status: patch",
    "/secrets: create,get,list,patch,watch",
    "events.k8s.io/events: create,patch",
];

/// What the verifier calls (src/verify/mod.rs: one watcher per scope) and nothing more.
const VERIFIER_RULES: [&str; 1] = ["scim.tokenops.dev/scimdirectories: list,watch"];

#[tokio::test]
async fn lint_is_clean_and_the_values_table_is_fresh() {
    let cp = ControlPlane::shared();
    for sets in [
        vec![],
        vec![
            "watchNamespaces={team-a,team-b}",
            "replicas=2",
            "serviceMonitor.enabled=true",
            "prometheusRule.enabled=true",
            "image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "networkPolicy.apiServer.cidrs={10.96.0.1/32,fd00::1/128}",
            "verifier.replicas=3",
            "verifier.preStopSleepSeconds=0",
            "minIssueInterval=1h30m",
            "entra.graphEndpoint=https://graph.microsoft.com",
            "entra.authorityHost=https://login.microsoftonline.com/",
            "entra.pollInterval=1m",
            "entra.caBundle.configMapName=proxy-ca",
            "entra.workloadIdentity.enabled=true",
            "entra.workloadIdentity.clientId=00000000-0000-0000-0000-000000000000",
        ],
        vec!["secretWritePolicy.enabled=false", "networkPolicy.enabled=false", "rbac.create=false"],
        vec!["verifier.enabled=false", "serviceMonitor.enabled=true", "prometheusRule.enabled=true"],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        for set in &sets {
            args.extend(["--set", set]);
        }
        let (ok, out, err) = helm(cp, &args);
        assert!(ok, "helm lint --strict {sets:?}:\n{out}{err}");
        assert!(out.contains("0 chart(s) failed") && !out.contains("[WARNING]"), "{out}");
    }
    let mut cmd = Command::new("bash");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/helm-docs.sh")).arg("--check");
    let (ok, out, err) = run(cmd, None);
    assert!(ok, "a values table (docs/helm.md or the chart's README.md) is stale; run hack/helm-docs.sh\n{out}{err}");
}

#[tokio::test]
async fn bad_values_fail_with_a_message_naming_them() {
    let cp = ControlPlane::shared();
    for (set, expected) in [
        ("replicaCount=2", "replicaCount"),
        ("serviceAccount.nmae=x", "nmae"),
        ("logFormat=xml", "logFormat"),
        ("replicas=-1", "replicas"),
        ("reconcileConcurrency=0", "reconcileConcurrency"),
        ("watchNamespaces={a,a}", "watchNamespaces"),
        ("watchNamespaces={Team}", "watchNamespaces"),
        ("image.digest=latest", "digest"),
        ("secretWritePolicy.enabled=yes", "secretWritePolicy"),
        ("secretWritePolicy.enable=true", "enable"),
        ("networkPolicy.apiServer.cidrs={10.0.0.300/32}", "cidrs"),
        ("networkPolicy.apiServer.cidrs={kubernetes.default.svc}", "cidrs"),
        ("networkPolicy.apiServer.ports={0}", "ports"),
        ("networkPolicy.metrics.namespaceSelector.matchLabel.team=obs", "matchLabel"),
        ("minIssueInterval=1.5s", "minIssueInterval"),
        ("minIssueInterval=1m1h", "minIssueInterval"),
        ("verifier.enable=true", "enable"),
        ("verifier.replicas=-1", "replicas"),
        ("verifier.service.port=0", "port"),
        ("verifier.serviceAccount.nmae=x", "nmae"),
        ("verifier.resources.request.cpu=1", "request"),
        ("verifier.preStopSleepSeconds=-1", "preStopSleepSeconds"),
        ("prometheusRule.overlapEndsWithinSeconds=0", "overlapEndsWithinSeconds"),
        ("verifier.networkPolicy.enable=true", "enable"),
        ("verifier.networkPolicy.proxies[0].namespaceSelectr.matchLabels.a=b", "namespaceSelectr"),
        ("verifier.networkPolicy.proxies[0].ipBlock.cidr=10.0.0.0/33", "cidr"),
        ("verifier.networkPolicy.proxies=null", NO_PROXIES),
        ("verifier.limits.maxConnections=0", "maxConnections"),
        ("verifier.limits.headerReadTimeout=1.5s", "headerReadTimeout"),
        ("verifier.limits.maxStaleness=soon", "maxStaleness"),
        ("verifier.limits.idletimeout=1m", "idletimeout"),
        ("entra.graphEndpoint=http://graph.microsoft.com", "graphEndpoint"),
        ("entra.graphEndpoint=graph.microsoft.com", "graphEndpoint"),
        ("entra.authorityHost=http://login.microsoftonline.com/", "authorityHost"),
        ("entra.authorityHost=https://", "authorityHost"),
        ("entra.pollInterval=1.5m", "pollInterval"),
        ("entra.pollInterval=60", "pollInterval"),
        ("entra.pollInterval=0s", "pollInterval"),
        ("entra.caBundle.configMapName=Proxy_CA", "configMapName"),
        ("entra.caBundle.key=a/b", "key"),
        ("entra.caBundle.key=..data", "key"),
        ("entra.caBundle.configmap=proxy-ca", "configmap"),
        ("entra.workloadIdentity.enabled=yes", "enabled"),
        ("entra.workloadIdentity.clientId=my-app", "clientId"),
        ("entra.workloadIdentity.client-id=x", "client-id"),
        ("entra.tenantId=x", "tenantId"),
    ] {
        let (ok, out, err) = helm(cp, &["template", "bad", CHART, "--set", set]);
        assert!(!ok, "--set {set} must fail, rendered:\n{out}");
        assert!(err.contains(expected), "--set {set}: the error names {expected:?}: {err}");
    }
    // An enabled verifier NetworkPolicy without a single proxy peer would block every proxy (every SCIM
    // request failing closed): refused by the schema, and by the template when the schema is skipped.
    let values = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-proxies.values.yaml");
    std::fs::write(&values, "verifier:\n  networkPolicy:\n    proxies: []\n").unwrap();
    let values = values.to_str().unwrap();
    let (ok, out, err) = helm(cp, &["template", "bad", CHART, "-f", values]);
    assert!(!ok && err.contains(NO_PROXIES), "no proxies must be refused by the schema: {err}{out}");
    let (ok, out, err) = helm(cp, &["template", "bad", CHART, "-f", values, "--skip-schema-validation"]);
    assert!(
        !ok && err.contains("verifier.networkPolicy.proxies is empty while verifier.networkPolicy.enabled is true"),
        "no proxies must be refused by the template: {err}{out}"
    );
    let (ok, _, err) =
        helm(cp, &["template", "ok", CHART, "-f", values, "--set", "verifier.networkPolicy.enabled=false"]);
    assert!(ok, "no proxies with the verifier's NetworkPolicy off: {err}");
}

/// The schema's refusal of an enabled verifier NetworkPolicy without proxies (values.schema.json).
const NO_PROXIES: &str = "proxies with at least one peer while enabled (with none, the NetworkPolicy of the verifier \
     would block every proxy and every SCIM request would fail closed)";

/// The container's environment as the kubelet would set it for a pod named `pod` in `namespace`.
fn container_env(deployment: &Value, pod: &str, namespace: &str) -> Vec<(String, String)> {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Some(v), _) => v.to_string(),
                (None, Some("metadata.name")) => pod.to_string(),
                (None, Some("metadata.namespace")) => namespace.to_string(),
                other => panic!("unexpected env source for {name}: {other:?}"),
            };
            (name, value)
        })
        .collect()
}

/// The chart's Entra settings reach the binary as the kubelet hands them over: the rendered flags (one
/// the binary does not know stops it at once) and the CA bundle ConfigMap's key at the mounted path.
/// With a PEM certificate there the operator becomes ready; with none it refuses to start, naming the
/// mounted file.
#[tokio::test]
async fn operator_takes_the_charts_entra_settings() {
    let cp = ControlPlane::shared();
    let admin = cp.client().await;
    let ns = cp.create_namespace("entra-chart").await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let ca = support::graph::tls::TestCa::generate();
    let config_map = json!({ "metadata": { "name": "egress-proxy-ca" }, "data": { "root.pem": ca.pem } });
    config_maps.create(&PostParams::default(), &serde_json::from_value(config_map).unwrap()).await.unwrap();
    let watch = format!("watchNamespaces={{{ns}}}");
    let sets = [
        watch.as_str(),
        "entra.graphEndpoint=https://graph.microsoft.us",
        "entra.authorityHost=https://login.microsoftonline.us/",
        "entra.pollInterval=30s",
        "entra.caBundle.configMapName=egress-proxy-ca",
        "entra.caBundle.key=root.pem",
        "entra.workloadIdentity.enabled=true",
    ];
    let objects = render(cp, "entra", &ns, &sets);
    let deployment = find_of(&objects, "Deployment", "operator");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{ns}-pod"));
    let mounted = root.join("etc/scim-token-operator/entra-ca/ca.pem");
    for (pem, starts) in [(ca.pem.as_str(), true), ("not a certificate\n", false)] {
        let data = json!({ "data": { "root.pem": pem } });
        config_maps.patch("egress-proxy-ca", &PatchParams::default(), &Patch::Merge(data)).await.unwrap();
        let args = mount_config_maps(&config_maps, deployment, &root).await;
        assert!(args.contains(&format!("--entra-ca-file={}", mounted.display())), "{args:?}");
        let env = container_env(deployment, "entra-7d9f8b6c5-x2x4z", &ns);
        let log = fresh_log(&format!("{ns}-{starts}"));
        let mut op = Operator::start_with_kubeconfig(cp.kubeconfig_path(), &args, &env, &log);
        if starts {
            wait_for("the operator's /readyz with the chart's Entra settings", Duration::from_secs(60), || {
                let ready = http_request(op.metrics_port, "GET", "/readyz", &[]).is_some_and(|r| r.status == 200);
                async move { ready.then_some(()) }
            })
            .await;
            assert!(op.terminate().await.success());
        } else {
            let status = op.wait_exit(Duration::from_secs(60)).await;
            assert!(!status.success());
            let out = std::fs::read_to_string(&log).unwrap();
            let expected = format!("--entra-ca-file {}: no certificate in it", mounted.display());
            assert!(out.contains(&expected), "{expected:?} in {out}");
        }
    }
}

/// What the kubelet does for the operator container's ConfigMap volumes, under `root`: each item of
/// the ConfigMap (as the API server holds it now) written at its path below the mount; returns the
/// container's args with the mount paths moved below `root`.
async fn mount_config_maps(config_maps: &Api<ConfigMap>, deployment: &Value, root: &Path) -> Vec<String> {
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mut args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        let source = &volume["configMap"];
        let config_map = config_maps.get(source["name"].as_str().unwrap()).await.unwrap();
        let data = config_map.data.unwrap_or_default();
        let mount_path = mount["mountPath"].as_str().unwrap();
        assert_eq!(mount["readOnly"], true, "{mount}");
        let dir = root.join(mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        for item in source["items"].as_array().unwrap() {
            std::fs::write(dir.join(item["path"].as_str().unwrap()), &data[item["key"].as_str().unwrap()]).unwrap();
        }
        for arg in &mut args {
            *arg = arg.replace(mount_path, dir.to_str().unwrap());
        }
    }
    args
}

#[tokio::test]
async fn install_upgrade_uninstall() {
    let cp = ControlPlane::shared();
    let admin = cp.client().await;
    let ns = cp.create_namespace("lifecycle").await.unwrap();
    let name = "lifecycle-scim-token-operator";

    let (ok, out, err) = helm(cp, &["install", "lifecycle", CHART, "--namespace", &ns]);
    assert!(ok, "helm install: {err}{out}");
    assert!(out.contains("STATUS: deployed"), "{out}");
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    assert_eq!(deployments.get(name).await.unwrap().spec.unwrap().replicas, Some(1));
    let cluster_roles: Api<ClusterRole> = Api::all(admin.clone());
    assert!(cluster_roles.get_opt(name).await.unwrap().is_some());
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
    assert!(pdbs.get_opt(name).await.unwrap().is_none(), "no PDB with one replica");
    let policy_name = format!("{name}-{ns}-secret-writes");
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(admin.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin.clone());
    assert!(policies.get_opt(&policy_name).await.unwrap().is_some(), "the secret-write policy");
    assert!(bindings.get_opt(&policy_name).await.unwrap().is_some(), "its binding");
    let verifier = format!("{name}-verifier");
    assert_eq!(deployments.get(&verifier).await.unwrap().spec.unwrap().replicas, Some(2), "two verifiers");
    assert!(pdbs.get_opt(&verifier).await.unwrap().is_some(), "the verifier's PDB");
    assert!(cluster_roles.get_opt(&verifier).await.unwrap().is_some(), "the verifier's ClusterRole");

    let (ok, out, err) =
        helm(cp, &["upgrade", "lifecycle", CHART, "--namespace", &ns, "--reuse-values", "--set", "replicas=2"]);
    assert!(ok, "helm upgrade: {err}{out}");
    assert!(out.contains("REVISION: 2"), "{out}");
    assert_eq!(deployments.get(name).await.unwrap().spec.unwrap().replicas, Some(2));
    assert!(pdbs.get_opt(name).await.unwrap().is_some(), "a PDB with two replicas");

    // A typo in an upgrade changes nothing.
    let (ok, _, err) =
        helm(cp, &["upgrade", "lifecycle", CHART, "--namespace", &ns, "--reuse-values", "--set", "replica=3"]);
    assert!(!ok && err.contains("replica"), "{err}");
    assert_eq!(deployments.get(name).await.unwrap().spec.unwrap().replicas, Some(2));

    // The verifier can be switched off (and every object of it goes) and on again.
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let service_accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    let (ok, out, err) = helm(
        cp,
        &["upgrade", "lifecycle", CHART, "--namespace", &ns, "--reuse-values", "--set", "verifier.enabled=false"],
    );
    assert!(ok, "helm upgrade: {err}{out}");
    assert!(deployments.get_opt(&verifier).await.unwrap().is_none());
    assert!(pdbs.get_opt(&verifier).await.unwrap().is_none());
    assert!(services.get_opt(&verifier).await.unwrap().is_none());
    assert!(service_accounts.get_opt(&verifier).await.unwrap().is_none());
    assert!(cluster_roles.get_opt(&verifier).await.unwrap().is_none());
    assert!(deployments.get_opt(name).await.unwrap().is_some(), "the operator stays");
    let (ok, out, err) = helm(
        cp,
        &["upgrade", "lifecycle", CHART, "--namespace", &ns, "--reuse-values", "--set", "verifier.enabled=true"],
    );
    assert!(ok, "helm upgrade: {err}{out}");
    assert!(deployments.get_opt(&verifier).await.unwrap().is_some());

    let (ok, out, err) = helm(cp, &["uninstall", "lifecycle", "--namespace", &ns]);
    assert!(ok, "helm uninstall: {err}{out}");
    assert!(deployments.get_opt(name).await.unwrap().is_none());
    assert!(cluster_roles.get_opt(name).await.unwrap().is_none());
    assert!(pdbs.get_opt(name).await.unwrap().is_none());
    assert!(policies.get_opt(&policy_name).await.unwrap().is_none(), "the policy goes with the release");
    assert!(bindings.get_opt(&policy_name).await.unwrap().is_none());
    assert!(deployments.get_opt(&verifier).await.unwrap().is_none());
    assert!(cluster_roles.get_opt(&verifier).await.unwrap().is_none());
    // Helm never deletes a CRD: every directory and token Secret survives an uninstall.
    let crds: Api<CustomResourceDefinition> = Api::all(admin);
    assert!(crds.get_opt("scimdirectories.scim.tokenops.dev").await.unwrap().is_some());
}

/// A kubeconfig whose user is the admin impersonating `user` in `groups`, as the pod's token would be.
fn impersonating_kubeconfig(cp: &ControlPlane, user: &str, groups: &[&str], path: &Path) {
    let mut config: Value = serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig_path()).unwrap()).unwrap();
    for entry in config["users"].as_array_mut().unwrap() {
        entry["user"]["as"] = json!(user);
        entry["user"]["as-groups"] = json!(groups);
    }
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

/// Starts the operator as the chart's Deployment would run it, from the installed release's manifest.
fn start_as_deployed(cp: &ControlPlane, release: &str, ns: &str, kubeconfig: &Path, log: &Path) -> (Operator, String) {
    let (ok, manifest, err) = helm(cp, &["get", "manifest", release, "--namespace", ns]);
    assert!(ok, "{err}");
    let objects = parse_docs(&manifest);
    let deployment = find_of(&objects, "Deployment", "operator");
    let pod = format!("{release}-scim-token-operator-7d9f8b6c5-x2x4z");
    let args: Vec<String> =
        serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
    let env = container_env(deployment, &pod, ns);
    (Operator::start_with_kubeconfig(kubeconfig, &args, &env, log), pod)
}

/// `scim-token-operator verify` as the chart's verifier Deployment runs it (its args and environment, from
/// the installed release's manifest), with `--listen`, `--grpc-listen` and `--metrics-addr` on free
/// loopback ports and a kubeconfig of the verifier's identity; its output is appended to `log`. Killed
/// on drop.
struct DeployedVerifier {
    child: std::process::Child,
    port: u16,
    metrics_port: u16,
}

impl DeployedVerifier {
    fn start(cp: &ControlPlane, release: &str, ns: &str, kubeconfig: &Path, log: &Path) -> DeployedVerifier {
        let (ok, manifest, err) = helm(cp, &["get", "manifest", release, "--namespace", ns]);
        assert!(ok, "{err}");
        let objects = parse_docs(&manifest);
        let deployment = find_of(&objects, "Deployment", "verifier");
        let args: Vec<String> =
            serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        let env = container_env(deployment, &format!("{release}-scim-token-operator-verifier-6f7c9d8b4-k2m9p"), ns);
        let (port, grpc_port, metrics_port) = (support::free_port(), support::free_port(), support::free_port());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(support::BIN)
            .args(&args)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "debug,kube=info,hyper=info,tower=info,rustls=info,h2=info")
            .envs(env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the verifier");
        DeployedVerifier { child, port, metrics_port }
    }

    /// Waits for /readyz: every watched namespace's initial list is indexed.
    async fn wait_ready(&self) {
        wait_for("the verifier to be ready", Duration::from_secs(30), || async {
            http_request(self.metrics_port, "GET", "/readyz", &[]).filter(|r| r.status == 200).map(|_| ())
        })
        .await
    }

    /// GET /verify with `Authorization: Bearer <token>`, bound to `expected` (`<ns>/<name>`) if given.
    fn verify_token(&self, token: &str, expected: Option<&str>) -> HttpResponse {
        let path = expected.map_or("/verify".to_string(), |d| format!("/verify?directory={d}"));
        http_request(self.port, "GET", &path, &[("Authorization", &format!("Bearer {token}"))])
            .expect("the verifier answers")
    }

    /// Waits until `token` gets `status` (the verifier learns of issues and rotations through its watch).
    async fn wait_status(&self, token: &str, status: u16, what: &str) -> HttpResponse {
        wait_for(what, Duration::from_secs(10), || async {
            Some(self.verify_token(token, None)).filter(|r| r.status == status)
        })
        .await
    }

    fn metrics(&self) -> String {
        http_request(self.metrics_port, "GET", "/metrics", &[]).expect("the verifier's metrics").body
    }

    /// SIGTERM, then waits for a graceful exit.
    async fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = wait_for("the verifier to exit", Duration::from_secs(30), || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await;
        assert!(status.success(), "the verifier exits cleanly on SIGTERM: {status:?}");
    }
}

impl Drop for DeployedVerifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `client`'s identity may do in `namespace`, as the API server's authorizer lists it
/// (SelfSubjectRulesReview), in the form of [`rules`]; without the self-reviews (who am I, what may I
/// do) that every authenticated user may make.
async fn allowed_rules(client: &kube::Client, namespace: &str) -> BTreeSet<String> {
    let reviews: Api<SelfSubjectRulesReview> = Api::all(client.clone());
    let review: SelfSubjectRulesReview = serde_json::from_value(json!({ "spec": { "namespace": namespace } })).unwrap();
    let status = reviews.create(&PostParams::default(), &review).await.unwrap().status.unwrap();
    assert!(!status.incomplete, "the rules review is complete: {status:?}");
    let as_role = json!({ "rules": status.resource_rules });
    rules(&as_role).into_iter().filter(|r| !r.contains("/selfsubject")).collect()
}

/// The verifier's ServiceAccount (`client`) may not read Secrets, write ScimDirectories or their status,
/// read a single directory (it only lists and watches), or touch Events and Leases, in `namespace` (where
/// it may list and watch ScimDirectories) and in `release_ns`.
async fn refusals_of_the_verifier(client: &kube::Client, namespace: &str, release_ns: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    forbidden(secrets.get("acme-scim-token").await, "the verifier reading a Secret");
    forbidden(secrets.list(&ListParams::default()).await, "the verifier listing Secrets");
    forbidden(
        Api::<Secret>::all(client.clone()).list(&ListParams::default()).await,
        "the verifier listing all Secrets",
    );
    forbidden(
        Api::<Secret>::namespaced(client.clone(), release_ns).list(&ListParams::default()).await,
        "the verifier listing the release namespace's Secrets",
    );
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), namespace);
    dirs.list(&ListParams::default()).await.expect("the verifier lists ScimDirectories");
    forbidden(dirs.get("acme").await, "the verifier reading one directory (it lists and watches)");
    let rotate = Patch::Merge(json!({ "spec": { "rotationGeneration": 9 } }));
    forbidden(dirs.patch("acme", &PatchParams::default(), &rotate).await, "the verifier patching a directory");
    let forged = Patch::Merge(json!({ "status": { "tokenHash": format!("sha256:{}", "0".repeat(64)) } }));
    forbidden(dirs.patch_status("acme", &PatchParams::default(), &forged).await, "the verifier patching a status");
    let mut planted: ScimDirectory = serde_yaml::from_str(BASIC).unwrap();
    planted.metadata.name = Some("planted".into());
    forbidden(dirs.create(&PostParams::default(), &planted).await, "the verifier creating a directory");
    planted.metadata.name = Some("acme".into());
    forbidden(dirs.replace("acme", &PostParams::default(), &planted).await, "the verifier updating a directory");
    forbidden(dirs.replace_status("acme", &PostParams::default(), &planted).await, "the verifier updating a status");
    forbidden(dirs.delete("acme", &DeleteParams::default()).await, "the verifier deleting a directory");
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let event: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": { "name": "verifier-probe" },
        "eventTime": now,
        "reportingController": "scim.tokenops.dev/verifier",
        "reportingInstance": "probe",
        "action": "Verify",
        "reason": "Probe",
        "type": "Normal",
        "regarding": { "apiVersion": "scim.tokenops.dev/v1alpha1", "kind": "ScimDirectory", "name": "acme", "namespace": namespace }
    }))
    .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), namespace);
    forbidden(events.create(&PostParams::default(), &event).await, "the verifier creating an Event");
    forbidden(events.list(&ListParams::default()).await, "the verifier listing Events");
    for ns in [namespace, release_ns] {
        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        let lease: Lease = serde_json::from_value(json!({ "metadata": { "name": "verifier-probe" } })).unwrap();
        forbidden(leases.create(&PostParams::default(), &lease).await, "the verifier creating a Lease");
        forbidden(leases.get("tokens-scim-token-operator").await, "the verifier reading the operator's Lease");
        forbidden(leases.list(&ListParams::default()).await, "the verifier listing Leases");
    }
}

/// Asserts a 403. An unexpected success is not printed: it may be a Secret, with its token.
fn forbidden<T>(result: kube::Result<T>, what: &str) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        Err(other) => panic!("{what} must be forbidden, got {other:?}"),
        Ok(_) => panic!("{what} must be forbidden, but it succeeded"),
    }
}

// Why the chart's secret-write policy refuses a write (its messages, templates/validatingadmissionpolicy.yaml).
const NOT_LABELLED: &str = "the Secret must carry the label app.kubernetes.io/managed-by=scim-token-operator";
const NOT_OWNED: &str = "the Secret must have a controller ownerReference (controller: true) to a ScimDirectory";
const TAKEOVER: &str = "the existing Secret has no controller ownerReference to a ScimDirectory";
const MOVED: &str = "the Secret's controller ownerReference may not change";
const DELETED: &str = "scim-token-operator never deletes Secrets";

/// Asserts that the API server refused a request through the chart's ValidatingAdmissionPolicy, for
/// `reason`; returns the refusal's message.
fn refused_by_policy<T: std::fmt::Debug>(result: kube::Result<T>, reason: &str, what: &str) -> String {
    match result {
        Err(kube::Error::Api(status))
            if status.code == 403
                && status.message.contains("ValidatingAdmissionPolicy")
                && status.message.contains(reason) =>
        {
            status.message
        }
        other => panic!("{what} must be refused by the chart's ValidatingAdmissionPolicy ({reason:?}), got {other:?}"),
    }
}

/// A Secret named `name` with `labels` and, when given, `owner` as its only ownerReference.
fn test_secret(name: &str, labels: Value, owner: Option<&Value>) -> Secret {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels, "ownerReferences": owner.map(|o| vec![o]) },
        "stringData": { "token": "planted" }
    }))
    .unwrap()
}

/// Waits until the API server enforces the chart's secret-write policy, which it loads asynchronously
/// after the policy and its binding are created: until a dry-run create of an unlabelled Secret, made
/// with the ServiceAccount's identity, is refused.
async fn wait_until_policy_enforced(secrets: &Api<Secret>) {
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let probe = test_secret("policy-probe", json!({}), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match secrets.create(&dry_run, &probe).await {
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains(NOT_LABELLED) => return,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the secret-write policy is not enforced after 30 s; the probe got {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The chart installed watching two namespaces, with the operator and the verifier running as its
/// Deployments would, each with exactly the chart's RBAC (by impersonating its ServiceAccount) and
/// under its secret-write policy; then upgraded to watch every namespace.
#[tokio::test]
async fn operator_works_with_exactly_the_charts_rbac() {
    let mut d = AsDeployed::install().await;
    let requested = d.issues_rotates_and_restores_labels().await;
    d.serves_the_second_namespace().await;
    d.leaves_a_foreign_secret_alone().await;
    d.refuses_everything_outside_its_rules().await;
    d.is_confined_by_the_secret_write_policy().await;
    d.verifier_may_only_watch_directories().await;
    d.works_cluster_wide_after_an_upgrade(&requested).await;
    let (ok, _, err) = helm(d.cp, &["uninstall", RELEASE, "-n", &d.release_ns]);
    assert!(ok, "{err}");
}

const RELEASE: &str = "tokens";
const FULLNAME: &str = "tokens-scim-token-operator";

/// What the steps of `operator_works_with_exactly_the_charts_rbac` share.
struct AsDeployed {
    cp: &'static ControlPlane,
    admin: kube::Client,
    release_ns: String,
    team_ns: String,
    team2_ns: String,
    other_ns: String,
    /// The operator's ServiceAccount, as a user name.
    user: String,
    kubeconfig: PathBuf,
    as_operator: kube::Client,
    team_secrets: Api<Secret>,
    team: Env,
    op: Operator,
    pod: String,
    verifier_kubeconfig: PathBuf,
    verifier_log: PathBuf,
    as_verifier: kube::Client,
    verifier: DeployedVerifier,
}

impl AsDeployed {
    /// Installs the chart watching two namespaces and starts the operator and the verifier as deployed.
    async fn install() -> AsDeployed {
        let cp = ControlPlane::shared();
        let admin = cp.client().await;
        let release_ns = cp.create_namespace("rbac-op").await.unwrap();
        let team_ns = cp.create_namespace("rbac-team").await.unwrap();
        let team2_ns = cp.create_namespace("rbac-team").await.unwrap();
        let other_ns = cp.create_namespace("rbac-other").await.unwrap();
        let (release, fullname) = (RELEASE, FULLNAME);

        // A stripped label (below) takes the Secret out of the operator's label-filtered cache; the operator
        // takes that for a deleted Secret, an automatic issue, and defers it while the last issue is younger
        // than --min-issue-interval (1m) before it looks the Secret up and restores the label. Shorten the
        // interval through the chart's minIssueInterval, so that the test does not wait a minute.
        let (ok, out, err) = helm(
            cp,
            &[
                "install",
                release,
                CHART,
                "-n",
                &release_ns,
                "--set",
                &format!("watchNamespaces={{{team_ns},{team2_ns}}}"),
                "--set",
                "minIssueInterval=1s",
            ],
        );
        assert!(ok, "helm install: {err}{out}");

        let user = format!("system:serviceaccount:{release_ns}:{fullname}");
        let sa_group = format!("system:serviceaccounts:{release_ns}");
        let groups = ["system:serviceaccounts", sa_group.as_str(), "system:authenticated"];
        let kubeconfig = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{release_ns}.kubeconfig"));
        impersonating_kubeconfig(cp, &user, &groups, &kubeconfig);
        let as_operator = cp.impersonating_client(&user, &groups).await;
        // The operator runs under the chart's secret-write policy from its first request.
        let team_secrets: Api<Secret> = Api::namespaced(as_operator.clone(), &team_ns);
        wait_until_policy_enforced(&team_secrets).await;

        let team = Env { cp, client: admin.clone(), ns: team_ns.clone(), log: fresh_log(&team_ns) };
        let (op, pod) = start_as_deployed(cp, release, &release_ns, &kubeconfig, &team.log);

        // The verifier as the chart deploys it, impersonating its own ServiceAccount (list + watch on
        // ScimDirectories in the watched namespaces, nothing else), next to the operator. Ready before the
        // first issue, so every token below reaches it through its watch.
        let verifier_user = format!("system:serviceaccount:{release_ns}:{fullname}-verifier");
        let verifier_kubeconfig =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{release_ns}-verifier.kubeconfig"));
        impersonating_kubeconfig(cp, &verifier_user, &groups, &verifier_kubeconfig);
        let as_verifier = cp.impersonating_client(&verifier_user, &groups).await;
        let verifier_log = fresh_log(&format!("{release_ns}-verifier"));
        let verifier = DeployedVerifier::start(cp, release, &release_ns, &verifier_kubeconfig, &verifier_log);
        verifier.wait_ready().await;
        assert_eq!(
            verifier.verify_token(Token::generate().expose(), None).status,
            401,
            "an empty index accepts nothing"
        );
        AsDeployed {
            cp,
            admin,
            release_ns,
            team_ns,
            team2_ns,
            other_ns,
            user,
            kubeconfig,
            as_operator,
            team_secrets,
            team,
            op,
            pod,
            verifier_kubeconfig,
            verifier_log,
            as_verifier,
            verifier,
        }
    }

    /// Issue, verify, rotate twice, restore a stripped label; returns the current token.
    async fn issues_rotates_and_restores_labels(&self) -> String {
        let team = &self.team;
        let team_ns = &self.team_ns;
        let team2_ns = &self.team2_ns;
        let verifier = &self.verifier;
        // Issue.
        let (ok, _, err) = team.apply(BASIC);
        assert!(ok, "{err}");
        let d = team.wait_ready_reason("acme", "TokenIssued").await;
        let token = team.token("acme-scim-token").await.expect("a token");

        // The verifier accepts it, naming the directory; refuses an unknown token with a challenge and a
        // token of this directory on another directory's route.
        let allowed = verifier.wait_status(&token, 200, "the issued token accepted by the verifier").await;
        assert_eq!(allowed.header("x-scim-directory-namespace"), Some(team_ns.as_str()), "{allowed:?}");
        assert_eq!(allowed.header("x-scim-directory-name"), Some("acme"), "{allowed:?}");
        let unknown = verifier.verify_token(Token::generate().expose(), None);
        assert_eq!(unknown.status, 401, "{unknown:?}");
        let challenge = unknown.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with(r#"Bearer realm="scim", error="invalid_token""#), "{unknown:?}");
        assert_eq!(http_request(verifier.port, "GET", "/verify", &[]).unwrap().status, 401, "no token");
        let bound = |directory: &str| {
            let header = format!("Bearer {token}");
            let by_query = http_request(
                verifier.port,
                "GET",
                &format!("/verify?directory={directory}"),
                &[("Authorization", &header)],
            )
            .unwrap()
            .status;
            let by_header = http_request(
                verifier.port,
                "GET",
                "/verify",
                &[("Authorization", &header), ("X-Scim-Expected-Directory", directory)],
            )
            .unwrap()
            .status;
            (by_query, by_header)
        };
        assert_eq!(bound(&format!("{team_ns}/acme")), (200, 200), "the directory's own route");
        assert_eq!(bound(&format!("{team2_ns}/acme")), (403, 403), "another directory's route");
        let owners = team.secrets().get("acme-scim-token").await.unwrap().metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].controller, Some(true));
        // Setting blockOwnerDeletion would need update on scimdirectories/finalizers under the
        // OwnerReferencesPermissionEnforcement admission plugin, which the chart does not grant.
        assert_ne!(owners[0].block_owner_deletion, Some(true));
        assert_eq!(d.status.as_ref().unwrap().token_hash.as_deref(), Some(sha256(&token).as_str()));

        // Rotate, declaratively and imperatively.
        team.dirs()
            .patch("acme", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 1 } })))
            .await
            .unwrap();
        team.wait_ready_reason("acme", "TokenRotated").await;
        let rotated = team.token("acme-scim-token").await.unwrap();
        assert_ne!(rotated, token);
        let (ok, _, err) =
            team.kubectl(&["annotate", "--overwrite", "scimdir", "acme", "scim.tokenops.dev/rotate=now"]);
        assert!(ok, "{err}");
        wait_for("the requested rotation", Duration::from_secs(60), || async {
            let d = team.dirs().get("acme").await.unwrap();
            (d.status?.last_rotation_request.as_deref() == Some("now")).then_some(())
        })
        .await;
        let requested = team.token("acme-scim-token").await.unwrap();
        assert_ne!(requested, rotated);
        // The verifier follows (no rotationOverlap: the replaced tokens die at once).
        verifier.wait_status(&requested, 200, "the rotated token accepted by the verifier").await;
        for old in [&token, &rotated] {
            assert_eq!(verifier.verify_token(old, None).status, 401, "a rotated-out token is refused");
        }

        // A stripped managed-by label is restored, without a re-issue: an update whose old object lacks the
        // label (the policy requires the controller ownerReference there, not the label).
        let (ok, _, err) = team.kubectl(&["label", "secret", "acme-scim-token", "app.kubernetes.io/managed-by-"]);
        assert!(ok, "{err}");
        wait_for("the managed-by label restored", Duration::from_secs(30), || async {
            let labels = team.secrets().get("acme-scim-token").await.ok()?.metadata.labels?;
            (labels.get("app.kubernetes.io/managed-by")? == "scim-token-operator").then_some(())
        })
        .await;
        assert_eq!(team.token("acme-scim-token").await.unwrap(), requested, "restoring the label never re-issues");
        requested
    }

    /// The second watched namespace, with a secretTemplate.
    async fn serves_the_second_namespace(&self) {
        let cp = self.cp;
        let admin = &self.admin;
        let team = &self.team;
        let team2_ns = &self.team2_ns;
        let verifier = &self.verifier;
        // The second watched namespace is served too.
        let team2 = Env { cp, client: admin.clone(), ns: team2_ns.clone(), log: team.log.clone() };
        let (ok, _, err) = team2.apply(BASIC);
        assert!(ok, "{err}");
        team2.wait_ready_reason("acme", "TokenIssued").await;
        let team2_token = team2.token("acme-scim-token").await.expect("a token in the second namespace");
        let allowed = verifier.wait_status(&team2_token, 200, "the second namespace's token accepted").await;
        assert_eq!(allowed.header("x-scim-directory-namespace"), Some(team2_ns.as_str()), "{allowed:?}");
        // A secretTemplate: a create, then a server-side apply of the template onto the new Secret.
        let (ok, _, err) = team2.apply(
            "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: templated\nspec:\n  secretTemplate:\n    labels:\n      tenant: initech\n",
        );
        assert!(ok, "{err}");
        team2.wait_ready_reason("templated", "TokenIssued").await;
        wait_for("the template's label on the Secret", Duration::from_secs(30), || async {
            let labels = team2.secrets().get("templated-scim-token").await.ok()?.metadata.labels?;
            (labels.get("tenant")? == "initech").then_some(())
        })
        .await;
    }

    /// A conflict, its Event folded into a series, and the Lease.
    async fn leaves_a_foreign_secret_alone(&self) {
        let fullname = FULLNAME;
        let admin = &self.admin;
        let team = &self.team;
        let release_ns = &self.release_ns;
        let team_ns = &self.team_ns;
        let as_operator = &self.as_operator;
        let pod = &self.pod;
        // Conflict: a Secret the operator does not own is never touched.
        let foreign: Secret =
            serde_json::from_value(json!({ "metadata": { "name": "taken" }, "stringData": { "token": "theirs" } }))
                .unwrap();
        let foreign = team.secrets().create(&PostParams::default(), &foreign).await.unwrap();
        let (ok, _, err) = team.apply(
            "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: thief\nspec:\n  secretName: taken\n",
        );
        assert!(ok, "{err}");
        team.wait_ready_reason("thief", "SecretConflict").await;
        let after = team.secrets().get("taken").await.unwrap();
        assert_eq!(
            after.metadata.resource_version, foreign.metadata.resource_version,
            "the foreign Secret is untouched"
        );

        // Events: the Warning, once (retries with backoff publish nothing new).
        let warning = wait_for("a SecretConflict Warning event", Duration::from_secs(30), || async {
            team.events_for("thief")
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("SecretConflict") && e.type_.as_deref() == Some("Warning"))
        })
        .await;
        // A directory's repeated Event (same type and reason within 6 minutes) folds into a series with a
        // merge patch of the Event (src/events.rs): the same patch, made with the operator's identity.
        let operator_events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(as_operator.clone(), team_ns);
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
        operator_events
            .patch(
                warning.metadata.name.as_deref().unwrap(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "series": { "count": 2, "lastObservedTime": now } })),
            )
            .await
            .expect("the operator may patch its Events into a series");
        assert_eq!(team.events_for("acme").await.len(), 2, "an Event for each rotation, none for the first token");

        // The Lease in the release namespace, held by this "pod".
        let leases: Api<Lease> = Api::namespaced(admin.clone(), release_ns);
        let lease = leases.get(fullname).await.expect("the leader-election Lease");
        assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(pod.as_str()));
    }

    /// A directory outside the watched namespaces, and RBAC's refusals.
    async fn refuses_everything_outside_its_rules(&self) {
        let fullname = FULLNAME;
        let admin = &self.admin;
        let release_ns = &self.release_ns;
        let team_ns = &self.team_ns;
        let other_ns = &self.other_ns;
        let as_operator = &self.as_operator;
        let team_secrets = &self.team_secrets;
        // Scope: a directory outside the watched namespace is never reconciled.
        let others: Api<ScimDirectory> = Api::namespaced(admin.clone(), other_ns);
        let outsider: ScimDirectory = serde_yaml::from_str(BASIC).unwrap();
        others.create(&PostParams::default(), &outsider).await.unwrap();

        // Refusals: with these credentials nothing outside the rules is possible.
        let secrets_elsewhere: Api<Secret> = Api::namespaced(as_operator.clone(), other_ns);
        forbidden(secrets_elsewhere.list(&ListParams::default()).await, "listing Secrets in another namespace");
        forbidden(secrets_elsewhere.get("acme-scim-token").await, "reading a Secret in another namespace");
        let secret = Secret {
            metadata: kube::api::ObjectMeta { name: Some("planted".into()), ..Default::default() },
            ..Default::default()
        };
        forbidden(
            secrets_elsewhere.create(&PostParams::default(), &secret).await,
            "creating a Secret in another namespace",
        );
        forbidden(
            Api::<Secret>::all(as_operator.clone()).list(&ListParams::default()).await,
            "listing Secrets cluster-wide",
        );
        forbidden(team_secrets.delete("taken", &DeleteParams::default()).await, "deleting a Secret");
        let mut replaced = team_secrets.get("taken").await.unwrap();
        replaced.string_data = Some([("token".to_string(), "mine".to_string())].into());
        forbidden(team_secrets.replace("taken", &PostParams::default(), &replaced).await, "updating a Secret");
        let team_dirs: Api<ScimDirectory> = Api::namespaced(as_operator.clone(), team_ns);
        forbidden(
            team_dirs
                .patch("acme", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 9 } })))
                .await,
            "changing a directory's spec",
        );
        forbidden(team_dirs.delete("acme", &DeleteParams::default()).await, "deleting a directory");
        let config_maps: Api<ConfigMap> = Api::namespaced(as_operator.clone(), team_ns);
        forbidden(config_maps.list(&ListParams::default()).await, "listing ConfigMaps");
        forbidden(
            Api::<Lease>::namespaced(as_operator.clone(), release_ns).get("kube-scheduler").await,
            "reading another Lease",
        );
        forbidden(
            Api::<Lease>::namespaced(as_operator.clone(), team_ns).get(fullname).await,
            "reading a Lease elsewhere",
        );
        forbidden(
            Api::<Role>::namespaced(as_operator.clone(), team_ns).list(&ListParams::default()).await,
            "reading RBAC",
        );
    }

    /// What the secret-write policy refuses and admits in a watched namespace. RBAC lets the
    /// ServiceAccount create and patch every Secret of a watched namespace (of the cluster, in
    /// `works_cluster_wide_after_an_upgrade`); the policy lets it write the operator's own Secrets only.
    async fn is_confined_by_the_secret_write_policy(&self) {
        self.policy_admits_only_secrets_a_directory_controls().await;
        // Deleting, re-parenting and dropping ownerReferences are already refused by RBAC (no delete)
        // and, on this control plane, by OwnerReferencesPermissionEnforcement (changing
        // ownerReferences needs delete). A cluster without that plugin, or with a broader Role, has
        // neither: grant delete on Secrets for a moment, so that the policy alone stands in the way.
        self.grant_delete_on_secrets(true).await;
        self.policy_refuses_deleting_taking_over_or_moving_secrets().await;
        self.grant_delete_on_secrets(false).await;

        let others: Api<ScimDirectory> = Api::namespaced(self.admin.clone(), &self.other_ns);
        assert!(others.get("acme").await.unwrap().status.is_none(), "the outsider was never reconciled");
        let log = std::fs::read_to_string(&self.team.log).unwrap();
        assert!(!log.to_lowercase().contains("forbidden"), "the operator was never refused:\n{log}");
    }

    fn acme_owner_ref(dir: &ScimDirectory) -> Value {
        serde_json::to_value(dir.controller_owner_ref(&()).unwrap()).unwrap()
    }

    /// Creates of a Secret named `planted`: refused unless labelled and controlled by a directory.
    async fn policy_admits_only_secrets_a_directory_controls(&self) {
        let managed = json!({ "app.kubernetes.io/managed-by": "scim-token-operator" });
        let acme_ref = Self::acme_owner_ref(&self.team.dirs().get("acme").await.unwrap());
        let with = |field: &str, value: Value| {
            let mut owner = acme_ref.clone();
            owner[field] = value;
            Some(owner)
        };
        struct Planted {
            what: &'static str,
            labels: Value,
            owner: Option<Value>,
            refused_with: &'static str,
        }
        let cases = [
            Planted {
                what: "creating an unlabelled Secret",
                labels: json!({}),
                owner: None,
                refused_with: NOT_LABELLED,
            },
            Planted {
                what: "creating an unlabelled Secret a directory controls",
                labels: json!({}),
                owner: Some(acme_ref.clone()),
                refused_with: NOT_LABELLED,
            },
            Planted {
                what: "creating a labelled Secret without an ownerReference",
                labels: managed.clone(),
                owner: None,
                refused_with: NOT_OWNED,
            },
            Planted {
                what: "creating a labelled Secret a directory owns but does not control",
                labels: managed.clone(),
                owner: with("controller", json!(false)),
                refused_with: NOT_OWNED,
            },
            Planted {
                what: "creating a labelled Secret controlled by another group's ScimDirectory",
                labels: managed.clone(),
                owner: with("apiVersion", json!("scim.example.com/v1alpha1")),
                refused_with: NOT_OWNED,
            },
        ];
        for Planted { what, labels, owner, refused_with } in cases {
            let planted = test_secret("planted", labels, owner.as_ref());
            let message =
                refused_by_policy(self.team_secrets.create(&PostParams::default(), &planted).await, refused_with, what);
            let (team_ns, user) = (&self.team_ns, &self.user);
            assert!(message.contains(&format!("refused CREATE of Secret {team_ns}/planted by {user}: ")), "{message}");
        }
        self.team_secrets
            .create(
                &PostParams { dry_run: true, ..PostParams::default() },
                &test_secret("planted", managed.clone(), Some(&acme_ref)),
            )
            .await
            .expect("the policy admits a labelled Secret a directory controls (dry run)");
    }

    /// Grants (or takes back) delete on the team's Secrets to the operator's ServiceAccount, and waits
    /// until the authorizer says so.
    async fn grant_delete_on_secrets(&self, granted: bool) {
        let roles: Api<Role> = Api::namespaced(self.admin.clone(), &self.team_ns);
        let bindings: Api<RoleBinding> = Api::namespaced(self.admin.clone(), &self.team_ns);
        let name = "test-delete-secrets";
        if !granted {
            bindings.delete(name, &DeleteParams::default()).await.unwrap();
            roles.delete(name, &DeleteParams::default()).await.unwrap();
            return;
        }
        let role: Role = serde_json::from_value(json!({
            "metadata": { "name": name },
            "rules": [{ "apiGroups": [""], "resources": ["secrets"], "verbs": ["delete"] }]
        }))
        .unwrap();
        roles.create(&PostParams::default(), &role).await.unwrap();
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
            "subjects": [{ "kind": "ServiceAccount", "name": FULLNAME, "namespace": self.release_ns }]
        }))
        .unwrap();
        bindings.create(&PostParams::default(), &binding).await.unwrap();
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.as_operator.clone());
        let review: SelfSubjectAccessReview = serde_json::from_value(json!({
            "spec": { "resourceAttributes": { "namespace": self.team_ns, "verb": "delete", "resource": "secrets" } }
        }))
        .unwrap();
        wait_for("the ServiceAccount may delete Secrets", Duration::from_secs(30), || async {
            reviews.create(&PostParams::default(), &review).await.unwrap().status?.allowed.then_some(())
        })
        .await;
    }

    /// With delete granted: the foreign Secret `taken` and the operator's own `acme-scim-token` can be
    /// neither deleted, taken over, moved to another directory nor cut loose; an update that keeps the
    /// operator's Secret what it is passes.
    async fn policy_refuses_deleting_taking_over_or_moving_secrets(&self) {
        let (team, team_secrets) = (&self.team, &self.team_secrets);
        let managed = json!({ "app.kubernetes.io/managed-by": "scim-token-operator" });
        let acme_ref = Self::acme_owner_ref(&team.dirs().get("acme").await.unwrap());
        let thief_ref = Self::acme_owner_ref(&team.dirs().get("thief").await.unwrap());
        let takeover = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": "taken", "labels": managed, "ownerReferences": [acme_ref] }
        });
        enum Write {
            Delete,
            Apply(Value),
            Merge(Value),
        }
        struct Refused {
            what: &'static str,
            secret: &'static str,
            write: Write,
            refused_with: &'static str,
        }
        let cases = [
            Refused { what: "deleting a foreign Secret", secret: "taken", write: Write::Delete, refused_with: DELETED },
            Refused {
                what: "deleting the operator's own Secret",
                secret: "acme-scim-token",
                write: Write::Delete,
                refused_with: DELETED,
            },
            Refused {
                what: "taking over a foreign Secret by applying the label and a controller ownerReference",
                secret: "taken",
                write: Write::Apply(takeover.clone()),
                refused_with: TAKEOVER,
            },
            Refused {
                what: "taking over a foreign Secret with a merge patch",
                secret: "taken",
                write: Write::Merge(takeover),
                refused_with: TAKEOVER,
            },
            Refused {
                what: "moving the operator's Secret to another directory",
                secret: "acme-scim-token",
                write: Write::Merge(json!({ "metadata": { "ownerReferences": [thief_ref] } })),
                refused_with: MOVED,
            },
            Refused {
                what: "dropping the ownerReference of the operator's Secret",
                secret: "acme-scim-token",
                write: Write::Merge(json!({ "metadata": { "ownerReferences": null } })),
                refused_with: NOT_OWNED,
            },
        ];
        let versions = || async {
            let taken = team.secrets().get("taken").await.unwrap().metadata.resource_version;
            let acme = team.secrets().get("acme-scim-token").await.unwrap().metadata.resource_version;
            (taken, acme)
        };
        let before = versions().await;
        for Refused { what, secret, write, refused_with } in cases {
            let result = match write {
                Write::Delete => team_secrets.delete(secret, &DeleteParams::default()).await.map(|_| ()),
                Write::Apply(s) => team_secrets
                    .patch(secret, &PatchParams::apply("intruder").force(), &Patch::Apply(&s))
                    .await
                    .map(|_| ()),
                Write::Merge(patch) => {
                    team_secrets.patch(secret, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
                }
            };
            refused_by_policy(result, refused_with, what);
        }
        team_secrets
            .patch(
                "acme-scim-token",
                &PatchParams { dry_run: true, ..PatchParams::default() },
                &Patch::Merge(json!({ "metadata": { "annotations": { "example.com/checked": "yes" } } })),
            )
            .await
            .expect("the policy admits an update of the operator's own Secret (dry run)");
        assert_eq!(versions().await, before, "the refused writes changed nothing");
    }

    /// The verifier's ServiceAccount: list + watch on ScimDirectories, nothing else.
    async fn verifier_may_only_watch_directories(&mut self) {
        let release_ns = &self.release_ns;
        let team_ns = &self.team_ns;
        let team2_ns = &self.team2_ns;
        let other_ns = &self.other_ns;
        let as_verifier = &self.as_verifier;
        let verifier = &mut self.verifier;
        // The verifier's ServiceAccount: refused everything but list + watch on ScimDirectories.
        refusals_of_the_verifier(as_verifier, team_ns, release_ns).await;
        let verifier_rules = [("scim.tokenops.dev/scimdirectories: list,watch".to_string())].into();
        for watched in [&team_ns, &team2_ns] {
            assert_eq!(allowed_rules(as_verifier, watched).await, verifier_rules, "the verifier's rights in {watched}");
        }
        for elsewhere in [&release_ns, &other_ns] {
            assert_eq!(
                allowed_rules(as_verifier, elsewhere).await,
                BTreeSet::new(),
                "the verifier's rights in {elsewhere}"
            );
        }
        let metrics = verifier.metrics();
        assert!(
            metrics.contains(&format!(
                r#"scim_token_verifier_token_last_used_timestamp_seconds{{namespace="{team_ns}",name="acme",token="current"}}"#
            )),
            "{metrics}"
        );
        assert!(metrics.contains(r#"scim_token_verifier_requests_total{result="allowed"}"#), "{metrics}");
        verifier.terminate().await;
    }

    /// Upgraded to watch every namespace: the operator and the verifier restarted as deployed.
    async fn works_cluster_wide_after_an_upgrade(&mut self, requested: &str) {
        let cp = self.cp;
        let release = RELEASE;
        let fullname = FULLNAME;
        let admin = &self.admin;
        let team = &self.team;
        let release_ns = &self.release_ns;
        let team_ns = &self.team_ns;
        let other_ns = &self.other_ns;
        let as_operator = &self.as_operator;
        let as_verifier = &self.as_verifier;
        let kubeconfig = &self.kubeconfig;
        let verifier_kubeconfig = &self.verifier_kubeconfig;
        let verifier_log = &self.verifier_log;
        let create = PostParams::default();
        let managed = json!({ "app.kubernetes.io/managed-by": "scim-token-operator" });
        let verifier_rules: BTreeSet<String> = VERIFIER_RULES.iter().map(|r| (*r).to_owned()).collect();
        let op = &mut self.op;
        // Cluster-wide: upgrade to watch every namespace and restart as the new Deployment would.
        let (team_rv, secret_rv) = (
            team.dirs().get("acme").await.unwrap().metadata.resource_version,
            team.secrets().get("acme-scim-token").await.unwrap().metadata.resource_version,
        );
        assert!(op.terminate().await.success(), "graceful shutdown");
        let (ok, out, err) = helm(cp, &["upgrade", release, CHART, "-n", release_ns, "--reset-values"]);
        assert!(ok, "helm upgrade: {err}{out}");
        let roles: Api<Role> = Api::namespaced(admin.clone(), team_ns);
        assert!(roles.get_opt(fullname).await.unwrap().is_none(), "the namespaced Role is gone");
        let (_op, _) = start_as_deployed(cp, release, release_ns, kubeconfig, &team.log);
        let other = Env { cp, client: admin.clone(), ns: other_ns.clone(), log: team.log.clone() };
        other.wait_ready_reason("acme", "TokenIssued").await;
        let outsider_token = other.token("acme-scim-token").await.expect("the outsider's token");
        // The verifier, restarted from the upgraded release: its ClusterRole lets it see every namespace,
        // still with nothing but list + watch on ScimDirectories.
        let mut verifier = DeployedVerifier::start(cp, release, release_ns, verifier_kubeconfig, verifier_log);
        verifier.wait_ready().await;
        let allowed = verifier.wait_status(&outsider_token, 200, "the outsider's token accepted cluster-wide").await;
        assert_eq!(allowed.header("x-scim-directory-namespace"), Some(other_ns.as_str()), "{allowed:?}");
        assert_eq!(verifier.verify_token(requested, None).status, 200, "the team's token too");
        refusals_of_the_verifier(as_verifier, other_ns, release_ns).await;
        for namespace in [&team_ns, &other_ns, &release_ns] {
            assert_eq!(allowed_rules(as_verifier, namespace).await, verifier_rules, "cluster-wide, in {namespace}");
        }
        verifier.terminate().await;
        let log = std::fs::read_to_string(verifier_log).unwrap();
        assert_eq!(
            log.matches("index ready").count(),
            2,
            "{} holds both verifiers' output:\n{log}",
            verifier_log.display()
        );
        for refused in ["forbidden", "failed", "error"] {
            assert!(!log.to_lowercase().contains(refused), "the verifier was never refused ({refused}):\n{log}");
        }
        for seen in support::SEEN_TOKENS.lock().unwrap().iter().filter(|t| t.len() > 20) {
            assert!(!log.contains(&seen[5..]), "a plaintext token appeared in {}", verifier_log.display());
        }
        // Cluster-wide RBAC lets the ServiceAccount create a Secret in any namespace: the policy still
        // refuses it any Secret but the operator's own.
        let other_secrets: Api<Secret> = Api::namespaced(as_operator.clone(), other_ns);
        refused_by_policy(
            other_secrets.create(&create, &test_secret("planted", json!({}), None)).await,
            NOT_LABELLED,
            "creating an unlabelled Secret, cluster-wide",
        );
        refused_by_policy(
            other_secrets.create(&create, &test_secret("planted", managed.clone(), None)).await,
            NOT_OWNED,
            "creating a labelled Secret without an ownerReference, cluster-wide",
        );
        // The restarted operator re-derived everything from the cluster and wrote nothing for the team.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(team.dirs().get("acme").await.unwrap().metadata.resource_version, team_rv);
        assert_eq!(team.secrets().get("acme-scim-token").await.unwrap().metadata.resource_version, secret_rv);
        forbidden(
            Api::<Secret>::namespaced(as_operator.clone(), other_ns)
                .delete("acme-scim-token", &DeleteParams::default())
                .await,
            "deleting a Secret, cluster-wide too",
        );
        forbidden(
            Api::<ConfigMap>::all(as_operator.clone()).list(&ListParams::default()).await,
            "listing ConfigMaps cluster-wide",
        );

        let log = std::fs::read_to_string(&team.log).unwrap();
        assert!(!log.to_lowercase().contains("forbidden"), "the operator was never refused:\n{log}");
        team.assert_log_clean().await;
        other.assert_log_clean().await;
    }
}
