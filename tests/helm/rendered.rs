//! The chart rendered with representative values: what each rendering must hold, and that the API
//! server accepts it (server-side dry run).

use super::*;

/// One `helm template` of the chart, named by what its values make of it.
struct Rendering {
    case: &'static str,
    release: &'static str,
    sets: Vec<String>,
    check: fn(&Rendered),
    /// Whether the objects also go through a server-side dry run.
    dry_run: bool,
}

/// A rendering's objects and the namespaces its values name.
struct Rendered<'a> {
    objects: &'a [Value],
    /// The release namespace.
    ns: &'a str,
    team: &'a str,
    team2: &'a str,
}

#[tokio::test]
async fn rendered_manifests_are_accepted_by_the_api_server() {
    let cp = ControlPlane::shared();
    let admin = cp.client().await;
    install_prometheus_operator_crds(cp).await;
    let ns = cp.create_namespace("render").await.unwrap();
    let team = cp.create_namespace("render-team").await.unwrap();
    let team2 = cp.create_namespace("render-team").await.unwrap();
    for Rendering { case, release, sets, check, dry_run: accepted } in renderings(&team, &team2) {
        eprintln!("rendering: {case}");
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let objects = render(cp, release, &ns, &sets);
        check(&Rendered { objects: &objects, ns: &ns, team: &team, team2: &team2 });
        if accepted {
            dry_run(cp, &objects);
        }
    }
    // The dry-run created nothing.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    assert!(deployments.list(&ListParams::default()).await.unwrap().items.is_empty());
}

fn renderings(team: &str, team2: &str) -> Vec<Rendering> {
    let sets = |sets: &[&str]| sets.iter().map(|s| s.to_string()).collect();
    let watch_both = format!("watchNamespaces={{{team},{team2}}}");
    vec![
        Rendering {
            case: "all namespaces, one operator replica: cluster-wide RBAC, no PodDisruptionBudget for the \
                   operator; the secret-write policy, the NetworkPolicy (ingress only) and the verifier (two \
                   replicas, so a PodDisruptionBudget of its own) are on by default",
            release: "all",
            sets: vec![],
            check: all_namespaces_by_default,
            dry_run: true,
        },
        Rendering {
            case: "two namespaces, two replicas, monitoring: Roles only (the operator's and the verifier's in \
                   each watched namespace), a PDB each, the monitoring objects",
            release: "one",
            sets: sets(&[
                &watch_both,
                "replicas=2",
                "serviceMonitor.enabled=true",
                "prometheusRule.enabled=true",
                "networkPolicy.apiServer.cidrs={10.0.0.1/32,127.0.0.1/32}",
                "minIssueInterval=90s",
                "verifier.networkPolicy.proxies[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=istio-system",
                "verifier.networkPolicy.proxies[0].podSelector.matchLabels.istio=ingressgateway",
                "verifier.networkPolicy.proxies[1].ipBlock.cidr=10.20.0.0/16",
            ]),
            check: two_namespaces_two_replicas_monitoring,
            dry_run: true,
        },
        Rendering {
            case: "the secret-write policy and both NetworkPolicies switched off render none of them",
            release: "off",
            sets: sets(&[
                "secretWritePolicy.enabled=false",
                "networkPolicy.enabled=false",
                "verifier.networkPolicy.enabled=false",
            ]),
            check: switched_off,
            dry_run: false,
        },
        Rendering {
            case: "existing ServiceAccounts: the operator's is the one the policy confines; scrapers narrowed to \
                   some pods of the monitoring namespaces",
            release: "byo",
            sets: sets(&[
                "serviceAccount.create=false",
                "serviceAccount.name=custom",
                "networkPolicy.metrics.podSelector.matchLabels.app=prometheus",
                "verifier.serviceAccount.create=false",
                "verifier.serviceAccount.name=custom-verifier",
            ]),
            check: existing_service_accounts,
            dry_run: false,
        },
        Rendering {
            case: "without the verifier: not one of its objects, the ServiceMonitor selects the operator only, and \
                   the monitoring objects still render (the overlap alert stays: it needs only the metrics)",
            release: "noverify",
            sets: sets(&["verifier.enabled=false", "serviceMonitor.enabled=true", "prometheusRule.enabled=true"]),
            check: without_the_verifier,
            dry_run: true,
        },
        Rendering {
            case: "Entra on AKS: the settings as flags, the CA bundle mounted read-only, the workload identity \
                   label next to the user's pod labels and the client-id annotation next to the user's \
                   ServiceAccount annotations; no AZURE_* variable of the chart's own",
            release: "entra",
            sets: sets(&[
                &format!("entra.graphEndpoint={ENTRA_GRAPH}"),
                &format!("entra.authorityHost={ENTRA_AUTHORITY}"),
                "entra.pollInterval=30s",
                "entra.caBundle.configMapName=egress-proxy-ca",
                "entra.caBundle.key=root.pem",
                "entra.workloadIdentity.enabled=true",
                &format!("entra.workloadIdentity.clientId={ENTRA_CLIENT_ID}"),
                "podLabels.team=identity",
                "serviceAccount.annotations.owner=identity",
            ]),
            check: entra_on_aks,
            dry_run: true,
        },
        Rendering {
            case: "Entra, workload identity without a client id, and an existing ServiceAccount: the label only",
            release: "entra-byo",
            sets: sets(&[
                "entra.workloadIdentity.enabled=true",
                "entra.pollInterval=2m",
                "serviceAccount.create=false",
                "serviceAccount.name=custom",
            ]),
            check: entra_label_only,
            dry_run: false,
        },
    ]
}

const ENTRA_GRAPH: &str = "https://graph.microsoft.us";
const ENTRA_AUTHORITY: &str = "https://login.microsoftonline.us/";
const ENTRA_CLIENT_ID: &str = "7a0b5a3e-1d2c-4b6f-9e8d-0c1b2a3d4e5f";

/// The operator's pod spec, container, pod labels and (when the chart creates it) ServiceAccount.
fn operator_pod(objects: &[Value]) -> (&Value, &Value, &Value, Option<&Value>) {
    let deployment = find_of(objects, "Deployment", "operator");
    let pod = &deployment["spec"]["template"]["spec"];
    let service_account = of_component(objects, "ServiceAccount", "operator").next();
    (pod, &pod["containers"][0], &deployment["spec"]["template"]["metadata"]["labels"], service_account)
}

/// Without `entra.*`: `run` alone, no volume, no workload identity label or annotation, no AZURE_*
/// variable (which would keep AKS's webhook from setting its own).
fn check_no_entra(objects: &[Value]) {
    let (pod, container, labels, service_account) = operator_pod(objects);
    assert_eq!(container["args"], json!(["run"]));
    assert!(pod.get("volumes").is_none() && container.get("volumeMounts").is_none(), "{pod}");
    assert!(labels.get("azure.workload.identity/use").is_none(), "{labels}");
    assert!(service_account.unwrap()["metadata"].get("annotations").is_none());
    check_no_azure_env(objects);
}

fn check_no_azure_env(objects: &[Value]) {
    for component in ["operator", "verifier"] {
        for deployment in of_component(objects, "Deployment", component) {
            let env = container_env(deployment, "pod", "ns");
            assert!(!env.iter().any(|(k, _)| k.starts_with("AZURE_")), "{component}: {env:?}");
            assert!(!env.iter().any(|(k, _)| k == "GRAPH_ENDPOINT" || k.starts_with("ENTRA_")), "{env:?}");
        }
    }
}

fn entra_on_aks(r: &Rendered) {
    let (pod, container, labels, service_account) = operator_pod(r.objects);
    assert_eq!(
        container["args"],
        json!([
            "run",
            format!("--graph-endpoint={ENTRA_GRAPH}"),
            format!("--entra-authority-host={ENTRA_AUTHORITY}"),
            "--entra-poll-interval=30s",
            "--entra-ca-file=/etc/scim-token-operator/entra-ca/ca.pem"
        ])
    );
    assert_eq!(
        container["volumeMounts"],
        json!([{ "name": "entra-ca", "mountPath": "/etc/scim-token-operator/entra-ca", "readOnly": true }])
    );
    assert_eq!(
        pod["volumes"],
        json!([{
            "name": "entra-ca",
            "configMap": { "name": "egress-proxy-ca", "items": [{ "key": "root.pem", "path": "ca.pem" }] }
        }])
    );
    assert_eq!(labels["azure.workload.identity/use"], "true");
    assert_eq!(labels["team"], "identity", "the user's pod labels stay");
    let deployment = find_of(r.objects, "Deployment", "operator");
    assert!(selects(&deployment["spec"]["selector"], labels));
    assert_eq!(
        service_account.unwrap()["metadata"]["annotations"],
        json!({ "azure.workload.identity/client-id": ENTRA_CLIENT_ID, "owner": "identity" })
    );
    // The verifier never calls Microsoft: none of it there.
    let verifier = find_of(r.objects, "Deployment", "verifier");
    assert!(verifier["spec"]["template"]["metadata"]["labels"].get("azure.workload.identity/use").is_none());
    assert_eq!(verifier["spec"]["template"]["spec"]["containers"][0]["args"], json!(["verify"]));
    assert!(
        of_component(r.objects, "ServiceAccount", "verifier").next().unwrap()["metadata"].get("annotations").is_none()
    );
    check_no_azure_env(r.objects);
}

fn entra_label_only(r: &Rendered) {
    let (pod, container, labels, service_account) = operator_pod(r.objects);
    assert_eq!(container["args"], json!(["run", "--entra-poll-interval=2m"]));
    assert!(pod.get("volumes").is_none() && container.get("volumeMounts").is_none());
    assert_eq!(labels["azure.workload.identity/use"], "true");
    assert!(service_account.is_none(), "an existing ServiceAccount");
    assert_eq!(pod["serviceAccountName"], "custom");
    check_no_azure_env(r.objects);
}

/// The Prometheus Operator's CRDs, reduced to what a server-side dry-run needs.
async fn install_prometheus_operator_crds(cp: &ControlPlane) {
    for (plural, kind) in [("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule")] {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": { "name": format!("{plural}.monitoring.coreos.com") },
            "spec": {
                "group": "monitoring.coreos.com",
                "names": { "plural": plural, "kind": kind },
                "scope": "Namespaced",
                "versions": [{ "name": "v1", "served": true, "storage": true,
                    "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } } }]
            }
        }))
        .unwrap();
        cp.install_crd(&crd).await.unwrap();
    }
}

fn all_namespaces_by_default(r: &Rendered) {
    let (objects, ns) = (r.objects, r.ns);
    assert_eq!(
        kinds(objects),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
        .map(String::from)
        .into(),
    );
    let cluster_role = find_of(objects, "ClusterRole", "operator");
    assert_eq!(rules(cluster_role), OPERATOR_RULES.map(String::from).into());
    let lease_role = named(objects, "Role", "all-scim-token-operator-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], ns, "the Lease Role is in the release namespace");
    assert_eq!(
        rules(lease_role),
        [
            "coordination.k8s.io/leases: create".to_string(),
            "coordination.k8s.io/leases: get,patch names=[\"all-scim-token-operator\"]".to_string()
        ]
        .into()
    );
    check_record_key_rbac(objects, ns, "all-scim-token-operator", "all-scim-token-operator");
    assert!(of_component(objects, "PodDisruptionBudget", "operator").next().is_none(), "one operator replica");
    check_deployment(find_of(objects, "Deployment", "operator"), None);
    check_verifier(objects, ns, "all-scim-token-operator-verifier", None);
    check_no_entra(objects);
    check_secret_write_policy(objects, ns, "all-scim-token-operator");
    check_network_policy(objects, &[]);
    check_verifier_network_policy(
        objects,
        &[json!({ "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "ingress-nginx" } } })],
        &[],
    );
}

fn two_namespaces_two_replicas_monitoring(r: &Rendered) {
    let (objects, ns, team, team2) = (r.objects, r.ns, r.team, r.team2);
    assert_eq!(
        kinds(objects),
        [
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
        .map(String::from)
        .into(),
        "no cluster-wide RBAC when watchNamespaces is set"
    );
    check_watched_namespace_roles(r);
    check_record_key_rbac(objects, ns, "one-scim-token-operator", "one-scim-token-operator");
    let deployment = find_of(objects, "Deployment", "operator");
    check_deployment(deployment, Some(&format!("{team},{team2}")));
    assert_eq!(deployment["spec"]["replicas"], 2);
    let env = container_env(deployment, "pod", "ns");
    assert!(env.contains(&("MIN_ISSUE_INTERVAL".into(), "90s".into())), "minIssueInterval: {env:?}");
    let pdb = find_of(objects, "PodDisruptionBudget", "operator");
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    check_verifier(objects, ns, "one-scim-token-operator-verifier", Some(&format!("{team},{team2}")));
    check_monitoring(objects);
    check_secret_write_policy(objects, ns, "one-scim-token-operator");
    check_network_policy(objects, &["10.0.0.1/32", "127.0.0.1/32"]);
    check_verifier_network_policy(
        objects,
        &[
            json!({
                "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "istio-system" } },
                "podSelector": { "matchLabels": { "istio": "ingressgateway" } }
            }),
            json!({ "ipBlock": { "cidr": "10.20.0.0/16" } }),
        ],
        &["10.0.0.1/32", "127.0.0.1/32"],
    );
}

/// The operator's and the verifier's Role in each watched namespace, bound to its ServiceAccount of the
/// release namespace; with the Lease's and the record key's, six Roles.
fn check_watched_namespace_roles(r: &Rendered) {
    let objects = r.objects;
    for (component, service_account, expected) in [
        ("operator", "one-scim-token-operator", &OPERATOR_RULES[..]),
        ("verifier", "one-scim-token-operator-verifier", &VERIFIER_RULES[..]),
    ] {
        for watched in [r.team, r.team2] {
            let role = of_component(objects, "Role", component)
                .find(|o| o["metadata"]["namespace"] == watched)
                .unwrap_or_else(|| panic!("a {component} Role in the watched namespace {watched}"));
            assert_eq!(rules(role), expected.iter().map(|r| r.to_string()).collect());
            let binding = of_component(objects, "RoleBinding", component)
                .find(|o| o["metadata"]["namespace"] == watched)
                .unwrap_or_else(|| panic!("a {component} RoleBinding in the watched namespace {watched}"));
            assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
            assert_eq!(
                binding["subjects"],
                json!([{ "kind": "ServiceAccount", "name": service_account, "namespace": r.ns }]),
                "bound to the {component}'s ServiceAccount of the release namespace"
            );
        }
    }
    assert_eq!(
        objects.iter().filter(|o| o["kind"] == "Role").count(),
        6,
        "2 watched namespaces × 2, the Lease and the record key"
    );
}

/// The alerts use the operator's metrics; one ServiceMonitor scrapes both metrics Services, on the
/// port name they share, keeping the directories' own namespace label.
fn check_monitoring(objects: &[Value]) {
    let alerts = serde_json::to_string(find(objects, "PrometheusRule")).unwrap();
    for alert in ["ScimTokenExpiringSoon", "ScimTokenExpired", "ScimTokenOperatorReconcileErrors"] {
        assert!(alerts.contains(alert), "PrometheusRule has {alert}");
    }
    for metric in ["scim_token_operator_token_expiry_timestamp_seconds", "scim_token_operator_reconcile_errors_total"] {
        assert!(alerts.contains(metric), "the alerts use the operator's metric {metric}");
    }
    check_overlap_alert(find(objects, "PrometheusRule"));
    let monitor = find(objects, "ServiceMonitor");
    for component in ["operator", "verifier"] {
        let service = find_of(objects, "Service", component);
        assert!(
            selects(&monitor["spec"]["selector"], &service["metadata"]["labels"]),
            "the ServiceMonitor selects the {component}'s Service"
        );
        assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == "http-metrics"));
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
}

fn switched_off(r: &Rendered) {
    for kind in ["NetworkPolicy", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] {
        assert!(!kinds(r.objects).contains(kind), "no {kind} when switched off");
    }
}

fn existing_service_accounts(r: &Rendered) {
    let (objects, ns) = (r.objects, r.ns);
    check_secret_write_policy(objects, ns, "custom");
    check_record_key_rbac(objects, ns, "byo-scim-token-operator", "custom");
    let ingress_nginx =
        json!({ "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "ingress-nginx" } } });
    check_verifier_network_policy(objects, &[ingress_nginx], &[]);
    assert_eq!(
        find_of(objects, "NetworkPolicy", "operator")["spec"]["ingress"][0]["from"][0]["podSelector"],
        json!({ "matchLabels": { "app": "prometheus" } })
    );
    assert!(of_component(objects, "ServiceAccount", "verifier").next().is_none());
    assert_eq!(
        find_of(objects, "ClusterRoleBinding", "verifier")["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "custom-verifier", "namespace": ns }])
    );
    check_verifier(objects, ns, "custom-verifier", None);
}

fn without_the_verifier(r: &Rendered) {
    let objects = r.objects;
    assert!(
        objects.iter().all(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] != "verifier"),
        "verifier.enabled=false renders nothing of the verifier"
    );
    assert_eq!(objects.iter().filter(|o| o["kind"] == "Deployment").count(), 1);
    assert_eq!(
        find(objects, "ServiceMonitor")["spec"]["selector"]["matchExpressions"][0]["values"],
        json!(["scim-token-operator"])
    );
}

/// The object of `kind` named `name`.
fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let mut matching = objects.iter().filter(|o| o["kind"] == kind && o["metadata"]["name"] == name);
    let found = matching.next().unwrap_or_else(|| panic!("no {kind} {name} rendered"));
    assert!(matching.next().is_none(), "more than one {kind} {name} rendered");
    found
}

/// The record key (src: RECORD_KEY_SECRET, `<fullname>-record-key` in the release namespace): the
/// operator's Deployment names it, and a Role + RoleBinding in the release namespace, whatever
/// `watchNamespaces` says, let the operator's ServiceAccount get that Secret and create Secrets (which
/// resourceNames cannot narrow; the secret-write policy does).
fn check_record_key_rbac(objects: &[Value], namespace: &str, fullname: &str, service_account: &str) {
    let record_key = format!("{fullname}-record-key");
    let env = container_env(find_of(objects, "Deployment", "operator"), "pod", namespace);
    assert!(env.contains(&("RECORD_KEY_SECRET".into(), record_key.clone())), "{env:?}");
    let role = named(objects, "Role", &record_key);
    assert_eq!(role["metadata"]["namespace"], namespace, "the record key's Role is in the release namespace");
    assert_eq!(rules(role), ["/secrets: create".to_string(), format!("/secrets: get names=[\"{record_key}\"]")].into());
    let binding = named(objects, "RoleBinding", &record_key);
    assert_eq!(binding["metadata"]["namespace"], namespace);
    assert_eq!(
        binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": record_key })
    );
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": service_account, "namespace": namespace }])
    );
}

/// The verifier's objects: `scim-token-operator verify` with the operator's image and hardening, two
/// replicas spread over nodes, no leader election, its own ServiceAccount with list + watch on
/// ScimDirectories only, a PodDisruptionBudget and a Service with `http-verify` and `http-metrics`; no
/// selector of the operator's matches its pods, and none of its selectors matches the operator's.
fn check_verifier(objects: &[Value], namespace: &str, service_account: &str, watch_namespace: Option<&str>) {
    let deployment = find_of(objects, "Deployment", "verifier");
    check_deployment(deployment, watch_namespace);
    assert_eq!(deployment["metadata"]["namespace"], namespace);
    check_verifier_pod(objects, deployment, service_account);
    check_verifier_selectors(objects, deployment);
    check_verifier_rbac(objects, namespace, service_account, watch_namespace);
}

/// The verifier's pod: the operator's image and security settings, its probes, ports and environment.
fn check_verifier_pod(objects: &[Value], deployment: &Value, service_account: &str) {
    let operator = find_of(objects, "Deployment", "operator");
    assert_eq!(deployment["spec"]["replicas"], 2, "two verifier replicas by default");
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], service_account);
    assert_eq!(pod["automountServiceAccountToken"], true, "it needs its token to reach the API server");
    let container = &pod["containers"][0];
    assert_eq!(container["args"], json!(["verify"]));
    assert_eq!(container["image"], operator["spec"]["template"]["spec"]["containers"][0]["image"]);
    assert_eq!(container["securityContext"], operator["spec"]["template"]["spec"]["containers"][0]["securityContext"]);
    assert_eq!(pod["securityContext"], operator["spec"]["template"]["spec"]["securityContext"]);
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "http-metrics");
    // Readiness: the gRPC health service on the `grpc` container port (a grpc probe takes a number),
    // asking for the server's overall status (no `service`: ""), which the verifier turns SERVING with
    // its index; `cargo xtask bench-verify --check` asserts that it does.
    let grpc_port = container["ports"].as_array().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(container["readinessProbe"]["grpc"], json!({ "port": grpc_port["containerPort"] }));
    assert!(container["readinessProbe"]["httpGet"].is_null(), "one handler per probe");
    assert_eq!(container["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(
        container["ports"],
        json!([
            { "name": "http-verify", "containerPort": 8081, "protocol": "TCP" },
            { "name": "grpc", "containerPort": 8082, "protocol": "TCP" },
            { "name": "http-metrics", "containerPort": 8080, "protocol": "TCP" }
        ])
    );
    let env = container_env(deployment, "pod", "ns");
    assert!(env.contains(&("VERIFY_LISTEN".into(), "0.0.0.0:8081".into())), "{env:?}");
    assert!(env.contains(&("METRICS_ADDR".into(), "0.0.0.0:8080".into())), "{env:?}");
    assert!(env.contains(&("VERIFY_GRPC_LISTEN".into(), "0.0.0.0:8082".into())), "{env:?}");
    assert!(env.contains(&("VERIFY_STRIP_AUTHORIZATION".into(), "false".into())), "{env:?}");
    // The limits against slow clients, connection floods and a stale index, as the binary's defaults.
    for (name, value) in [
        ("VERIFY_MAX_CONNECTIONS", "1024"),
        ("VERIFY_HEADER_READ_TIMEOUT", "10s"),
        ("VERIFY_IDLE_TIMEOUT", "90s"),
        ("VERIFY_MAX_STALENESS", "5m"),
    ] {
        assert!(env.contains(&(name.into(), value.into())), "{name}: {env:?}");
    }
    assert!(
        !env.iter().any(|(k, _)| k.starts_with("LEADER_ELECTION") || k == "POD_NAMESPACE"),
        "no leader election, no Lease: {env:?}"
    );
}

/// The verifier's pods and the operator's are told apart by every selector; its Service and
/// PodDisruptionBudget select its pods.
fn check_verifier_selectors(objects: &[Value], deployment: &Value) {
    let operator = find_of(objects, "Deployment", "operator");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let operator_pod_labels = &operator["spec"]["template"]["metadata"]["labels"];
    let service_selector = |service: &Value| json!({ "matchLabels": service["spec"]["selector"] });
    for selector in [&operator["spec"]["selector"], &service_selector(find_of(objects, "Service", "operator"))] {
        assert!(!selects(selector, pod_labels), "an operator selector {selector} selects verifier pods");
    }
    if let Some(policy) = of_component(objects, "NetworkPolicy", "operator").next() {
        assert!(
            !selects(&policy["spec"]["podSelector"], pod_labels),
            "the operator's NetworkPolicy selects verifier pods"
        );
    }
    let service = find_of(objects, "Service", "verifier");
    for selector in [&service_selector(service), &deployment["spec"]["selector"]] {
        assert!(selects(selector, pod_labels), "{selector} selects the verifier pods");
        assert!(!selects(selector, operator_pod_labels), "{selector} selects operator pods");
    }
    assert_eq!(
        service["spec"]["ports"],
        json!([
            { "name": "http-verify", "port": 8081, "targetPort": "http-verify", "protocol": "TCP" },
            {
                "name": "grpc",
                "port": 8082,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "kubernetes.io/h2c"
            },
            { "name": "http-metrics", "port": 8080, "targetPort": "http-metrics", "protocol": "TCP" }
        ])
    );
    let pdb = find_of(objects, "PodDisruptionBudget", "verifier");
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
}

/// The verifier's RBAC: exactly list + watch on ScimDirectories, wherever the operator has its rules.
fn check_verifier_rbac(objects: &[Value], namespace: &str, service_account: &str, watch_namespace: Option<&str>) {
    let roles: Vec<&Value> =
        ["ClusterRole", "Role"].iter().flat_map(|k| of_component(objects, k, "verifier")).collect();
    let bindings: Vec<&Value> =
        ["ClusterRoleBinding", "RoleBinding"].iter().flat_map(|k| of_component(objects, k, "verifier")).collect();
    assert_eq!(roles.len(), watch_namespace.map_or(1, |n| n.split(',').count()));
    assert_eq!(bindings.len(), roles.len());
    for role in roles {
        assert_eq!(rules(role), VERIFIER_RULES.map(String::from).into());
    }
    for binding in bindings {
        assert_eq!(
            binding["subjects"],
            json!([{ "kind": "ServiceAccount", "name": service_account, "namespace": namespace }])
        );
    }
}

/// `ScimPreviousTokenStillInUse`: the previous token authenticated in the last 10 min (at any verifier
/// replica: max by namespace, name) and its overlap window ends within 15 min, joined per directory.
fn check_overlap_alert(rule: &Value) {
    let alert = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "ScimPreviousTokenStillInUse")
        .expect("the overlap alert");
    let expr: String = alert["expr"].as_str().unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        expr,
        "max by (namespace, name) (scim_token_verifier_previous_token_valid_until_timestamp_seconds) < time() + 900 \
         and on (namespace, name) \
         max by (namespace, name) (scim_token_verifier_token_last_used_timestamp_seconds{token=\"previous\"}) > time() - 600"
    );
    assert_eq!(alert["labels"]["severity"], "warning");
}

/// The pod-level guarantees of the issue: hardened, probed, bounded, spread.
fn check_deployment(deployment: &Value, watch_namespace: Option<&str>) {
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The operator is ready on /readyz; the verifier on gRPC health (check_verifier).
    if deployment["metadata"]["labels"]["app.kubernetes.io/component"] != "verifier" {
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    }
    assert!(
        container["resources"]["requests"]["memory"].is_string()
            && container["resources"]["limits"]["memory"].is_string()
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["labelSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    let env = container_env(deployment, "pod", "ns");
    let watch = env.iter().find(|(k, _)| k == "WATCH_NAMESPACE").map(|(_, v)| v.as_str());
    assert_eq!(watch, watch_namespace);
}

/// The secret-write ValidatingAdmissionPolicy and its binding: enforced (Deny), failing closed, for the
/// release's ServiceAccount only. What it refuses is shown on the API server by
/// `operator_works_with_exactly_the_charts_rbac`.
fn check_secret_write_policy(objects: &[Value], namespace: &str, service_account: &str) {
    let policy = find(objects, "ValidatingAdmissionPolicy");
    let binding = find(objects, "ValidatingAdmissionPolicyBinding");
    let name = policy["metadata"]["name"].as_str().unwrap();
    assert!(name.contains(namespace), "the cluster-scoped policy's name carries the release namespace: {name}");
    assert_eq!(binding["metadata"]["name"], name);
    assert_eq!(binding["spec"]["policyName"], name);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        policy["spec"]["matchConstraints"]["resourceRules"],
        json!([{
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["secrets"],
            "operations": ["CREATE", "UPDATE", "DELETE"]
        }])
    );
    assert_eq!(
        policy["spec"]["matchConditions"],
        json!([{
            "name": "scim-token-operator-service-account",
            "expression": format!("request.userInfo.username == 'system:serviceaccount:{namespace}:{service_account}'")
        }])
    );
    // The one Secret it lets the operator create outside the token Secrets' rules is the one its
    // Deployment names as the record key, in the release namespace.
    let env = container_env(find_of(objects, "Deployment", "operator"), "pod", namespace);
    let record_key = &env.iter().find(|(k, _)| k == "RECORD_KEY_SECRET").expect("RECORD_KEY_SECRET").1;
    let variables = policy["spec"]["variables"].as_array().unwrap();
    let is_record_key = variables.iter().find(|v| v["name"] == "recordKey").expect("the recordKey variable");
    assert_eq!(
        is_record_key["expression"],
        format!(
            "request.operation != \"DELETE\" && request.namespace == '{namespace}' && \
             object.metadata.name == '{record_key}'"
        )
    );
}

/// The NetworkPolicy: metrics only from the `monitoring` namespace; egress restricted to the API server's
/// CIDRs and DNS when those CIDRs are given, else left open.
fn check_network_policy(objects: &[Value], api_server_cidrs: &[&str]) {
    let deployment = find_of(objects, "Deployment", "operator");
    let spec = &find_of(objects, "NetworkPolicy", "operator")["spec"];
    assert_eq!(spec["podSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(
        spec["ingress"],
        json!([{
            "from": [{ "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "monitoring" } } }],
            "ports": [{ "port": "http-metrics", "protocol": "TCP" }]
        }])
    );
    let ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == "http-metrics"), "the port the NetworkPolicy names exists");
    if api_server_cidrs.is_empty() {
        assert_eq!(spec["policyTypes"], json!(["Ingress"]), "egress stays open without the API server's CIDRs");
        assert!(spec.get("egress").is_none());
        return;
    }
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    let blocks: Vec<Value> = api_server_cidrs.iter().map(|c| json!({ "ipBlock": { "cidr": c } })).collect();
    assert_eq!(
        spec["egress"],
        json!([
            { "to": blocks, "ports": [{ "port": 443, "protocol": "TCP" }, { "port": 6443, "protocol": "TCP" }] },
            {
                "to": [{
                    "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "kube-system" } },
                    "podSelector": { "matchLabels": { "k8s-app": "kube-dns" } }
                }],
                "ports": [{ "port": 53, "protocol": "UDP" }, { "port": 53, "protocol": "TCP" }]
            }
        ])
    );
}

/// The verifier's NetworkPolicy: its pods only; the verify ports (`http-verify`, `grpc`) only from
/// `proxies`, the metrics port (which lists every directory) only from the operator's scrapers
/// (`networkPolicy.metrics`); egress as the operator's (restricted only with the API server's CIDRs).
fn check_verifier_network_policy(objects: &[Value], proxies: &[Value], api_server_cidrs: &[&str]) {
    let deployment = find_of(objects, "Deployment", "verifier");
    let policy = find_of(objects, "NetworkPolicy", "verifier");
    let operator_policy = find_of(objects, "NetworkPolicy", "operator");
    assert_ne!(policy["metadata"]["name"], operator_policy["metadata"]["name"]);
    let spec = &policy["spec"];
    assert_eq!(spec["podSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    let operator_pods = &find_of(objects, "Deployment", "operator")["spec"]["template"]["metadata"]["labels"];
    assert!(!selects(&spec["podSelector"], operator_pods), "the verifier's NetworkPolicy selects operator pods");
    let scrapers = &operator_policy["spec"]["ingress"][0]["from"];
    assert_eq!(
        spec["ingress"],
        json!([
            {
                "from": proxies,
                "ports": [{ "port": "http-verify", "protocol": "TCP" }, { "port": "grpc", "protocol": "TCP" }]
            },
            { "from": scrapers, "ports": [{ "port": "http-metrics", "protocol": "TCP" }] }
        ])
    );
    // Every port the policy names is a port of the verifier's container, and every container port is named.
    let ports: BTreeSet<String> = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ports, ["grpc", "http-metrics", "http-verify"].map(String::from).into());
    assert_eq!(spec["policyTypes"], operator_policy["spec"]["policyTypes"]);
    assert_eq!(spec.get("egress"), operator_policy["spec"].get("egress"));
    if api_server_cidrs.is_empty() {
        assert!(spec.get("egress").is_none(), "egress stays open without the API server's CIDRs");
    }
}

/// `kubectl apply --dry-run=server` of rendered objects: schema, admission and RBAC escalation checks.
fn dry_run(cp: &ControlPlane, objects: &[Value]) {
    let manifest = objects.iter().map(|o| serde_yaml::to_string(o).unwrap()).collect::<Vec<_>>().join("---\n");
    let mut cmd = cp.kubectl();
    cmd.args(["apply", "--dry-run=server", "-f", "-"]);
    let (ok, out, err) = run(cmd, Some(&manifest));
    assert!(ok, "server-side dry-run refused the chart:\n{err}\n{out}");
    assert_eq!(out.lines().filter(|l| l.ends_with("(server dry run)")).count(), objects.len(), "{out}");
}
