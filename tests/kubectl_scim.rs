//! `kubectl scim` (the `kubectl-scim` binary) run through real kubectl, found by kubectl's plugin
//! discovery on PATH, against the test control plane and the real operator: status, rotate --wait,
//! token, check, inspect secret, end-overlap, completions, and errors as one clear line. Every output
//! of the plugin but the token it is asked for is searched for every token the suite has seen.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use scim_token_operator::token::Token;
use serde_json::{Value, json};
use support::{Env, SEEN_TOKENS, free_port, sha256, wait_for};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-scim");

/// A directory holding only `kubectl-scim` (a symlink to the built binary), first on kubectl's PATH:
/// the target directory also holds `kubectl-scim.d`, which `kubectl plugin list` would report.
fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubectl-plugins");
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("kubectl-scim");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(PLUGIN, &link).unwrap();
        dir
    })
}

fn path_with_plugin() -> String {
    format!("{}:{}", plugin_dir().display(), std::env::var("PATH").unwrap_or_default())
}

/// One run of kubectl.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }

    /// Failed with `code` and said so in exactly one line on stderr, without a backtrace.
    fn one_line_error(&self, code: i32, fragment: &str) -> &Self {
        assert_eq!(self.code, code, "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:?}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(fragment), "{fragment:?}: {self:?}");
        for noise in ["panicked", "backtrace", "RUST_BACKTRACE", "ApiError", "Status {"] {
            assert!(!self.stderr.contains(noise), "{noise:?}: {self:?}");
        }
        self
    }
}

/// Runs `kubectl scim <args> --kubeconfig <kubeconfig>` through the real kubectl with the plugin on
/// PATH, keeping what it printed for the final plaintext search.
struct Scim<'a> {
    env: &'a Env,
    /// Everything the plugin printed but a token it was asked to print.
    printed: Mutex<String>,
}

impl<'a> Scim<'a> {
    fn new(env: &'a Env) -> Scim<'a> {
        Scim { env, printed: Mutex::new(String::new()) }
    }

    /// The real kubectl with the plugin first on PATH and no KUBECONFIG: only the flags say where to go.
    fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.env.cp.assets_dir().join("kubectl"));
        cmd.env("PATH", path_with_plugin()).env_remove("KUBECONFIG").env("HOME", self.env.cp.tmp_dir());
        cmd
    }

    fn run_with(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>, prints_token: bool) -> Run {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .arg("scim")
            .args(args)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let mut printed = self.printed.lock().unwrap();
        printed.push_str(&run.stderr);
        if !prints_token {
            printed.push_str(&run.stdout);
        }
        run
    }

    /// `kubectl scim <args> -n <test namespace> --kubeconfig <admin>`.
    fn run(&self, args: &[&str]) -> Run {
        self.run_with(self.env.cp.kubeconfig_path(), &[args, &["-n", &self.env.ns]].concat(), None, false)
    }

    fn check(&self, dir: &str, stdin: &str) -> Run {
        self.run_with(self.env.cp.kubeconfig_path(), &["check", dir, "-n", &self.env.ns], Some(stdin), false)
    }

    /// No token of this namespace (nor any the suite has seen) in anything the plugin printed, but
    /// where it was asked to print one; and none in the operator's log.
    async fn assert_no_plaintext(&self) {
        for secret in self.env.secrets().list(&Default::default()).await.unwrap() {
            if let Some(t) = secret.data.and_then(|d| d.get("token").cloned()) {
                SEEN_TOKENS.lock().unwrap().insert(String::from_utf8_lossy(&t.0).into_owned());
            }
        }
        let printed = self.printed.lock().unwrap().clone();
        for token in SEEN_TOKENS.lock().unwrap().iter().filter(|t| t.len() > 20) {
            assert!(!printed.contains(&token[5..]), "a plaintext token was printed where it must not be");
        }
        self.env.assert_log_clean().await;
    }
}

fn directory(name: &str, spec: &str) -> String {
    format!("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

async fn status_hash(env: &Env, name: &str) -> String {
    env.dirs().get(name).await.unwrap().status.unwrap().token_hash.unwrap()
}

/// Runs of spaces as one (the `key: value` output aligns its values).
fn squeeze(s: &str) -> String {
    s.lines()
        .map(|l| l.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The token with one character of its random part changed: right shape, wrong checksum.
fn corrupted(token: &str) -> String {
    let mut t = token.to_owned();
    let replacement = if &t[10..11] == "A" { "B" } else { "A" };
    t.replace_range(10..11, replacement);
    t
}

#[tokio::test]
async fn kubectl_finds_the_plugin_and_status_reports_every_directory() {
    let env = Env::new("scim-status").await;
    let scim = Scim::new(&env);
    // Discovery: kubectl lists it, and runs it for `kubectl scim`.
    let out = scim.kubectl().args(["plugin", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(&format!("{}/kubectl-scim", plugin_dir().display())), "{listed}");
    let completion = scim.run(&["completion", "bash"]);
    assert!(completion.ok().stdout.contains("kubectl-scim"), "{completion:?}");

    // A foreign Secret where the third directory wants to write.
    let (ok, _, err) = env.kubectl(&["create", "secret", "generic", "taken", "--from-literal=token=not-a-scim-token"]);
    assert!(ok, "{err}");
    for (name, spec) in [
        ("acme", "  rotationGeneration: 0\n"),
        ("globex", "  tokenExpiresIn: 90d\n  rotationOverlap: 1h\n"),
        ("clash", "  secretName: taken\n"),
    ] {
        let (ok, _, err) = env.apply(&directory(name, spec));
        assert!(ok, "{err}");
    }
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let acme = env.wait_ready_reason("acme", "TokenIssued").await;
    let globex = env.wait_ready_reason("globex", "TokenIssued").await;
    env.wait_ready_reason("clash", "SecretConflict").await;
    // The operator's Events are there to be shown (a first token gets none: its status says it all).
    wait_for("clash's SecretConflict Event", Duration::from_secs(30), || async {
        env.events_for("clash").await.iter().any(|e| e.reason.as_deref() == Some("SecretConflict")).then_some(())
    })
    .await;

    let table = scim.run(&["status"]);
    table.ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("READY") && lines[0].contains("LAST EVENT"), "{table:?}");
    let row =
        |name: &str| *lines.iter().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{table:?}"));
    let acme_hash = acme.status.as_ref().unwrap().token_hash.clone().unwrap();
    let acme_row = row("acme");
    for want in ["True", "TokenIssued", &acme_hash[..19], "never"] {
        assert!(acme_row.contains(want), "{want:?} not in {acme_row:?}");
    }
    assert!(acme_row.trim_end().ends_with(" -"), "no Event about a first token: {acme_row:?}");
    assert!(!acme_row.contains(&acme_hash), "the hash is shortened in the table");
    let globex_expiry = globex.status.as_ref().unwrap().token_expires_at.as_ref().unwrap().0.to_string();
    let globex_row = row("globex");
    assert!(globex_row.contains(&format!("{globex_expiry} (in ")), "{globex_row:?}");
    let clash_row = row("clash");
    assert!(clash_row.contains("False") && clash_row.contains("Warning SecretConflict ("), "{clash_row:?}");
    assert!(
        table.stdout.contains("\nclash: Secret taken exists but is not managed by this directory"),
        "the not-Ready directory is explained: {table:?}"
    );

    // -o json: data, with the full hashes and the explanation.
    let json_out = scim.run(&["status", "-o", "json"]);
    let parsed: Value = serde_json::from_str(&json_out.ok().stdout).unwrap();
    let items = parsed["items"].as_array().unwrap();
    assert_eq!(items.iter().map(|i| i["name"].as_str().unwrap()).collect::<Vec<_>>(), ["acme", "clash", "globex"]);
    assert_eq!(items[0]["tokenHash"], acme_hash.as_str());
    assert_eq!(items[0]["ready"], "True");
    assert_eq!(items[0]["lastEvent"], Value::Null);
    assert_eq!(items[1]["reason"], "SecretConflict");
    assert_eq!(items[1]["lastEvent"]["reason"], "SecretConflict");
    assert!(items[1]["explanation"].as_str().unwrap().contains("another spec.secretName"));
    assert_eq!(items[2]["tokenExpiresAt"], globex_expiry.as_str());

    // One directory, as YAML.
    let yaml_out = scim.run(&["status", "globex", "-o", "yaml"]);
    let one: Value = serde_yaml::from_str(&yaml_out.ok().stdout).unwrap();
    assert_eq!(one["name"], "globex");
    assert_eq!(one["tokenHash"], globex.status.as_ref().unwrap().token_hash.as_deref().unwrap());

    // The default namespace is the context's; -A shows every namespace.
    let kubeconfig = env.cp.tmp_dir().join(format!("kubeconfig-{}", env.ns));
    std::fs::copy(env.cp.kubeconfig_path(), &kubeconfig).unwrap();
    let set = env
        .cp
        .kubectl()
        .args(["config", "set-context", "--current", "--namespace", &env.ns, "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(set.status.success(), "{set:?}");
    let from_context = scim.run_with(&kubeconfig, &["status", "clash"], None, false);
    assert!(from_context.ok().stdout.contains("clash"), "{from_context:?}");
    assert!(from_context.stdout.contains("Last event: Warning SecretConflict"), "{from_context:?}");
    let all = scim.run_with(&kubeconfig, &["status", "-A"], None, false);
    assert!(all.ok().stdout.starts_with("NAMESPACE"), "{all:?}");
    assert!(all.stdout.lines().any(|l| l.starts_with(&env.ns) && l.contains(" acme ")), "{all:?}");
    scim.assert_no_plaintext().await;
}

#[tokio::test]
async fn rotate_waits_for_the_new_hash_and_check_tells_which_token_works() {
    let env = Env::new("scim-rotate").await;
    let scim = Scim::new(&env);
    let mut op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    for (name, spec) in [("acme", "  rotationOverlap: 1h\n"), ("plain", "  rotationGeneration: 0\n")] {
        let (ok, _, err) = env.apply(&directory(name, spec));
        assert!(ok, "{err}");
        env.wait_ready_reason(name, "TokenIssued").await;
    }
    let first = env.token("acme-scim-token").await.unwrap();
    let check = scim.check("acme", &format!("{first}\n"));
    assert!(check.ok().stdout.starts_with("yes: the current token of ScimDirectory"), "{check:?}");
    assert!(check.stdout.contains("never expires"), "{check:?}");

    // rotate --wait: the new hash on stdout, the one the status names; the request is recorded.
    let rotated = scim.run(&["rotate", "acme", "--wait", "--timeout", "60s"]);
    rotated.ok();
    let dir = env.dirs().get("acme").await.unwrap();
    let status = dir.status.clone().unwrap();
    assert_eq!(rotated.stdout.trim(), status.token_hash.as_deref().unwrap(), "{rotated:?}");
    assert_ne!(rotated.stdout.trim(), sha256(&first));
    let request = dir.metadata.annotations.as_ref().unwrap()["scim.tokenops.dev/rotate"].clone();
    assert!(request.starts_with("kubectl-scim-"), "{request}");
    assert_eq!(status.last_rotation_request.as_deref(), Some(request.as_str()));
    assert!(rotated.stderr.contains("the previous token stays valid until"), "{rotated:?}");
    let second = env.token("acme-scim-token").await.unwrap();
    assert_eq!(sha256(&second), rotated.stdout.trim());

    // The new token is current; the old one works in its overlap, and status shows the window.
    assert!(scim.check("acme", &second).ok().stdout.starts_with("yes: the current token"));
    let previous = scim.check("acme", &first);
    assert!(previous.ok().stdout.starts_with("yes, until "), "{previous:?}");
    assert!(previous.stdout.contains("the previous token of"), "{previous:?}");
    let table = scim.run(&["status", "acme"]);
    assert!(table.ok().stdout.contains("previous valid until"), "{table:?}");

    // Ending the overlap: the old token is rotated out.
    let ended = scim.run(&["end-overlap", "acme", "--wait"]);
    ended.ok();
    assert!(env.dirs().get("acme").await.unwrap().status.unwrap().previous_token_hash.is_none());
    let rotated_out = scim.check("acme", &first);
    assert_eq!(rotated_out.code, 1, "{rotated_out:?}");
    assert!(rotated_out.stdout.starts_with("no: not a token of ScimDirectory"), "{rotated_out:?}");
    let nothing_to_end = scim.run(&["end-overlap", "acme"]);
    assert!(nothing_to_end.ok().stdout.contains("no open overlap window"), "{nothing_to_end:?}");

    // Without an overlap the old token stops working at once.
    let plain_first = env.token("plain-scim-token").await.unwrap();
    let plain_rotated = scim.run(&["rotate", "plain", "--wait"]);
    assert!(plain_rotated.ok().stderr.contains("the previous token is no longer valid"), "{plain_rotated:?}");
    assert_eq!(plain_rotated.stdout.trim(), status_hash(&env, "plain").await);
    let gone = scim.check("plain", &plain_first);
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(gone.stdout.contains("rotated out"), "{gone:?}");

    // Malformed, unknown, another directory's, and a pasted header.
    let plain_now = env.token("plain-scim-token").await.unwrap();
    for (input, want) in [
        ("hello".to_owned(), "no: malformed"),
        (corrupted(&second), "no: malformed"),
        (second[..40].to_owned(), "no: malformed"),
        (Token::generate().expose().to_owned(), "no: not a token of ScimDirectory"),
        (plain_now.clone(), &format!("it is the current token of ScimDirectory {}/plain", env.ns)),
    ] {
        let run = scim.check("acme", &input);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stdout.contains(want), "{want:?}: {run:?}");
        assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    }
    let header = scim.check("acme", &format!("Authorization: Bearer {second}\r\n"));
    assert!(header.ok().stdout.starts_with("yes: the current token"), "{header:?}");
    let empty = scim.check("acme", "\n");
    empty.one_line_error(2, "no token on stdin");

    // Without --wait: the request is made and the command returns.
    let before = status_hash(&env, "plain").await;
    let requested = scim.run(&["rotate", "plain"]);
    assert!(requested.ok().stdout.contains("rotation requested"), "{requested:?}");
    wait_for("the requested rotation", Duration::from_secs(30), || async {
        (status_hash(&env, "plain").await != before).then_some(())
    })
    .await;

    // With no operator to act on it, --wait gives up after --timeout, in one line.
    op.terminate().await;
    let timed_out = scim.run(&["rotate", "plain", "--wait", "--timeout", "2s"]);
    // The request was made (said first), then the wait failed: in one line.
    let lines: Vec<&str> = timed_out.stderr.lines().collect();
    assert_eq!(timed_out.code, 1, "{timed_out:?}");
    assert!(lines.len() == 2 && lines[0].contains("rotation requested"), "{timed_out:?}");
    assert!(lines[1].starts_with("error: timed out after 2s waiting for the operator to issue the new token"));
    assert!(lines[1].contains("is scim-token-operator running"), "{timed_out:?}");
    scim.assert_no_plaintext().await;
}

#[tokio::test]
async fn check_refuses_an_expired_token_and_status_says_what_to_do() {
    let env = Env::new("scim-expired").await;
    let scim = Scim::new(&env);
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&directory("acme", "  tokenExpiresIn: 1h\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;
    let token = env.token("acme-scim-token").await.unwrap();
    let fresh = scim.check("acme", &token);
    assert!(fresh.ok().stdout.starts_with("yes: the current token") && fresh.stdout.contains("m)"), "{fresh:?}");

    // Back-dated through the operator's record key (a hand edit would be tampering, and re-issued):
    // issued two hours ago, so it expired an hour ago.
    let expired = env.backdate("acme", 3600, -3600).await;
    env.wait_ready_reason("acme", "TokenExpired").await;
    assert_eq!(env.token("acme-scim-token").await.unwrap(), token, "not re-issued");

    let refused = scim.check("acme", &token);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stdout.starts_with(&format!("no: the current token of ScimDirectory {}/acme, but it expired", env.ns)),
        "{refused:?}"
    );
    assert!(refused.stdout.contains(&format!("{expired} (6")) && refused.stdout.contains("m ago)"), "{refused:?}");
    let table = scim.run(&["status"]);
    assert!(table.ok().stdout.contains("TokenExpired"), "{table:?}");
    assert!(table.stdout.contains("\nacme: The token expired 6"), "{table:?}");
    assert!(table.stdout.contains("kubectl scim rotate acme --wait"), "{table:?}");
    let shown =
        scim.run_with(env.cp.kubeconfig_path(), &["token", "acme", "--force-stdout", "-n", &env.ns], None, true);
    assert!(shown.ok().stderr.contains("warning: this token has expired"), "{shown:?}");
    scim.assert_no_plaintext().await;
}

#[tokio::test]
async fn token_goes_only_to_a_terminal_or_where_explicitly_asked() {
    let env = Env::new("scim-token").await;
    let scim = Scim::new(&env);
    let (ok, _, err) = env.kubectl(&["create", "secret", "generic", "taken", "--from-literal=token=foreign-content"]);
    assert!(ok, "{err}");
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    for (name, spec) in [("acme", "  tokenExpiresIn: 90d\n"), ("clash", "  secretName: taken\n")] {
        let (ok, _, err) = env.apply(&directory(name, spec));
        assert!(ok, "{err}");
    }
    let acme = env.wait_ready_reason("acme", "TokenIssued").await;
    env.wait_ready_reason("clash", "SecretConflict").await;
    let token = env.token("acme-scim-token").await.unwrap();
    let expiry = acme.status.unwrap().token_expires_at.unwrap().0.to_string();

    // Piped without the flag: refused before the Secret is read; nothing on stdout.
    let refused = scim.run(&["token", "acme"]);
    refused.one_line_error(1, "stdout is not a terminal");
    assert!(refused.stderr.contains("--force-stdout"), "{refused:?}");
    assert_eq!(refused.stdout, "");

    // With the flag (or its alias): exactly the Secret's token on stdout; what it is on stderr.
    for flag in ["--force-stdout", "--insecure-pipe"] {
        let shown = scim.run_with(env.cp.kubeconfig_path(), &["token", "acme", flag, "-n", &env.ns], None, true);
        assert_eq!(shown.ok().stdout, token, "no newline when piped");
        assert!(shown.stderr.contains(&format!("ScimDirectory {}/acme", env.ns)), "{shown:?}");
        assert!(
            shown.stderr.contains(&sha256(&token)) && shown.stderr.contains(&format!("expires {expiry} (in ")),
            "{shown:?}"
        );
        assert!(!shown.stderr.contains(&token[5..]));
    }

    // A Secret the directory does not control is never shown as its token.
    let foreign =
        scim.run_with(env.cp.kubeconfig_path(), &["token", "clash", "--force-stdout", "-n", &env.ns], None, true);
    foreign.one_line_error(1, "is not managed by ScimDirectory \"clash\"");
    assert!(!foreign.stdout.contains("foreign-content") && !foreign.stderr.contains("foreign-content"));

    // To a terminal (a pseudo-terminal from script(1)): shown without the flag.
    if Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let kubectl = env.cp.assets_dir().join("kubectl");
        let command = format!(
            "'{}' scim token acme -n {} --kubeconfig '{}'",
            kubectl.display(),
            env.ns,
            env.cp.kubeconfig_path().display()
        );
        let out = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("PATH", path_with_plugin())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let terminal = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(terminal.contains(&format!("{token}\r\n")), "the token on the terminal: {out:?}");
    } else {
        eprintln!("script(1) is not available: the terminal case is not exercised");
    }
    scim.assert_no_plaintext().await;
}

#[tokio::test]
async fn inspect_secret_shows_the_record_and_says_when_it_is_forged_or_absent() {
    let env = Env::new("scim-inspect").await;
    let scim = Scim::new(&env);
    let mut op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&directory("acme", "  rotationGeneration: 2\n  tokenExpiresIn: 90d\n"));
    assert!(ok, "{err}");
    let dir = env.wait_ready_reason("acme", "TokenIssued").await;
    let token = env.token("acme-scim-token").await.unwrap();
    let hash = dir.status.as_ref().unwrap().token_hash.clone().unwrap();

    let shown = scim.run(&["inspect", "secret", "acme-scim-token"]);
    let text = squeeze(&shown.ok().stdout);
    for want in [
        format!("Secret: {}/acme-scim-token", env.ns),
        "Managed by: ScimDirectory acme".to_owned(),
        "Record: valid".to_owned(),
        "Issue reason: Initial".to_owned(),
        "Rotation generation: 2".to_owned(),
        format!("Token hash: {hash}"),
        format!("Stored token: {hash} (matches the record)"),
        "Lifetime: 90d".to_owned(),
        "Previous token: none".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} missing: {shown:?}");
    }
    // The directory's name finds its Secret.
    let by_directory = scim.run(&["inspect", "secret", "acme", "-o", "json"]);
    let parsed: Value = serde_json::from_str(&by_directory.ok().stdout).unwrap();
    assert!(by_directory.stderr.contains("ScimDirectory acme writes Secret acme-scim-token"), "{by_directory:?}");
    assert_eq!(parsed["recordState"], "Valid");
    assert_eq!(parsed["controller"], "acme");
    assert_eq!(parsed["record"]["tokenHash"], hash.as_str());
    assert_eq!(parsed["record"]["rotationGeneration"], 2);
    assert_eq!(parsed["record"]["tokenExpiresIn"], "7776000s");

    // With the operator stopped (it would re-issue at once): an expiry pushed out is forged...
    op.terminate().await;
    let pushed = json!({ "metadata": { "annotations": { "scim.tokenops.dev/expires-at": "2099-01-01T00:00:00Z" } } });
    env.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(pushed)).await.unwrap();
    let forged = scim.run(&["inspect", "secret", "acme-scim-token"]);
    let text = squeeze(&forged.ok().stdout);
    assert!(text.contains("Record: FORGED: scim.tokenops.dev/expires-at is not"), "{forged:?}");
    assert!(text.contains("Annotation: scim.tokenops.dev/expires-at=2099-01-01T00:00:00Z"), "{forged:?}");
    // ...and a stripped record is absent.
    let (ok, _, err) = env.kubectl(&[
        "annotate",
        "secret",
        "acme-scim-token",
        "scim.tokenops.dev/token-hash-",
        "scim.tokenops.dev/issued-at-",
    ]);
    assert!(ok, "{err}");
    let absent = scim.run(&["inspect", "secret", "acme-scim-token", "-o", "yaml"]);
    let parsed: Value = serde_yaml::from_str(&absent.ok().stdout).unwrap();
    assert_eq!(parsed["recordState"], "Absent");
    assert_eq!(parsed["storedTokenHash"], sha256(&token).as_str());
    assert!(scim.run(&["inspect", "secret", "acme-scim-token"]).stdout.contains("absent or unreadable"));
    scim.assert_no_plaintext().await;
}

/// What a tenant who can write a Secret's annotations or post Events in its namespace might plant
/// for the admin's terminal: retitle the window (OSC), clear the screen (CSI), an 8-bit CSI, a bidi
/// override, and a forged line.
const TERMINAL_ATTACK: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}\nacme: all fine";

/// No raw terminal control from the cluster in what the plugin printed.
fn assert_terminal_safe(run: &Run) {
    for c in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
        assert!(!run.stdout.contains(c) && !run.stderr.contains(c), "{c:?} reached the terminal: {run:?}");
    }
}

#[tokio::test]
async fn status_and_inspect_show_tenant_written_terminal_controls_escaped() {
    use k8s_openapi::api::core::v1::{Event, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::{Api, ObjectMeta, PostParams};

    let env = Env::new("scim-escapes").await;
    let scim = Scim::new(&env);
    let mut op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&directory("acme", "  rotationGeneration: 0\n"));
    assert!(ok, "{err}");
    let dir = env.wait_ready_reason("acme", "TokenIssued").await;
    // With the operator stopped, so that nothing is repaired: a rotation request on the Secret's
    // record and on the directory (pending), and an Event about the directory.
    op.terminate().await;
    let planted = json!({ "metadata": { "annotations": { "scim.tokenops.dev/rotation-request": TERMINAL_ATTACK } } });
    env.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(planted)).await.unwrap();
    let pending = json!({ "metadata": { "annotations": { "scim.tokenops.dev/rotate": TERMINAL_ATTACK } } });
    env.dirs().patch("acme", &PatchParams::default(), &Patch::Merge(pending)).await.unwrap();
    let now = Time(Timestamp::now());
    let event = Event {
        metadata: ObjectMeta { generate_name: Some("acme-".into()), ..ObjectMeta::default() },
        involved_object: ObjectReference {
            api_version: Some("scim.tokenops.dev/v1alpha1".into()),
            kind: Some("ScimDirectory".into()),
            name: Some("acme".into()),
            namespace: Some(env.ns.clone()),
            uid: dir.metadata.uid.clone(),
            ..ObjectReference::default()
        },
        type_: Some("Warning".into()),
        reason: Some("Pwned".into()),
        message: Some(format!("look: {TERMINAL_ATTACK}")),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    };
    Api::<Event>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &event).await.unwrap();

    let escaped = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u{202e}\\nacme: all fine";
    let status = scim.run(&["status", "acme"]);
    assert_terminal_safe(status.ok());
    assert!(status.stdout.contains("Last event: Warning Pwned ("), "{status:?}");
    assert!(status.stdout.contains(&format!("look: {escaped}")), "the Event message, escaped: {status:?}");
    assert!(status.stdout.contains(&format!("scim.tokenops.dev/rotate={escaped}")), "{status:?}");
    assert!(!status.stdout.lines().any(|l| l.starts_with("acme: all fine")), "no forged line: {status:?}");
    let all = scim.run(&["status"]);
    assert_terminal_safe(all.ok());

    let inspected = scim.run(&["inspect", "secret", "acme-scim-token"]);
    assert_terminal_safe(inspected.ok());
    assert!(squeeze(&inspected.stdout).contains(&format!("Rotation request: {escaped}")), "{inspected:?}");

    // Data output stays exact; ESC is escaped by the serializers, and JSON escapes C1 controls and bidi
    // overrides too (as \u009b, \u202e).
    let json_status = scim.run(&["status", "acme", "-o", "json"]);
    assert_terminal_safe(json_status.ok());
    let parsed: Value = serde_json::from_str(&json_status.stdout).unwrap();
    assert_eq!(parsed["lastEvent"]["message"], format!("look: {TERMINAL_ATTACK}"));
    assert_eq!(parsed["pendingRotationRequest"], TERMINAL_ATTACK);
    let yaml_inspect = scim.run(&["inspect", "secret", "acme-scim-token", "-o", "yaml"]);
    assert!(!yaml_inspect.ok().stdout.contains('\u{1b}'), "{yaml_inspect:?}");
    let parsed: Value = serde_yaml::from_str(&yaml_inspect.stdout).unwrap();
    assert_eq!(parsed["record"]["rotationRequest"], TERMINAL_ATTACK);
    scim.assert_no_plaintext().await;
}

#[tokio::test]
async fn errors_are_one_clear_line_with_a_non_zero_exit() {
    let env = Env::new("scim-errors").await;
    let scim = Scim::new(&env);
    let missing = format!("ScimDirectory \"ghost\" in namespace \"{}\" not found", env.ns);
    scim.run(&["status", "ghost"]).one_line_error(1, &missing);
    scim.run(&["rotate", "ghost", "--wait"]).one_line_error(1, &missing);
    scim.run(&["end-overlap", "ghost"]).one_line_error(1, &missing);
    scim.run_with(env.cp.kubeconfig_path(), &["token", "ghost", "--force-stdout", "-n", &env.ns], None, true)
        .one_line_error(1, &missing);
    let stranger = Token::generate();
    let check = scim.check("ghost", stranger.expose());
    check.one_line_error(2, &missing);
    assert!(!check.stderr.contains(&stranger.expose()[5..]), "the token on stdin is never repeated");
    scim.run(&["inspect", "secret", "ghost"])
        .one_line_error(1, &format!("Secret \"ghost\" in namespace \"{}\" not found", env.ns));
    let empty = scim.run(&["status"]);
    assert!(empty.ok().stderr.contains("No ScimDirectories found"), "{empty:?}");

    // No permission: a user without any RBAC.
    for args in [&["status", "ghost"][..], &["status"], &["rotate", "ghost"], &["inspect", "secret", "x"]] {
        let run = scim.run(&[args, &["--as", "nobody@example.com"]].concat());
        run.one_line_error(1, "forbidden: ");
        assert!(run.stderr.contains("User \"nobody@example.com\" cannot"), "{run:?}");
    }
    let check = scim.run_with(
        env.cp.kubeconfig_path(),
        &["check", "ghost", "-n", &env.ns, "--as", "nobody@example.com"],
        Some(stranger.expose()),
        false,
    );
    check.one_line_error(2, "forbidden: ");

    // No cluster: nothing listens where the kubeconfig points; no kubeconfig at all.
    let port = free_port();
    let nowhere = env.cp.tmp_dir().join(format!("kubeconfig-nowhere-{}", env.ns));
    std::fs::write(
        &nowhere,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
             insecure-skip-tls-verify: true\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\nusers:\n- name: u\n  user:\n    token: abc\n"
        ),
    )
    .unwrap();
    scim.run_with(&nowhere, &["status"], None, false)
        .one_line_error(1, &format!("cannot reach the Kubernetes API server at https://127.0.0.1:{port}"));
    let absent = env.cp.tmp_dir().join("no-such-kubeconfig");
    scim.run_with(&absent, &["status"], None, false).one_line_error(1, "cannot read kubeconfig");
    // A command line error is clap's (exit code 2), not ours.
    assert_eq!(scim.run(&["rotate"]).code, 2);
    scim.assert_no_plaintext_without_operator();
}

#[tokio::test]
async fn a_token_given_where_a_name_belongs_is_never_echoed() {
    let env = Env::new("scim-token-arg").await;
    let scim = Scim::new(&env);
    let token = Token::generate();
    let t = token.expose();
    // A token pasted as an argument: as the directory of check (whose stdin is where it belongs), as
    // any other name, as a flag's value, inside a pasted header, or as an argument clap rejects.
    let header = format!("Bearer {t}");
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["check", t], 2),
        (vec!["check", &header], 2),
        (vec!["status", t], 1),
        (vec!["rotate", t, "--wait"], 1),
        (vec!["end-overlap", t], 1),
        (vec!["token", t, "--force-stdout"], 1),
        (vec!["inspect", "secret", t], 1),
        (vec!["status", "--context", t], 1),
        (vec!["status", "--as", t], 1),
        (vec!["status", "--as-group", t], 1),
        (vec!["status", "--user", t], 1),
        (vec!["status", "--cluster", t], 1),
        (vec!["rotate", "acme", t], 2),
        (vec!["rotate", "acme", "--timeout", t], 2),
        (vec!["status", "-o", t], 2),
    ];
    for (args, code) in cases {
        // -n first: a later --kubeconfig wins over the harness's; `check` gets an empty stdin.
        let run = scim.run_with(env.cp.kubeconfig_path(), &[&["-n", &env.ns][..], &args].concat(), Some(""), false);
        let shown: Vec<&str> = args.iter().map(|a| if a.contains(&t[5..]) { "<the token>" } else { a }).collect();
        assert_eq!(run.code, code, "{shown:?}: {}", run.stderr);
        assert!(!run.stderr.contains(&t[5..]) && !run.stdout.contains(&t[5..]), "the token was echoed: {shown:?}");
        assert!(run.stderr.contains("scim_<redacted>"), "it says a token was given: {shown:?}: {}", run.stderr);
    }
    // The kubeconfig's path (the harness passes one: here it is the only one).
    let out = scim.kubectl().args(["scim", "status", "--kubeconfig", t]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the --kubeconfig argument looks like a SCIM token") && !stderr.contains(&t[5..]));
    scim.printed.lock().unwrap().push_str(&stderr);
    let in_namespace = scim.run_with(env.cp.kubeconfig_path(), &["status", "-n", t], None, false);
    in_namespace.one_line_error(1, "looks like a SCIM token");
    assert!(!in_namespace.stderr.contains(&t[5..]));
    let checked = scim.run_with(env.cp.kubeconfig_path(), &["check", t, "-n", &env.ns], Some(t), false);
    checked.one_line_error(2, "the NAME argument looks like a SCIM token (scim_<redacted>)");
    assert!(checked.stderr.contains("reads the token on stdin"), "{checked:?}");
    // A name that merely contains the prefix is a name (and simply not found).
    scim.run(&["status", "scim-acme"]).one_line_error(1, "\"scim-acme\" in namespace");
    scim.assert_no_plaintext_without_operator();
}

#[tokio::test]
async fn the_workload_example_is_accepted_by_the_api_server() {
    let env = Env::new("scim-example").await;
    let example = envtest::workspace_root().join("examples/workload-mounted-token.yaml");
    let (ok, out, err) = env.kubectl(&["apply", "--dry-run=server", "-f", example.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("deployment.apps/") && out.contains("scimdirectory.scim.tokenops.dev/"), "{out}");
    let manifest = std::fs::read_to_string(&example).unwrap();
    assert!(!manifest.contains("subPath:"), "a subPath mount would never see a rotation");

    // The krew manifest template: one platform per os/arch, each installing this binary.
    let krew: Value =
        serde_yaml::from_str(&std::fs::read_to_string(envtest::workspace_root().join("krew/scim.yaml")).unwrap())
            .unwrap();
    assert_eq!(krew["kind"], "Plugin");
    assert_eq!(krew["metadata"]["name"], "scim", "kubectl scim");
    let platforms = krew["spec"]["platforms"].as_array().unwrap();
    assert_eq!(platforms.len(), 4);
    for p in platforms {
        assert_eq!(p["bin"], "kubectl-scim");
        assert!(
            p["uri"].as_str().unwrap().starts_with("{{URI_") && p["sha256"].as_str().unwrap().starts_with("{{SHA256_")
        );
    }
}

impl Scim<'_> {
    /// For a test without an operator (no operator log to search).
    fn assert_no_plaintext_without_operator(&self) {
        let printed = self.printed.lock().unwrap().clone();
        for token in SEEN_TOKENS.lock().unwrap().iter().filter(|t| t.len() > 20) {
            assert!(!printed.contains(&token[5..]), "a plaintext token was printed where it must not be");
        }
    }
}
