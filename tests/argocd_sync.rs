//! GitOps with a real Argo CD: Argo CD v2.14.21's application controller, repo server and
//! API server (`hack/argocd.sh`, built from the Go module proxy, cached; `ARGOCD_VERSION` picks
//! another release) sync ScimDirectories and the chart from a Git repository on 127.0.0.1 to the test
//! control plane, with the project's health check and `rotate` action installed into `argocd-cm` as
//! docs/gitops.md says (tests/support/argocd.rs); the action runs through the real `argocd` CLI.
//! Everything is asserted from Argo CD's own Application status and from the cluster.
//!
//! Each directory test syncs `examples/argocd/application-directories.yaml` (its syncPolicy verbatim:
//! automated, selfHeal, no prune, CreateNamespace, ServerSideApply), pointed at the loopback
//! repository, a branch and folder of its own (one test's commits never move another's revision) and
//! its own namespace, in which the operator runs. The folder holds the repository's own
//! `examples/*.yaml` directories.

#[path = "support/argocd.rs"]
mod argocd_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use argocd_support::{ArgoCd, NAMESPACE, RECONCILIATION};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value as Json, json};
use support::{Env, Operator, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const ROTATE: &str = "scim.tokenops.dev/rotate";

fn example(file: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/examples/{file}")).unwrap()
}

/// `examples/argocd/application-directories.yaml`, pointed at the loopback repository, branch and
/// folder `name` and namespace `name`, named `name`.
fn application(argo: &ArgoCd, name: &str) -> Json {
    let text = std::fs::read_to_string(format!("{ROOT}/examples/argocd/application-directories.yaml")).unwrap();
    let mut app: Json = serde_yaml::from_str(&text).unwrap();
    app["metadata"]["name"] = json!(name);
    app["metadata"]["namespace"] = json!(NAMESPACE);
    app["spec"]["source"]["repoURL"] = json!(argo.repo_url);
    app["spec"]["source"]["targetRevision"] = json!(name);
    app["spec"]["source"]["path"] = json!(name);
    app["spec"]["destination"]["namespace"] = json!(name);
    app
}

fn sync_status(app: &Json) -> (&str, &str, &str) {
    let s = &app["status"];
    (
        s["sync"]["status"].as_str().unwrap_or(""),
        s["health"]["status"].as_str().unwrap_or(""),
        s["sync"]["revision"].as_str().unwrap_or(""),
    )
}

/// The ScimDirectory resources of the Application's status: (name, status, health, health message).
fn directories(app: &Json) -> Vec<(String, String, String, String)> {
    app["status"]["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["kind"] == "ScimDirectory")
        .map(|r| {
            let s = |v: &Json| v.as_str().unwrap_or("").to_owned();
            (s(&r["name"]), s(&r["status"]), s(&r["health"]["status"]), s(&r["health"]["message"]))
        })
        .collect()
}

/// Synced to `revision`, Healthy, with exactly the directories `names`, each Synced and Healthy.
fn synced_healthy(app: &Json, revision: &str, names: &[&str]) -> bool {
    let (sync, health, rev) = sync_status(app);
    let dirs = directories(app);
    sync == "Synced"
        && health == "Healthy"
        && rev == revision
        && dirs.len() == names.len()
        && dirs.iter().all(|(n, s, h, _)| names.contains(&n.as_str()) && s == "Synced" && h == "Healthy")
}

struct Case {
    argo: &'static ArgoCd,
    env: Env,
    _operator: Operator,
    /// The Application, its branch, its folder and the namespace: all named after the namespace.
    app: String,
}

impl Case {
    /// A namespace with the operator, a folder in Git holding `files`, and the Application syncing it;
    /// returns once Argo CD says Synced and Healthy at that commit.
    async fn start(prefix: &str, files: &[(&str, &str)]) -> (Case, String) {
        let argo = ArgoCd::shared();
        let env = Env::new(prefix).await;
        let operator = env.operator(&[]);
        let app = env.ns.clone();
        let case = Case { argo, env, _operator: operator, app };
        let added: Vec<(&str, Option<&str>)> = files.iter().map(|(f, c)| (*f, Some(*c))).collect();
        let revision = case.commit(&added, "add directories");
        argo.apply(&application(argo, &case.app));
        let names: Vec<String> = files.iter().map(|(_, c)| name_of(c)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        case.wait(&format!("Synced and Healthy at {revision}"), |a| synced_healthy(a, &revision, &names).then_some(()))
            .await;
        (case, revision)
    }

    async fn wait<T>(&self, what: &str, f: impl FnMut(&Json) -> Option<T>) -> T {
        self.argo.wait_app(&self.app, what, SYNC_TIMEOUT, f).await
    }

    fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        let owned: Vec<(String, Option<&str>)> = files.iter().map(|(f, c)| (format!("{}/{f}", self.app), *c)).collect();
        let refs: Vec<(&str, Option<&str>)> = owned.iter().map(|(f, c)| (f.as_str(), *c)).collect();
        self.argo.commit(&self.app, &refs, message)
    }

    /// Watches `cycles` periodic refreshes of the Application by the controller (every
    /// `timeout.reconciliation`) and asserts `check` on its status all along.
    async fn across_reconciliations(&self, cycles: usize, check: impl Fn(&Json)) {
        let start = self.argo.refreshes(&self.app);
        let timeout = RECONCILIATION * (cycles as u32 + 2) * 2;
        self.argo
            .wait_app(&self.app, &format!("{cycles} periodic refreshes"), timeout, |a| {
                check(a);
                (self.argo.refreshes(&self.app) >= start + cycles).then_some(())
            })
            .await;
        // The status after the last refresh.
        check(&self.argo.app(&self.app).unwrap());
    }

    /// The sync operations Argo CD has run: status.history's revisions.
    fn history(app: &Json) -> Vec<String> {
        app["status"]["history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| h["revision"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Events about directory `name` whose note contains `reason` (the operator's issue reasons).
    async fn issues(&self, name: &str, reason: &str) -> usize {
        self.env.events_for(name).await.iter().filter(|e| e.note.as_deref().unwrap_or("").contains(reason)).count()
    }
}

fn name_of(manifest: &str) -> String {
    let v: Json = serde_yaml::from_str(manifest).unwrap();
    v["metadata"]["name"].as_str().unwrap().to_owned()
}

/// A directory that leaves everything to the CRD's defaults (`spec.rotationGeneration` defaults to 0).
const MINIMAL: &str =
    "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: minimal\nspec: {}\n";

/// An Application syncing ScimDirectories (the repository's own examples and one with only CRD
/// defaults) is Synced and Healthy, and stays Synced, with no further sync, across several periodic
/// reconciliations: nothing the CRD defaults, the operator (status, the Secret) or the API server set
/// shows as a diff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_and_healthy_and_stays_synced() {
    let files = [("acme.yaml", example("basic.yaml")), ("globex.yaml", example("with-expiry.yaml"))];
    let mut files: Vec<(&str, &str)> = files.iter().map(|(f, c)| (*f, c.as_str())).collect();
    files.push(("minimal.yaml", MINIMAL));
    let (case, revision) = Case::start("argo-sync", &files).await;
    // hack/argocd.sh builds ARGOCD_VERSION, v2.14.21 unless set.
    let wanted = std::env::var("ARGOCD_VERSION").unwrap_or_else(|_| "2.14.21".into());
    assert!(
        case.argo.version.contains(&format!(" v{}+", wanted.trim_start_matches('v'))),
        "Argo CD {}",
        case.argo.version
    );
    let acme = case.env.token("acme-scim-token").await.expect("acme's token");
    let globex = case.env.token("globex-scim-token").await.expect("globex's token");

    let app = case.argo.app(&case.app).unwrap();
    // The Secrets are the operator's, not Argo CD's: not among the Application's resources.
    let kinds: BTreeSet<&str> =
        app["status"]["resources"].as_array().unwrap().iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["ScimDirectory"]), "{app:#}");
    for (name, _, _, message) in directories(&app) {
        assert!(message.contains("issued"), "{name}'s health message is the operator's: {message}");
    }

    case.across_reconciliations(3, |a| {
        assert!(synced_healthy(a, &revision, &["acme", "globex", "minimal"]), "left Synced/Healthy: {:#}", a["status"]);
        assert_eq!(Case::history(a), vec![revision.clone()], "one sync only (no self-heal)");
    })
    .await;
    assert_eq!(case.env.token("acme-scim-token").await.as_deref(), Some(acme.as_str()), "acme not rotated");
    assert_eq!(case.env.token("globex-scim-token").await.as_deref(), Some(globex.as_str()), "globex not rotated");
    let minimal = case.env.dirs().get("minimal").await.unwrap();
    assert_eq!(minimal.spec.rotation_generation, 0, "defaulted by the CRD, not in Git");
    // Argo CD watches the Secrets (children of the directories) but shows and logs no token.
    let app = case.argo.app(&case.app).unwrap().to_string();
    assert!(!app.contains(&acme) && !app.contains(&globex), "a token in the Application");
    case.argo.assert_logs_free_of(&[&acme, &globex]);
    case.env.assert_log_clean().await;
}

/// A commit that bumps `spec.rotationGeneration`: Argo CD syncs it, the operator rotates exactly once,
/// the Application is Healthy again and stays so; later reconciliations rotate nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_generation_commit_rotates_once() {
    let basic = example("basic.yaml");
    let (case, first) = Case::start("argo-rotgen", &[("acme.yaml", &basic)]).await;
    let before = case.env.token("acme-scim-token").await.expect("acme's token");

    let bumped = basic.replace("rotationGeneration: 0", "rotationGeneration: 1");
    assert_ne!(bumped, basic, "examples/basic.yaml sets rotationGeneration: 0");
    let second = case.commit(&[("acme.yaml", Some(&bumped))], "rotate acme");
    case.wait(&format!("Synced and Healthy at {second}"), |a| synced_healthy(a, &second, &["acme"]).then_some(()))
        .await;
    let dir = case.env.dirs().get("acme").await.unwrap();
    assert_eq!(dir.status.as_ref().unwrap().observed_rotation_generation, Some(1));
    let after = case.env.token("acme-scim-token").await.unwrap();
    assert_ne!(after, before, "rotated");
    let app = case.argo.app(&case.app).unwrap();
    let message = &directories(&app)[0].3;
    assert!(message.contains("RotationGenerationChanged"), "Argo CD shows the operator's message: {message}");

    case.across_reconciliations(3, |a| {
        assert!(synced_healthy(a, &second, &["acme"]), "left Synced/Healthy: {:#}", a["status"]);
        assert_eq!(Case::history(a), vec![first.clone(), second.clone()], "one sync per commit");
    })
    .await;
    assert_eq!(case.env.token("acme-scim-token").await.as_deref(), Some(after.as_str()), "rotated once only");
    assert_eq!(case.issues("acme", "RotationGenerationChanged").await, 1, "one rotation Event");
    case.env.assert_log_clean().await;
}

fn resource_row<'a>(action: &'a str, disabled: &'a str) -> [&'a str; 5] {
    ["scim.tokenops.dev", "ScimDirectory", "acme", action, disabled]
}

/// `argocd app actions run <app> rotate` through Argo CD's API server: the server runs the action's
/// Lua and patches the directory; the operator rotates once and records the request in
/// `status.lastRotationRequest`; the Application is Healthy again, and the automated sync with selfHeal
/// neither removes the annotation nor rotates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_action_rotates_once_and_survives_self_heal() {
    let (case, revision) = Case::start("argo-action", &[("acme.yaml", &example("basic.yaml"))]).await;
    let before = case.env.token("acme-scim-token").await.expect("acme's token");
    // Label tracking and server-side apply leave no annotation: the action adds a whole new map.
    // Argo CD 3.x tracks by annotation.
    let live = case.env.dirs().get("acme").await.unwrap();
    let keys: Vec<String> = live.metadata.annotations.unwrap_or_default().into_keys().collect();
    let tracking: &[&str] = if case.argo.v3() { &["argocd.argoproj.io/tracking-id"] } else { &[] };
    assert_eq!(keys, tracking, "annotations before");

    let resource = ["--group", "scim.tokenops.dev", "--kind", "ScimDirectory", "--resource-name", "acme"];
    let (ok, out, err) = case.argo.cli(&[&["app", "actions", "list", &case.app][..], &resource].concat());
    // GROUP KIND NAME ACTION DISABLED
    let offered = out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()[..] == resource_row("rotate", "false"));
    assert!(ok && offered, "argocd app actions list: {out}{err}");
    let started = Timestamp::now().as_second();
    let (ok, out, err) = case.argo.cli(&[&["app", "actions", "run", &case.app, "rotate"][..], &resource].concat());
    assert!(ok, "argocd app actions run: {out}{err}");

    let dir = case.env.dirs().get("acme").await.unwrap();
    let value = dir.metadata.annotations.as_ref().and_then(|a| a.get(ROTATE)).cloned().expect("the annotation set");
    let at: Timestamp = value.parse().unwrap_or_else(|e| panic!("{value} is not RFC 3339: {e}"));
    assert!((started..=Timestamp::now().as_second()).contains(&at.as_second()), "{value} is the time of the action");
    // Patched by Argo CD's API server, with the annotation and nothing else: its field manager is the
    // executable's name (`argocd` here, `argocd-server` in Argo CD's image); `argocd-controller` is
    // the sync's.
    let managers: BTreeMap<String, String> = dir
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.is_none())
        .map(|m| {
            (m.manager.clone().unwrap_or_default(), m.fields_v1.as_ref().map(|f| f.0.to_string()).unwrap_or_default())
        })
        .collect();
    let mut by_server = json!({ "f:metadata": { "f:annotations": { ".": {}, "f:scim.tokenops.dev/rotate": {} } } });
    if case.argo.v3() {
        // The map was there: the tracking annotation's.
        by_server["f:metadata"]["f:annotations"].as_object_mut().unwrap().remove(".");
    }
    assert_eq!(managers.keys().collect::<Vec<_>>(), ["argocd", "argocd-controller"], "{managers:?}");
    assert_eq!(managers["argocd"], by_server.to_string());
    wait_for("the request handled and recorded", Duration::from_secs(30), || async {
        let d = case.env.dirs().get("acme").await.ok()?;
        (d.status?.last_rotation_request.as_deref() == Some(value.as_str())).then_some(())
    })
    .await;
    let after = case.env.token("acme-scim-token").await.unwrap();
    assert_ne!(after, before, "rotated");

    case.wait("Healthy with the rotation", |a| {
        let dirs = directories(a);
        (synced_healthy(a, &revision, &["acme"]) && dirs[0].3.contains("RotationRequested")).then_some(())
    })
    .await;
    case.across_reconciliations(3, |a| {
        assert!(synced_healthy(a, &revision, &["acme"]), "left Synced/Healthy: {:#}", a["status"]);
        assert_eq!(Case::history(a), vec![revision.clone()], "no self-heal sync");
    })
    .await;
    let dir = case.env.dirs().get("acme").await.unwrap();
    let annotations = dir.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get(ROTATE), Some(&value), "annotation kept");
    assert_eq!(dir.status.unwrap().last_rotation_request.as_ref(), Some(&value), "still recorded");
    assert_eq!(case.env.token("acme-scim-token").await.as_deref(), Some(after.as_str()), "rotated once only");
    assert_eq!(case.issues("acme", "RotationRequested").await, 1, "one rotation Event");
    case.env.assert_log_clean().await;
}

/// A directory whose Secret name is taken by a Secret that is not the operator's: Degraded in Argo CD,
/// with the operator's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_conflict_is_degraded_with_the_operators_message() {
    let argo = ArgoCd::shared();
    let env = Env::new("argo-conflict").await;
    let (ok, _, err) = env.kubectl(&["create", "secret", "generic", "acme-scim-token", "--from-literal=token=theirs"]);
    assert!(ok, "{err}");
    let _operator = env.operator(&[]);
    let revision =
        argo.commit(&env.ns, &[(&format!("{}/acme.yaml", env.ns), Some(&example("basic.yaml")))], "conflict");
    argo.apply(&application(argo, &env.ns));
    let message = argo
        .wait_app(&env.ns, "Degraded", SYNC_TIMEOUT, |a| {
            let (sync, health, rev) = sync_status(a);
            let dirs = directories(a);
            (sync == "Synced" && health == "Degraded" && rev == revision && dirs.len() == 1 && dirs[0].2 == "Degraded")
                .then(|| dirs[0].3.clone())
        })
        .await;
    let dir = env.wait_ready_reason("acme", "SecretConflict").await;
    assert_eq!(message, dir.ready_condition().unwrap().message, "Argo CD shows the operator's message");
}

/// A token that expired (the operator's `TokenExpired`): Degraded in Argo CD, the directory's and so
/// the Application's health, with the operator's message. A rotation with an overlap window: Healthy,
/// with the operator's message and until when the previous token stays valid. Both read from the
/// Application's resource health, as Argo CD's application controller computed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_degraded_and_an_overlap_is_healthy() {
    let expiring = "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: expiring\nspec:\n  tokenExpiresIn: 2h\n";
    let overlap = |generation: u32| {
        format!(
            "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: overlap\nspec:\n  rotationGeneration: {generation}\n  rotationOverlap: 1h\n"
        )
    };
    let (case, _) = Case::start("argo-health", &[("expiring.yaml", expiring), ("overlap.yaml", &overlap(0))]).await;
    let health = |a: &Json, name: &str| directories(a).into_iter().find(|d| d.0 == name).map(|d| (d.2, d.3));

    // A rotation with rotationOverlap, committed: the old token stays valid for an hour.
    let second = case.commit(&[("overlap.yaml", Some(&overlap(1)))], "rotate overlap");
    let message = case
        .wait("overlap rotated, Healthy with its window", |a| {
            let (status, message) = health(a, "overlap")?;
            (sync_status(a).2 == second && status == "Healthy" && message.contains("still valid until"))
                .then_some(message)
        })
        .await;
    let dir = case.env.dirs().get("overlap").await.unwrap();
    let status = dir.status.as_ref().unwrap();
    // As the API server serves it to Argo CD (RFC 3339).
    let until = serde_json::to_value(status.previous_token_valid_until.as_ref().expect("an overlap window")).unwrap();
    let until = until.as_str().unwrap();
    let condition = dir.ready_condition().unwrap();
    assert_eq!(message, format!("{}; the previous token is still valid until {until}", condition.message));
    assert_eq!(condition.reason, "TokenRotated");

    // The other token's issue record back-dated to an hour past its expiry.
    case.env.backdate("expiring", 7200, -3600).await;
    let expired = case.env.wait_ready_reason("expiring", "TokenExpired").await;
    let app = case
        .wait("expiring Degraded", |a| {
            (health(a, "expiring")?.0 == "Degraded" && sync_status(a).1 == "Degraded").then(|| a.clone())
        })
        .await;
    assert_eq!(
        health(&app, "expiring").unwrap().1,
        expired.ready_condition().unwrap().message,
        "the operator's message"
    );
    assert_eq!(health(&app, "overlap"), Some(("Healthy".to_owned(), message)), "overlap unaffected");
    assert_eq!(sync_status(&app).0, "Synced");
    case.env.assert_log_clean().await;
}

/// Removing a directory from Git: with prune off (the example's policy) Argo CD only reports it; a sync
/// with prune (what `argocd app sync --prune` has the API server write into the Application's
/// `operation`) deletes it, and the garbage collector its Secret. The other directory is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_the_directory_and_its_secret() {
    let (case, first) = Case::start(
        "argo-prune",
        &[("acme.yaml", &example("basic.yaml")), ("globex.yaml", &example("with-expiry.yaml"))],
    )
    .await;
    case.env.cp.garbage_collector().expect("the garbage collector runs");
    let acme = case.env.token("acme-scim-token").await.unwrap();
    assert!(case.env.token("globex-scim-token").await.is_some());

    let second = case.commit(&[("globex.yaml", None)], "remove globex");
    case.wait("globex requires pruning", |a| {
        let (sync, _, rev) = sync_status(a);
        let pending = a["status"]["resources"]
            .as_array()?
            .iter()
            .any(|r| r["name"] == "globex" && r["requiresPruning"] == true && r["status"] == "OutOfSync");
        (sync == "OutOfSync" && rev == second && pending).then_some(())
    })
    .await;
    assert!(case.env.dirs().get_opt("globex").await.unwrap().is_some(), "prune off: not deleted by the auto-sync");

    case.argo.patch_app(
        &case.app,
        &json!({ "operation": {
            "initiatedBy": { "username": "tests" },
            "sync": { "revision": second, "prune": true }
        }}),
    );
    case.wait("Synced after the prune", |a| synced_healthy(a, &second, &["acme"]).then_some(())).await;
    wait_for("globex and its Secret gone", Duration::from_secs(60), || async {
        let dir = case.env.dirs().get_opt("globex").await.unwrap();
        let secret = case.env.secrets().get_opt("globex-scim-token").await.unwrap();
        (dir.is_none() && secret.is_none()).then_some(())
    })
    .await;
    assert_eq!(case.env.token("acme-scim-token").await.as_deref(), Some(acme.as_str()), "acme untouched");
    let app = case.argo.app(&case.app).unwrap();
    assert_eq!(Case::history(&app).first(), Some(&first));
    case.env.assert_log_clean().await;
}

/// The second chart Application's name and namespace.
const OTHER_APP: &str = "identity-scim";

/// Whether a label selector (matchLabels, matchExpressions with In) selects `labels`.
fn selects(selector: &Json, labels: &Json) -> bool {
    let by_label = selector["matchLabels"].as_object().into_iter().flatten().all(|(k, v)| &labels[k] == v);
    let by_expression = selector["matchExpressions"].as_array().into_iter().flatten().all(|e| {
        assert_eq!(e["operator"], "In", "{e}");
        e["values"].as_array().unwrap().contains(&labels[e["key"].as_str().unwrap()])
    });
    by_label && by_expression
}

/// The chart's files, relative to the repository root, with their content.
fn chart_files() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                let relative = path.strip_prefix(ROOT).unwrap().to_string_lossy().into_owned();
                out.push((relative, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&std::path::Path::new(ROOT).join("charts/scim-token-operator"), &mut out);
    out
}

/// (group, kind, namespace, name) of an object or of an Application's resource entry.
type Key = (String, String, String, String);

fn key(group: &str, kind: &str, namespace: &str, name: &str) -> Key {
    (group.to_owned(), kind.to_owned(), namespace.to_owned(), name.to_owned())
}

/// `examples/argocd/application-chart.yaml` as it is (name, release name, destination namespace,
/// syncPolicy), pointed at the chart in the loopback repository: Synced at the commit, and every
/// object `helm template` renders of the chart is one of the Application's resources, Synced, and
/// exists in the cluster; still Synced, with one sync, after a periodic refresh.
///
/// Health: this control plane runs no node and, of kube-controller-manager's controllers, only the
/// garbage collector (`cargo xtask cluster` has the rest; this test does without), so no pod ever
/// runs and neither the Deployments nor the PodDisruptionBudget get a status. Argo CD shows them, and
/// so the Application, Progressing; that is asserted, with the Services Healthy and the other kinds
/// (RBAC, NetworkPolicies, the admission policy, the CRD) without a health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installed_by_an_application_is_synced() {
    let argo = ArgoCd::shared();
    let cp = argo.cp;
    let branch = "chart";
    let files = chart_files();
    let refs: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (p.as_str(), Some(c.as_str()))).collect();
    let revision = argo.commit(branch, &refs, "the chart");

    let text = std::fs::read_to_string(format!("{ROOT}/examples/argocd/application-chart.yaml")).unwrap();
    let mut app: Json = serde_yaml::from_str(&text).unwrap();
    app["spec"]["source"]["repoURL"] = json!(argo.repo_url);
    app["spec"]["source"]["targetRevision"] = json!(branch);
    let name = app["metadata"]["name"].as_str().unwrap().to_owned();
    let namespace = app["spec"]["destination"]["namespace"].as_str().unwrap().to_owned();
    let release = app["spec"]["source"]["helm"]["releaseName"].as_str().unwrap().to_owned();
    argo.apply(&app);
    // A second release, under an Application whose name is not the release's name, with the
    // ServiceMonitor (its CRD reduced to what the API server needs) and without the CRD the first
    // Application already manages.
    let monitors = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": "servicemonitors.monitoring.coreos.com" },
        "spec": {
            "group": "monitoring.coreos.com", "scope": "Namespaced",
            "names": { "plural": "servicemonitors", "kind": "ServiceMonitor" },
            "versions": [{ "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } } }]
        }
    });
    argo.kubectl_apply(&monitors);
    let mut other = app.clone();
    other["metadata"]["name"] = json!(OTHER_APP);
    other["spec"]["destination"]["namespace"] = json!(OTHER_APP);
    other["spec"]["source"]["helm"] = json!({
        "releaseName": "scim-tokens",
        "skipCrds": true,
        "valuesObject": { "serviceMonitor": { "enabled": true } }
    });
    argo.apply(&other);

    // What the chart renders with its defaults, as helm itself renders it (CRDs included, as Argo CD
    // applies them).
    let chart = format!("{ROOT}/charts/scim-token-operator");
    let out =
        cp.helm().args(["template", &release, &chart, "--namespace", &namespace, "--include-crds"]).output().unwrap();
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rendered: BTreeSet<_> = serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
        .map(|doc| <Json as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|o| !o.is_null())
        .map(|o| {
            let api = o["apiVersion"].as_str().unwrap();
            let group = api.rsplit_once('/').map_or("", |(g, _)| g);
            let kind = o["kind"].as_str().unwrap();
            let cluster_scoped = matches!(
                kind,
                "CustomResourceDefinition"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            );
            key(group, kind, if cluster_scoped { "" } else { &namespace }, o["metadata"]["name"].as_str().unwrap())
        })
        .collect();
    assert!(rendered.iter().any(|k| k.1 == "Deployment"), "{rendered:?}");

    let resources = |a: &Json| -> BTreeMap<Key, (String, String, String)> {
        a["status"]["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let s = |v: &Json| v.as_str().unwrap_or("").to_owned();
                (
                    key(&s(&r["group"]), &s(&r["kind"]), &s(&r["namespace"]), &s(&r["name"])),
                    (s(&r["status"]), s(&r["health"]["status"]), s(&r["health"]["message"])),
                )
            })
            .collect()
    };
    let synced = |a: &Json| {
        let (sync, _, rev) = sync_status(a);
        let res = resources(a);
        sync == "Synced"
            && rev == revision
            && a["status"]["operationState"]["phase"] == "Succeeded"
            && res.keys().cloned().collect::<BTreeSet<_>>() == rendered
            && res.values().all(|(s, _, _)| s == "Synced")
    };
    let app =
        argo.wait_app(&name, &format!("Synced at {revision}"), SYNC_TIMEOUT, |a| synced(a).then(|| a.clone())).await;

    // Every object exists in the cluster.
    for (group, kind, ns, object) in &rendered {
        let resource = if group.is_empty() { kind.clone() } else { format!("{kind}.{group}") };
        let mut args = vec!["get", resource.as_str(), object.as_str(), "-o", "name"];
        if !ns.is_empty() {
            args.extend(["-n", ns.as_str()]);
        }
        let out = cp.kubectl().args(&args).output().unwrap();
        assert!(out.status.success(), "{resource} {ns}/{object}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Health, as far as this control plane allows: gitops-engine's checks for Deployments and
    // PodDisruptionBudgets wait for the status their controllers write, and none runs here.
    for ((_, kind, _, object), (_, health, message)) in resources(&app) {
        let expected = match kind.as_str() {
            "Deployment" => (
                "Progressing",
                "Waiting for rollout to finish: observed deployment generation less than desired generation",
            ),
            "PodDisruptionBudget" => ("Progressing", "Waiting for status"),
            "Service" => ("Healthy", ""),
            "CustomResourceDefinition" if argo.v3() => ("Healthy", "CRD is healthy"),
            _ => ("", ""),
        };
        assert_eq!((health.as_str(), message.as_str()), expected, "{kind} {object}");
    }
    assert_eq!(sync_status(&app).1, "Progressing");

    // The second release: Synced, and its ServiceMonitor selects both metrics Services as they are
    // live, after Argo CD's label tracking set `app.kubernetes.io/instance` to the Application's name.
    argo.wait_app(OTHER_APP, "Synced", SYNC_TIMEOUT, |a| {
        (sync_status(a).0 == "Synced" && a["status"]["operationState"]["phase"] == "Succeeded").then_some(())
    })
    .await;
    let get = |kind: &str, name: &str| -> Json {
        let out = cp.kubectl().args(["get", kind, name, "-n", OTHER_APP, "-o", "json"]).output().unwrap();
        assert!(out.status.success(), "{kind} {name}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let monitor = get("servicemonitors.monitoring.coreos.com", "scim-tokens-scim-token-operator");
    for service in ["scim-tokens-scim-token-operator-metrics", "scim-tokens-scim-token-operator-verifier"] {
        let labels = &get("service", service)["metadata"]["labels"];
        // Label tracking rewrites the label; 3.x tracks by annotation and leaves it.
        let instance = if argo.v3() { "scim-tokens" } else { OTHER_APP };
        assert_eq!(labels["app.kubernetes.io/instance"], instance, "Argo CD's tracking label");
        assert!(
            selects(&monitor["spec"]["selector"], labels),
            "the ServiceMonitor {} does not select Service {service} {labels}",
            monitor["spec"]["selector"]
        );
    }

    // One periodic refresh: nothing writes to these objects after their creation here (no
    // controllers), so the comparison after the sync already saw every server-side default.
    let start = argo.refreshes(&name);
    argo.wait_app(&name, "a periodic refresh", RECONCILIATION * 6, |a| {
        assert!(synced(a), "left Synced: {:#}", a["status"]);
        assert_eq!(Case::history(a), vec![revision.clone()], "one sync only (no self-heal)");
        (argo.refreshes(&name) > start).then_some(())
    })
    .await;
}
