//! Issue 24: every new token of a directory with `spec.identityProvider.entra` is pushed to Microsoft
//! Entra ID, proven before the old one dies. Entra cannot be reached from here: the end-to-end tests
//! run against the Microsoft Graph test double (tests/support/graph.rs), which follows the published
//! contract in ../shared/specs and has never been run against a real tenant (docs/entra.md).

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams, PostParams};
use scim_token_operator::api::ScimDirectory;
use scim_token_operator::controller::FAILPOINT_EXIT_CODE;
use scim_token_operator::entra::{CONDITION, reason};
use serde_json::json;
use support::graph::{ACCESS_TOKEN_PREFIX, AppCredential, Call, ExecutionKind, Fault, GraphDouble};
use support::scim_stack::{ScimStack, Tls};
use support::{Env, Operator, SEEN_TOKENS, sha256, wait_for};

const TENANT: &str = "11111111-1111-1111-1111-111111111111";
const APP: &str = "aaaaaaaa-0000-0000-0000-000000000001";
const SP: &str = "22222222-2222-2222-2222-222222222222";
const JOB: &str = "scim.0123456789abcdef0123456789abcdef.11111111-1111-1111-1111-111111111111";
const CLIENT_SECRET: &str = "app-client-secret-value-0123456789";
/// An app registration whose federated credential trusts the operator's ServiceAccount.
const FEDERATED_APP: &str = "aaaaaaaa-0000-0000-0000-000000000002";
/// Stand-ins for the projected ServiceAccount token, before and after the kubelet rotates it (the
/// double compares the assertion byte for byte).
const ASSERTIONS: [&str; 2] = [
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6eDp5In0.c2lnbmF0dXJlLW9uZQ",
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6eDp5In0.c2lnbmF0dXJlLXR3bw",
];
/// Entra's provisioning cycle in the double (Entra's own: about 40 minutes).
const CYCLE: Duration = Duration::from_secs(2);
/// How often the operator reads a pushed token's job (`ENTRA_POLL_INTERVAL`).
const POLL: Duration = Duration::from_secs(1);

/// One test's world: the control plane namespace, the Graph double, and Entra's view of the SCIM
/// service (the verifier, nginx with TLS from the double's CA, scim2-server), one route per directory.
struct Case {
    env: Env,
    graph: GraphDouble,
    stack: ScimStack,
}

impl Case {
    async fn start(prefix: &str, directories: &[&str]) -> Case {
        let env = Env::new(prefix).await;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("entra-{}", env.ns));
        let _ = std::fs::remove_dir_all(&dir);
        let graph = GraphDouble::start(&dir.join("graph")).await;
        graph.add_app(TENANT, APP, AppCredential::ClientSecret(CLIENT_SECRET.to_owned()));
        graph.add_service_principal(TENANT, SP, JOB, APP);
        let (cert, key) = graph.issue_server_cert(&dir.join("tls"));
        let stack = ScimStack::start(&env, &dir.join("stack"), Some(Tls { cert: &cert, key: &key }), directories).await;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": "entra-app" },
            "stringData": { "client-secret": CLIENT_SECRET },
        }))
        .unwrap();
        env.secrets().create(&PostParams::default(), &secret).await.unwrap();
        Case { env, graph, stack }
    }

    /// The operator, pointed at the double, reading jobs every second; without leader election, so a
    /// crashed one is replaced at once.
    fn operator(&self, failpoint: Option<&str>) -> Operator {
        self.operator_with(failpoint, &[])
    }

    fn operator_with(&self, failpoint: Option<&str>, extra: &[(&str, &str)]) -> Operator {
        let (graph, authority, ca) =
            (self.graph.graph_endpoint(), self.graph.authority_host(), self.graph.ca_file().display().to_string());
        let poll = format!("{}s", POLL.as_secs());
        let mut env = vec![
            ("GRAPH_ENDPOINT", graph.as_str()),
            ("AZURE_AUTHORITY_HOST", authority.as_str()),
            ("ENTRA_CA_FILE", ca.as_str()),
            ("ENTRA_POLL_INTERVAL", poll.as_str()),
            ("LEADER_ELECTION", "false"),
        ];
        if let Some(point) = failpoint {
            env.push(("SCIM_TOKEN_OPERATOR_FAILPOINT", point));
        }
        env.extend_from_slice(extra);
        self.env.operator(&env)
    }

    /// Directory `name` pushing to SP with the client secret, its base address `name`'s route.
    fn apply(&self, name: &str, base: &str, extra: &str) {
        let auth = format!(
            "        clientSecret:\n          clientId: {APP}\n          secretRef: {{ name: entra-app, key: client-secret }}\n"
        );
        self.apply_with_auth(name, base, extra, &auth);
    }

    fn apply_with_auth(&self, name: &str, base: &str, extra: &str, auth: &str) {
        let manifest = format!(
            "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n{extra}  identityProvider:\n    entra:\n      tenantId: {TENANT}\n      servicePrincipalId: {SP}\n      baseAddress: {base}\n      auth:\n{auth}"
        );
        let (ok, _, err) = self.env.apply(&manifest);
        assert!(ok, "{err}");
    }

    async fn wait_idp(&self, name: &str, reason: &str) -> ScimDirectory {
        let dirs = self.env.dirs();
        wait_for(&format!("{name}'s {CONDITION} reason {reason}"), Duration::from_secs(90), || async {
            let d = dirs.get_opt(name).await.ok().flatten()?;
            (idp_condition(&d)?.reason == reason).then_some(d)
        })
        .await
    }

    async fn token(&self, name: &str) -> String {
        let secret = format!("{name}-scim-token");
        wait_for(&format!("{name}'s token"), Duration::from_secs(30), || self.env.token(&secret)).await
    }

    async fn rotate(&self, name: &str, generation: i64) {
        let patch = json!({ "spec": { "rotationGeneration": generation } });
        self.env.dirs().patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    }

    /// The verifier's answer for `token` (200 accepted, 401 refused).
    fn accepts(&self, token: &str) -> bool {
        self.stack.verifier.check(token).status == 200
    }

    async fn events(&self, name: &str) -> Vec<(String, String, String)> {
        let mut events: Vec<_> = self
            .env
            .events_for(name)
            .await
            .into_iter()
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect();
        events.sort();
        events
    }

    /// No token, no client secret, no client assertion and no access token in any log: the
    /// operator's, the verifier's (the same file), the double's, nginx's and scim2-server's.
    async fn assert_logs_clean(&self) {
        self.env.assert_log_clean().await;
        let logs = [std::fs::read_to_string(self.graph.log_file()).unwrap_or_default(), self.stack.logs()];
        let mut secrets: Vec<String> = SEEN_TOKENS.lock().unwrap().iter().cloned().collect();
        secrets.push(CLIENT_SECRET.to_owned());
        secrets.extend(ASSERTIONS.map(str::to_owned));
        let operator = std::fs::read_to_string(&self.env.log).unwrap();
        for secret in [CLIENT_SECRET].iter().chain(&ASSERTIONS) {
            assert!(!operator.contains(secret), "a credential of the app appeared in the operator's log");
        }
        assert!(!holds_access_token(&operator), "an access token appeared in the operator's log");
        for log in logs {
            assert!(!log.is_empty(), "the log was written");
            for secret in secrets.iter().filter(|t| t.len() > 20) {
                assert!(!log.contains(&secret[5..]), "a secret appeared in the double's or the SCIM stack's logs");
            }
            assert!(!holds_access_token(&log), "an access token appeared in the double's or the SCIM stack's logs");
        }
    }
}

/// Whether `log` holds an access token the double issued (its prefix, then 64 hex digits).
fn holds_access_token(log: &str) -> bool {
    log.match_indices(ACCESS_TOKEN_PREFIX).any(|(i, p)| {
        let rest = &log.as_bytes()[i + p.len()..];
        rest.len() >= 64 && rest[..64].iter().all(u8::is_ascii_hexdigit)
    })
}

fn idp_condition(d: &ScimDirectory) -> Option<&Condition> {
    d.status.as_ref()?.conditions.iter().find(|c| c.type_ == CONDITION)
}

fn previous_hash(d: &ScimDirectory) -> Option<String> {
    d.status.as_ref()?.previous_token_hash.clone()
}

const EXAMPLE: &str = include_str!("../examples/entra.yaml");

/// What CEL can check is checked at admission, naming the field.
#[tokio::test]
async fn entra_settings_are_validated_at_admission() {
    let env = Env::new("entra-admission").await;
    let (ok, _, err) = env.apply(EXAMPLE);
    assert!(ok, "the example is admitted: {err}");
    let good = EXAMPLE.replace("name: contoso", "name: probe");
    for (from, to, field) in [
        ("tenantId: 11111111-1111-1111-1111-111111111111", "tenantId: contoso.onmicrosoft.com", "tenantId"),
        ("servicePrincipalId: 22222222-2222-2222-2222-222222222222", "servicePrincipalId: 2222", "servicePrincipalId"),
        (
            "baseAddress: https://scim.example.com/scim/v2",
            "baseAddress: http://scim.example.com/scim/v2",
            "baseAddress",
        ),
        ("baseAddress: https://scim.example.com/scim/v2", "baseAddress: https:///scim", "baseAddress"),
        (
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n",
            "        {}\n",
            "exactly one of workloadIdentity and clientSecret",
        ),
        (
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n",
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n        clientSecret:\n          clientId: 33333333-3333-3333-3333-333333333333\n          secretRef: { name: entra-app, key: client-secret }\n",
            "exactly one of workloadIdentity and clientSecret",
        ),
        // Another namespace's Secret cannot even be named.
        (
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n",
            "        clientSecret:\n          clientId: 33333333-3333-3333-3333-333333333333\n          secretRef: { name: entra-app, namespace: other, key: client-secret }\n",
            "namespace",
        ),
        ("      tenantId:", "      jobId: \"bad job\"\n      tenantId:", "jobId"),
    ] {
        assert!(good.contains(from), "{from}");
        let (ok, _, err) = env.apply(&good.replacen(from, to, 1));
        assert!(!ok, "{to:?} must be rejected");
        assert!(err.contains(field), "rejection of {to:?} names {field}: {err}");
    }
    let (ok, _, err) =
        env.apply(&good.replace("    entra:\n", "    entra:\n      jobId: scim.0123456789abcdef.abc-1\n"));
    assert!(ok, "a job id: {err}");
    let (ok, _, err) = env.apply("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: none\nspec:\n  identityProvider: {}\n");
    assert!(!ok && err.contains("exactly one provider"), "{err}");
}

/// Rotates `name` to `generation` and follows it to Entra's switch: the new token is issued with an
/// overlap, the old one is accepted at every look until the status says Entra has run with the new
/// one, then refused; the new one was pushed exactly once. `during` runs once the new token is
/// issued (to watch a fault play out). Returns (old, new).
async fn rotate_and_follow<F, Fut>(case: &Case, name: &str, generation: i64, during: F) -> (String, String)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let old = case.token(name).await;
    let puts_before = case.graph.puts(SP);
    case.rotate(name, generation).await;
    let dirs = case.env.dirs();
    let d = wait_for("the new token", Duration::from_secs(30), || async {
        let d = dirs.get(name).await.ok()?;
        (d.status.as_ref()?.token_hash.as_deref() != Some(sha256(&old).as_str())).then_some(d)
    })
    .await;
    let new = case.token(name).await;
    assert_eq!(previous_hash(&d), Some(sha256(&old)), "a planned rotation keeps the old token for an overlap");
    let status = d.status.as_ref().unwrap();
    let overlap = status.previous_token_valid_until.as_ref().unwrap().0.as_second()
        - status.token_issued_at.as_ref().unwrap().0.as_second();
    assert!(overlap > 0 && overlap <= 3600, "the overlap: {overlap}s");
    case.stack.verifier.wait_status(&new, 200, "the new token accepted before it is validated").await;
    during(new.clone()).await;
    // Until the status says Entra has switched, the old token works (the verifier is checked
    // first: it can lag behind the status, never run ahead of it).
    let synced = wait_for("Entra's run with the new token", Duration::from_secs(90), || async {
        let accepted = case.accepts(&old);
        let d = dirs.get(name).await.ok()?;
        let c = idp_condition(&d)?;
        if c.reason == reason::SYNCED && c.message.contains(&sha256(&new)) {
            return Some(d);
        }
        assert!(accepted, "the old token was refused before Entra switched: {c:?}");
        None
    })
    .await;
    assert_eq!(idp_condition(&synced).unwrap().status, "True");
    assert_eq!(previous_hash(&synced), None, "the overlap ended early, once Entra ran with the new token");
    case.stack.verifier.wait_status(&old, 401, "the old token refused once Entra has switched").await;
    assert!(case.accepts(&new));
    let puts = case.graph.puts(SP);
    assert_eq!(puts[..puts_before.len()], puts_before[..]);
    assert_eq!(puts[puts_before.len()..], [sha256(&new)], "pushed exactly once");
    assert_eq!(case.graph.saved_token_sha256(SP), Some(sha256(&new)), "no lost push");
    // Entra called the SCIM endpoint with the new token (validation, then its cycle) through nginx and
    // the verifier, and succeeded.
    let executions = case.graph.executions(SP);
    let with_new: Vec<_> = executions.iter().filter(|e| e.token_sha256 == sha256(&new)).collect();
    assert!(
        with_new.iter().any(|e| e.kind == ExecutionKind::Validation && e.scim_status == Some(200)),
        "{executions:?}"
    );
    assert!(with_new.iter().any(|e| e.kind == ExecutionKind::Cycle && e.succeeded), "{executions:?}");
    (old, new)
}

/// Waits for a failure reason on the condition while the old token stays valid; returns its message.
async fn failure(case: &Case, name: &str, old: &str, why: &str) -> String {
    let d = case.wait_idp(name, why).await;
    let c = idp_condition(&d).unwrap();
    assert_eq!(c.status, "False");
    assert!(case.accepts(old), "the old token stays valid while the push fails");
    wait_for(&format!("a Warning Event {why}"), Duration::from_secs(30), || async {
        case.events(name).await.into_iter().find(|(t, r, _)| t == "Warning" && r == why)
    })
    .await;
    c.message.clone()
}

/// The happy path, on a real control plane with the real verifier, nginx and scim2-server: the first
/// token and every rotation reach Entra without a human.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_needs_no_human() {
    let case = Case::start("entra-rotate", &["contoso"]).await;
    let op = case.operator(None);
    let base = case.stack.base_address("contoso");
    case.apply("contoso", &base, "");
    // The first token is pushed too: nobody pastes it.
    case.wait_idp("contoso", reason::AWAITING_SYNC).await;
    let first = case.token("contoso").await;
    assert_eq!(case.graph.puts(SP), [sha256(&first)]);
    assert_eq!(case.graph.saved_base_address(SP), Some(base.clone()), "BaseAddress and SecretToken together");
    case.graph.set_cycle(CYCLE);
    let d = case.wait_idp("contoso", reason::SYNCED).await;
    assert_eq!(idp_condition(&d).unwrap().status, "True");

    let (old, new) = rotate_and_follow(&case, "contoso", 1, |_| async {}).await;
    assert_ne!(old, new);
    let events = case.events("contoso").await;
    for reason in ["IdentityProviderPushed", "IdentityProviderSynced"] {
        assert!(events.iter().any(|(t, r, _)| t == "Normal" && r == reason), "{reason}: {events:?}");
    }
    assert!(events.iter().all(|(t, _, _)| t == "Normal"), "{events:?}");
    let metrics = op.metrics();
    assert!(metrics.contains("scim_token_operator_identity_provider_pushes_total{result=\"pushed\"} 2"), "{metrics}");
    assert!(metrics.contains("scim_token_operator_identity_provider_pushes_total{result=\"synced\"} 2"), "{metrics}");
    assert!(metrics.contains("scim_token_operator_identity_provider_first_success_seconds_count 2"), "{metrics}");
    // Synced and idle: nothing more is called. An absence has no event to wait for: three poll
    // intervals, in which a directory still being watched would have read its job three times.
    let calls = case.graph.calls().len();
    tokio::time::sleep(3 * POLL).await;
    assert_eq!(case.graph.calls().len(), calls, "no Graph call once Entra has run with the current token");
    case.assert_logs_clean().await;
}

/// Graph's 401, 403, 429 with Retry-After and 5xx, and a validation the SCIM endpoint refuses: each
/// turns the condition with the step and Graph's code and a Warning Event, keeps the old token valid,
/// and is retried until Entra has switched, with one push per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_faults_keep_the_old_token_until_entra_switched() {
    let case = Case::start("entra-faults", &["contoso", "other"]).await;
    // Borrowed by the closures that watch a fault play out.
    let case = &case;
    let _op = case.operator(None);
    case.graph.set_cycle(CYCLE);
    // Validation refused by the SCIM endpoint: the base address is another directory's route, where the
    // verifier refuses this directory's token. Nothing is pushed.
    case.apply("contoso", &case.stack.base_address("other"), "");
    let first = case.token("contoso").await;
    let message = failure(case, "contoso", &first, reason::VALIDATION_FAILED).await;
    assert!(message.contains("HTTP 400") && message.contains(support::graph::CREDENTIAL_FAILURE), "{message}");
    assert!(case.graph.puts(SP).is_empty(), "a token Entra could not use is not pushed");
    case.apply("contoso", &case.stack.base_address("contoso"), "");
    case.wait_idp("contoso", reason::SYNCED).await;
    assert_eq!(case.graph.puts(SP), [sha256(&first)]);

    // 401 on the PUT (the cached access token is dropped and a new one fetched).
    let tokens_before = case.graph.calls().iter().filter(|c| c.call == Call::Token).count();
    case.graph.inject(Fault::new(Call::PutSecrets, 401).times(2));
    rotate_and_follow(case, "contoso", 1, |new| async move {
        let message = failure(case, "contoso", &first_old(case, &new).await, reason::PUSH_FAILED).await;
        assert!(message.contains("HTTP 401"), "{message}");
    })
    .await;
    let tokens_after = case.graph.calls().iter().filter(|c| c.call == Call::Token).count();
    assert!(tokens_after > tokens_before, "a 401 fetches a new access token");

    // 403 on validateCredentials.
    case.graph.inject(Fault::new(Call::ValidateCredentials, 403).times(2));
    rotate_and_follow(case, "contoso", 2, |new| async move {
        let message = failure(case, "contoso", &first_old(case, &new).await, reason::VALIDATION_FAILED).await;
        assert!(message.contains("HTTP 403"), "{message}");
    })
    .await;

    // 429 with Retry-After on the job list: not called again sooner.
    case.graph.inject(Fault::new(Call::ListJobs, 429).retry_after(3));
    rotate_and_follow(case, "contoso", 3, |new| async move {
        let message = failure(case, "contoso", &first_old(case, &new).await, reason::JOB_STATUS_FAILED).await;
        assert!(message.contains("HTTP 429"), "{message}");
    })
    .await;
    let calls = case.graph.calls();
    let throttled = calls.iter().position(|c| c.call == Call::ListJobs && c.status == 429).expect("the 429");
    let next = calls[throttled + 1..].iter().find(|c| c.call != Call::Token).expect("a call after the 429");
    let waited = next.at.duration_since(calls[throttled].at).unwrap();
    assert!(waited >= Duration::from_millis(2900), "Retry-After: 3 honoured, the next call came after {waited:?}");

    // 5xx on the PUT.
    case.graph.inject(Fault::new(Call::PutSecrets, 503).times(2));
    rotate_and_follow(case, "contoso", 4, |new| async move {
        let message = failure(case, "contoso", &first_old(case, &new).await, reason::PUSH_FAILED).await;
        assert!(message.contains("HTTP 503"), "{message}");
    })
    .await;
    case.assert_logs_clean().await;
}

/// The token the status keeps as previous while `new` is current.
async fn first_old(case: &Case, new: &str) -> String {
    let tokens = SEEN_TOKENS.lock().unwrap().clone();
    let d = case.env.dirs().get("contoso").await.unwrap();
    let previous = previous_hash(&d).expect("an overlap");
    assert_ne!(previous, sha256(new));
    tokens.into_iter().find(|t| sha256(t) == previous).expect("the old token was seen")
}

/// A job in quarantine is restarted (resetScope QuarantineState) once the new credentials are saved,
/// and Entra's next run succeeds; also with the operator killed right after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs `--features failpoints` (hack/test.sh sets it)")]
async fn a_quarantined_job_is_restarted() {
    let case = Case::start("entra-quarantine", &["contoso"]).await;
    // Borrowed by the closures that watch a fault play out.
    let case = &case;
    let mut op = case.operator(None);
    case.graph.set_cycle(CYCLE);
    case.apply("contoso", &case.stack.base_address("contoso"), "  rotationOverlap: 30m\n");
    case.wait_idp("contoso", reason::SYNCED).await;
    case.graph.quarantine_next_runs(SP);
    rotate_and_follow(case, "contoso", 1, |new| async move {
        let message = failure(case, "contoso", &first_old(case, &new).await, reason::QUARANTINED).await;
        assert!(message.contains("QuarantinedOnDemand") && message.contains("restarted"), "{message}");
    })
    .await;
    let restarts =
        |case: &Case| case.graph.calls().iter().filter(|c| c.call == Call::Restart && c.status == 204).count();
    assert_eq!(restarts(case), 1);
    op.terminate().await;

    // Killed right after the restart, before anything is written: the next operator finds the job
    // out of quarantine and waits for its run.
    let mut crashing = case.operator(Some("entra-after-restart"));
    case.graph.quarantine_next_runs(SP);
    let puts = case.graph.puts(SP).len();
    case.rotate("contoso", 2).await;
    assert_eq!(crashing.wait_exit(Duration::from_secs(90)).await.code(), Some(FAILPOINT_EXIT_CODE));
    assert_eq!(restarts(case), 2);
    let _op = case.operator(None);
    let d = case.wait_idp("contoso", reason::SYNCED).await;
    let new = case.token("contoso").await;
    assert!(idp_condition(&d).unwrap().message.contains(&sha256(&new)));
    assert_eq!(case.graph.puts(SP).len(), puts + 1, "pushed once");
    assert_eq!(restarts(case), 2, "restarted once");
    case.assert_logs_clean().await;
}

/// The operator killed between every pair of steps of one rotation (the Secret write, the status,
/// the validation, the push, the push's record, Entra's run, the synced record, the status): the old
/// token stays valid until Entra has switched, nothing is lost, and the token is pushed once, except
/// for the one ambiguity (a kill between the PUT's answer and the record write pushes it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs `--features failpoints` (hack/test.sh sets it)")]
async fn a_kill_between_any_two_steps_neither_pushes_twice_nor_loses_the_push() {
    let case = Case::start("entra-kill", &["contoso"]).await;
    let mut op = case.operator(None);
    case.graph.set_cycle(CYCLE);
    case.apply("contoso", &case.stack.base_address("contoso"), "");
    case.wait_idp("contoso", reason::SYNCED).await;
    op.terminate().await;
    let old = case.token("contoso").await;
    let base_puts = case.graph.puts(SP);

    let mut new = None;
    // (failpoint, SecretToken PUTs of the new token once it has been hit)
    for (point, puts) in [
        ("after-secret-write", 0),
        ("entra-after-validate", 0),
        ("entra-after-push", 1),
        ("entra-after-push-record", 2),
        ("entra-after-synced-record", 2),
    ] {
        let mut crashing = case.operator(Some(point));
        if point == "after-secret-write" {
            case.rotate("contoso", 1).await;
        }
        let status = crashing.wait_exit(Duration::from_secs(90)).await;
        assert_eq!(status.code(), Some(FAILPOINT_EXIT_CODE), "{point}");
        let token = case.token("contoso").await;
        assert_ne!(token, old);
        assert_eq!(*new.get_or_insert(token.clone()), token, "{point}: one new token for the rotation");
        assert!(case.accepts(&old), "{point}: the old token stays valid until the status says Entra switched");
        let pushed: Vec<String> = case.graph.puts(SP)[base_puts.len()..].to_vec();
        assert_eq!(pushed, vec![sha256(&token); puts], "{point}");
    }
    let new = new.unwrap();
    let _op = case.operator(None);
    let d = case.wait_idp("contoso", reason::SYNCED).await;
    assert!(idp_condition(&d).unwrap().message.contains(&sha256(&new)));
    assert_eq!(previous_hash(&d), None);
    case.stack.verifier.wait_status(&old, 401, "the old token refused once Entra has switched").await;
    assert!(case.accepts(&new));
    assert_eq!(case.graph.saved_token_sha256(SP), Some(sha256(&new)), "no lost push");
    assert_eq!(case.graph.puts(SP).len(), base_puts.len() + 2, "pushed twice only across the ambiguous kill");
    case.assert_logs_clean().await;
}

/// The chart's NetworkPolicy opens egress to Microsoft's endpoints only when asked, and only while
/// egress is restricted at all (rendered with the real helm).
#[tokio::test]
async fn the_chart_allows_egress_to_microsoft_only_when_asked() {
    let cp = envtest::ControlPlane::shared();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/scim-token-operator");
    let render = |sets: &[&str]| {
        let mut cmd = cp.helm();
        cmd.args(["template", "x", chart, "-s", "templates/networkpolicy.yaml"]);
        for set in sets {
            cmd.args(["--set", set]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let policy: serde_json::Value = serde_yaml::from_slice(&out.stdout).unwrap();
        policy["spec"]["egress"].as_array().cloned().unwrap_or_default()
    };
    let restricted = "networkPolicy.apiServer.cidrs={10.96.0.1/32}";
    let microsoft = "networkPolicy.entra.cidrs={20.190.128.0/18,40.126.0.0/18}";
    assert_eq!(render(&[restricted]).len(), 2, "the API server and DNS");
    assert!(render(&[microsoft]).is_empty(), "egress unrestricted: nothing to open");
    let egress = render(&[restricted, microsoft]);
    assert_eq!(egress.len(), 3);
    assert_eq!(
        egress[2],
        json!({
            "to": [{ "ipBlock": { "cidr": "20.190.128.0/18" } }, { "ipBlock": { "cidr": "40.126.0.0/18" } }],
            "ports": [{ "port": 443, "protocol": "TCP" }],
        })
    );
    let mut cmd = cp.helm();
    cmd.args(["template", "x", chart, "--set", "networkPolicy.entra.cidrs={graph.microsoft.com}"]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("entra/cidrs"));
}

/// Workload identity federation: the projected ServiceAccount token is the client assertion, read
/// afresh for every access token (it rotates). And a directory that existed before it had an identity
/// provider: its record knows nothing of pushes, which is no reason for a new token; its current
/// token is pushed as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_and_a_directory_that_gains_an_identity_provider() {
    let case = Case::start("entra-wi", &["contoso"]).await;
    let file =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("entra-{}", case.env.ns)).join("azure-identity-token");
    std::fs::write(&file, ASSERTIONS[0]).unwrap();
    case.graph.add_app(TENANT, FEDERATED_APP, AppCredential::FederatedToken(ASSERTIONS[0].to_owned()));
    // Synchronization.ReadWrite.All: the service principal belongs to another app.
    case.graph.grant_tenant_wide(TENANT, FEDERATED_APP);
    case.graph.set_cycle(CYCLE);
    let path = file.display().to_string();
    let _op = case.operator_with(None, &[("AZURE_FEDERATED_TOKEN_FILE", path.as_str())]);
    let (ok, _, err) = case
        .env
        .apply("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: contoso\nspec: {}\n");
    assert!(ok, "{err}");
    case.env.wait_ready_reason("contoso", "TokenIssued").await;
    let before = case.token("contoso").await;

    let auth = format!("        workloadIdentity:\n          clientId: {FEDERATED_APP}\n");
    case.apply_with_auth("contoso", &case.stack.base_address("contoso"), "", &auth);
    let d = case.wait_idp("contoso", reason::SYNCED).await;
    assert_eq!(case.token("contoso").await, before, "no new token: the one the directory had is pushed");
    assert_eq!(d.ready_condition().unwrap().reason, "TokenIssued");
    assert_eq!(case.graph.puts(SP), [sha256(&before)]);
    let callers: std::collections::BTreeSet<_> =
        case.graph.calls().into_iter().filter(|c| c.call == Call::PutSecrets).filter_map(|c| c.client_id).collect();
    assert_eq!(callers, [FEDERATED_APP.to_owned()].into(), "the federated app pushed");

    // The kubelet rotates the projected token and Graph stops taking the old access token: the next
    // access token is asked for with the new assertion.
    std::fs::write(&file, ASSERTIONS[1]).unwrap();
    case.graph.add_app(TENANT, FEDERATED_APP, AppCredential::FederatedToken(ASSERTIONS[1].to_owned()));
    case.graph.expire_access_tokens();
    let tokens_before = case.graph.calls().iter().filter(|c| c.call == Call::Token && c.status == 200).count();
    rotate_and_follow(&case, "contoso", 1, |_| async {}).await;
    let tokens_after = case.graph.calls().iter().filter(|c| c.call == Call::Token && c.status == 200).count();
    assert!(tokens_after > tokens_before, "a new access token, with the rotated assertion");
    let operator = std::fs::read_to_string(&case.env.log).unwrap();
    for assertion in ASSERTIONS {
        assert!(!operator.contains(assertion), "the assertion appeared in the operator's log");
    }
    case.assert_logs_clean().await;
}
