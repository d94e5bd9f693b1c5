//! A real Argo CD (v2.14.21 or `ARGOCD_VERSION`, `hack/argocd.sh`) on the test binary's shared
//! control plane, for tests/argocd_sync.rs: Argo CD's CRDs and stock ConfigMaps/Secrets from the
//! release's own manifests, the project's health check and `rotate` action applied the way docs/gitops.md tells users
//! (`kubectl patch configmap argocd-cm --type merge --patch-file argocd/argocd-cm-patch.yaml`), Redis,
//! `argocd-repo-server`, `argocd-application-controller` and `argocd-server` (plaintext, loopback) as
//! local processes, the `argocd` CLI logged in as admin, and a bare Git repository served by
//! `git daemon` on 127.0.0.1.
//!
//! Started once per test binary. Each process runs under a small bash guard that starts it again when
//! it exits and kills it when the test binary's end of its stdin pipe closes, i.e. when the test
//! process exits: the processes are shared by every test of the binary and outlive any one of them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use envtest::ControlPlane;
use serde_json::{Value as Json, json};

use crate::support::{free_port, http_request};

/// The namespace Argo CD runs in (its Applications, AppProject and configuration).
pub const NAMESPACE: &str = "argocd";
/// Argo CD's `timeout.reconciliation`: how often the controller refreshes every Application (and, as
/// in Argo CD's install manifests, the repo server's revision cache expiry: the same setting).
pub const RECONCILIATION: Duration = Duration::from_secs(5);

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The admin account's password (argocd-secret's `admin.password`, bcrypt-hashed).
const ADMIN_PASSWORD: &str = "scim-token-operator-tests";

pub struct ArgoCd {
    pub cp: &'static ControlPlane,
    /// `git://127.0.0.1:<port>/config.git`
    pub repo_url: String,
    pub version: String,
    work: PathBuf,
    bare: PathBuf,
    pub logs: PathBuf,
    argocd: PathBuf,
    /// The CLI's configuration after `argocd login` as admin.
    cli_config: PathBuf,
    git_lock: Mutex<()>,
    /// The guards (bash) of every process; their stdin closes when this process exits.
    _children: Mutex<Vec<Child>>,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_stdin(cp: &ControlPlane, args: &[&str], input: &str) -> String {
    let mut child = cp
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), input);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on 127.0.0.1:{port} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `GET path` on 127.0.0.1:`port` answers 200: each component's own readiness check (the
/// controller serves it only once its caches are synced).
fn wait_healthy(port: u16, path: &str, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = http_request(port, "GET", path, &[]);
        if answer.as_ref().is_some_and(|r| r.status == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} not ready on 127.0.0.1:{port}{path} within {timeout:?}: {answer:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `program args` under a bash guard that kills it when our end of the guard's stdin closes, and
/// starts it again if it exits before that: Argo CD's components exit (`log.Fatal`) when an API server
/// call fails during their start-up (a connection reset on a loaded machine), where Kubernetes would
/// restart the pod. Every start appends to `log`.
fn spawn_guarded(program: &Path, args: &[String], envs: &[(String, String)], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new("bash")
        .arg("-c")
        .arg(concat!(
            r#"set -m; while :; do "$@" </dev/null; echo "guard: exited with $?, starting again in 1 s"; sleep 1; done & "#,
            r#"loop=$!; trap 'kill -- -$loop 2>/dev/null' EXIT; read -r _ || true"#
        ))
        .arg("guard")
        .arg(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()))
}

impl ArgoCd {
    /// The binary's one Argo CD, started on first use.
    pub fn shared() -> &'static ArgoCd {
        static SHARED: OnceLock<ArgoCd> = OnceLock::new();
        SHARED.get_or_init(ArgoCd::start)
    }

    fn start() -> ArgoCd {
        let started = Instant::now();
        let cp = ControlPlane::shared();
        let located = run(Command::new("bash").arg(Path::new(ROOT).join("hack/argocd.sh")), "hack/argocd.sh");
        let paths: BTreeMap<&str, PathBuf> =
            located.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k, PathBuf::from(v))).collect();
        let (argocd, crds, config, redis) =
            (&paths["ARGOCD"], &paths["ARGOCD_CRDS"], &paths["ARGOCD_CONFIG"], &paths["REDIS_SERVER"]);
        let version = run(Command::new(argocd).args(["version", "--client", "--short"]), "argocd version");

        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("argocd-sync");
        let _ = std::fs::remove_dir_all(&base);
        let logs = base.join("logs");
        for dir in ["logs", "git", "work", "tmp", "tls", "ssh", "gpg"] {
            std::fs::create_dir_all(base.join(dir)).unwrap();
        }

        // Argo CD's CRDs and configuration, as its install manifests hold them.
        run(cp.kubectl().args(["create", "namespace", NAMESPACE]), "create the argocd namespace");
        run(cp.kubectl().args(["apply", "--server-side", "-k"]).arg(crds), "apply Argo CD's CRDs (kustomization)");
        for crd in ["applications.argoproj.io", "appprojects.argoproj.io"] {
            let deadline = Instant::now() + Duration::from_secs(60);
            let jsonpath = r#"-o=jsonpath={.status.conditions[?(@.type=="Established")].status}"#;
            while cp.kubectl().args(["get", "crd", crd, jsonpath]).output().ok().map(|o| o.stdout)
                != Some(b"True".to_vec())
            {
                assert!(Instant::now() < deadline, "CRD {crd} not Established within 60 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for file in ["argocd-cm.yaml", "argocd-rbac-cm.yaml", "argocd-secret.yaml", "argocd-cmd-params-cm.yaml"] {
            run(cp.kubectl().args(["apply", "-n", NAMESPACE, "-f"]).arg(config.join(file)), file);
        }
        // What users do (docs/gitops.md): the project's health check and action, merged into argocd-cm.
        run(
            cp.kubectl()
                .args(["-n", NAMESPACE, "patch", "configmap", "argocd-cm", "--type", "merge", "--patch-file"])
                .arg(Path::new(ROOT).join("argocd/argocd-cm-patch.yaml")),
            "patch argocd-cm with argocd/argocd-cm-patch.yaml",
        );
        let reconciliation = format!("{}s", RECONCILIATION.as_secs());
        let cm = json!({ "data": { "timeout.reconciliation": reconciliation } }).to_string();
        run(
            cp.kubectl().args(["-n", NAMESPACE, "patch", "configmap", "argocd-cm", "--type", "merge", "-p", &cm]),
            "argocd-cm",
        );
        // The admin account's password, as `argocd account bcrypt` hashes it for argocd-secret (the
        // way to set it without the initial random one), and server.secretkey, which signs the
        // session tokens (the API server would generate it on its first start).
        let hash = run(Command::new(argocd).args(["account", "bcrypt", "--password", ADMIN_PASSWORD]), "bcrypt");
        let mtime = run(Command::new("date").args(["-u", "+%FT%TZ"]), "date");
        let secret = json!({ "stringData": {
            "server.secretkey": "scim-token-operator-argocd-sync-test",
            "admin.password": hash.trim(),
            "admin.passwordMtime": mtime.trim(),
        }})
        .to_string();
        run(cp.kubectl().args(["-n", NAMESPACE, "patch", "secret", "argocd-secret", "-p", &secret]), "argocd-secret");
        // The default AppProject, which the API server creates on its first start.
        let project = json!({
            "apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
            "metadata": { "name": "default", "namespace": NAMESPACE },
            "spec": {
                "sourceRepos": ["*"],
                "destinations": [{ "server": "*", "namespace": "*" }],
                "clusterResourceWhitelist": [{ "group": "*", "kind": "*" }]
            }
        });
        kubectl_stdin(cp, &["apply", "-f", "-"], &project.to_string());

        // Git on loopback: a bare repository served read-only by git daemon, with a first commit on main.
        let bare = base.join("git/config.git");
        let work = base.join("work");
        let main = work.join("main");
        let git = |args: &[&str]| run(Command::new("git").arg("-C").arg(&main).args(args), &format!("git {args:?}"));
        run(Command::new("git").args(["init", "-q", "--bare", "-b", "main"]).arg(&bare), "git init --bare");
        run(Command::new("git").args(["init", "-q", "-b", "main"]).arg(&main), "git init");
        git(&["config", "user.name", "scim-token-operator tests"]);
        git(&["config", "user.email", "tests@scim-token-operator.invalid"]);
        git(&["remote", "add", "origin", bare.to_str().unwrap()]);
        std::fs::write(main.join("README.md"), "ScimDirectory manifests synced by tests/argocd_sync.rs\n").unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "initial"]);
        git(&["push", "-q", "origin", "main"]);
        let mut children = Vec::new();
        let git_port = free_port();
        children.push(spawn_guarded(
            Path::new("git"),
            &[
                "daemon".into(),
                "--export-all".into(),
                "--reuseaddr".into(),
                "--listen=127.0.0.1".into(),
                format!("--port={git_port}"),
                format!("--base-path={}", base.join("git").display()),
                base.join("git").display().to_string(),
            ],
            &[],
            &logs.join("git-daemon.log"),
        ));

        let redis_port = free_port();
        children.push(spawn_guarded(
            redis,
            &[
                "--port".into(),
                redis_port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
            ],
            &[],
            &logs.join("redis.log"),
        ));

        // What Argo CD's own Procfile gives its processes when it runs them locally, against a kubeconfig
        // (ARGOCD_FAKE_IN_CLUSTER: https://kubernetes.default.svc is the kubeconfig's cluster).
        // helm for the repo server's Helm sources: the one the tests use (envtest's assets or located).
        let helm = PathBuf::from(cp.helm().get_program());
        let path = format!(
            "{}:{}:{}",
            helm.parent().unwrap().display(),
            cp.assets_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let common = |name: &str| -> Vec<(String, String)> {
            [
                ("ARGOCD_BINARY_NAME", name.to_owned()),
                ("ARGOCD_FAKE_IN_CLUSTER", "true".into()),
                ("KUBECONFIG", cp.kubeconfig_path().display().to_string()),
                ("ARGOCD_RECONCILIATION_TIMEOUT", reconciliation.clone()),
                // Argo CD 3.x delays each periodic refresh by up to a minute by default.
                ("ARGOCD_RECONCILIATION_JITTER", "0".into()),
                ("ARGOCD_TLS_DATA_PATH", base.join("tls").display().to_string()),
                ("ARGOCD_SSH_DATA_PATH", base.join("ssh").display().to_string()),
                ("ARGOCD_GNUPGHOME", base.join("gpg").display().to_string()),
                ("ARGOCD_GPG_ENABLED", "false".into()),
                ("TMPDIR", base.join("tmp").display().to_string()),
                ("HOSTNAME", "argocd-application-controller-0".into()),
                ("PATH", path.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
        };
        let redis_addr = format!("127.0.0.1:{redis_port}");
        wait_port(redis_port, "redis-server", Duration::from_secs(20));

        let repo_port = free_port();
        let repo_metrics = free_port();
        let repo_args: Vec<String> = vec![
            "--address=127.0.0.1".into(),
            format!("--port={repo_port}"),
            "--metrics-address=127.0.0.1".into(),
            format!("--metrics-port={repo_metrics}"),
            format!("--redis={redis_addr}"),
            "--disable-tls".into(),
            "--parallelismlimit=2".into(),
        ];
        children.push(spawn_guarded(argocd, &repo_args, &common("argocd-repo-server"), &logs.join("repo-server.log")));

        let controller_metrics = free_port();
        let controller_args: Vec<String> = vec![
            format!("--namespace={NAMESPACE}"),
            format!("--redis={redis_addr}"),
            format!("--repo-server=127.0.0.1:{repo_port}"),
            "--repo-server-plaintext".into(),
            format!("--metrics-port={controller_metrics}"),
            "--status-processors=4".into(),
            // 2.x's default. Argo CD 3.x keeps each resource's health out of the Application (in Redis,
            // for the API and UI) unless told so; the tests read it from the Application.
            "--persist-resource-health=true".into(),
            "--operation-processors=2".into(),
            // The self-heal backoff's first step (2 s by default) is kept; a short reconciliation
            // period is what the tests shorten.
        ];
        children.push(spawn_guarded(
            argocd,
            &controller_args,
            &common("argocd-application-controller"),
            &logs.join("application-controller.log"),
        ));

        // The API server, plaintext on loopback, for the CLI (`argocd app actions run`...).
        let server_port = free_port();
        let server_args: Vec<String> = vec![
            format!("--namespace={NAMESPACE}"),
            "--insecure".into(),
            "--address=127.0.0.1".into(),
            format!("--port={server_port}"),
            "--metrics-address=127.0.0.1".into(),
            format!("--metrics-port={}", free_port()),
            format!("--redis={redis_addr}"),
            format!("--repo-server=127.0.0.1:{repo_port}"),
            "--repo-server-plaintext".into(),
            // No Dex (no SSO configured), no UI files: only the API.
            "--dex-server=127.0.0.1:1".into(),
            format!("--staticassets={}", base.join("tmp").display()),
        ];
        children.push(spawn_guarded(argocd, &server_args, &common("argocd-server"), &logs.join("server.log")));

        // Ready as each component reports it (a restarted one included), rather than after a sleep.
        let ready = Duration::from_secs(120);
        wait_healthy(repo_metrics, "/healthz?full=true", "argocd-repo-server", ready);
        wait_healthy(controller_metrics, "/healthz", "argocd-application-controller", ready);
        wait_healthy(server_port, "/healthz?full=true", "argocd-server", ready);
        wait_port(git_port, "git daemon", Duration::from_secs(20));
        let cli_config = base.join("cli-config.yaml");
        let server = format!("127.0.0.1:{server_port}");
        run(
            Command::new(argocd)
                .args([
                    "login",
                    &server,
                    "--plaintext",
                    "--username",
                    "admin",
                    "--password",
                    ADMIN_PASSWORD,
                    "--config",
                ])
                .arg(&cli_config),
            "argocd login",
        );

        eprintln!(
            "argocd_sync: Argo CD {} up in {:.1?} (logs in {})",
            version.trim(),
            started.elapsed(),
            logs.display()
        );
        ArgoCd {
            cp,
            repo_url: format!("git://127.0.0.1:{git_port}/config.git"),
            version: version.trim().to_owned(),
            work,
            bare,
            logs,
            argocd: argocd.clone(),
            cli_config,
            git_lock: Mutex::new(()),
            _children: Mutex::new(children),
        }
    }

    /// On branch `branch` (created from `main`'s first commit; one per test, so that one test's commits
    /// never move another's revision), writes (`Some`) or removes (`None`) files, commits and pushes
    /// them; returns the new commit's SHA.
    pub fn commit(&self, branch: &str, files: &[(&str, Option<&str>)], message: &str) -> String {
        let _guard = self.git_lock.lock().unwrap_or_else(|e| e.into_inner());
        let work = self.work.join(branch);
        let git = |args: &[&str]| run(Command::new("git").arg("-C").arg(&work).args(args), &format!("git {args:?}"));
        if !work.exists() {
            run(Command::new("git").args(["clone", "-q"]).arg(&self.bare).arg(&work), "git clone");
            git(&["config", "user.name", "scim-token-operator tests"]);
            git(&["config", "user.email", "tests@scim-token-operator.invalid"]);
            git(&["checkout", "-q", "-b", branch]);
        }
        for (path, content) in files {
            let file = work.join(path);
            match content {
                Some(content) => {
                    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                    std::fs::write(&file, content).unwrap();
                }
                None => std::fs::remove_file(&file).unwrap(),
            }
        }
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", message]);
        git(&["push", "-q", "origin", branch]);
        git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// Panics if any of `secrets` appears in a log of Argo CD's processes.
    pub fn assert_logs_free_of(&self, secrets: &[&str]) {
        for entry in std::fs::read_dir(&self.logs).unwrap() {
            let path = entry.unwrap().path();
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            assert!(!secrets.iter().any(|s| text.contains(s)), "a token in {}", path.display());
        }
    }

    /// Whether this is Argo CD 3.x (`ARGOCD_VERSION=3...`; 2.14.21 by default).
    pub fn v3(&self) -> bool {
        self.version.contains(" v3.")
    }

    /// The `argocd` CLI, logged in to the API server as admin: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&self.argocd)
            .args(args)
            .arg("--config")
            .arg(&self.cli_config)
            .output()
            .unwrap_or_else(|e| panic!("argocd {args:?}: {e}"));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// `kubectl apply` of any object (JSON).
    pub fn kubectl_apply(&self, manifest: &Json) {
        kubectl_stdin(self.cp, &["apply", "-f", "-"], &manifest.to_string());
    }

    /// Creates or updates an Application from a manifest (JSON).
    pub fn apply(&self, manifest: &Json) {
        kubectl_stdin(self.cp, &["apply", "-n", NAMESPACE, "-f", "-"], &manifest.to_string());
    }

    /// A JSON merge patch of Application `name` (e.g. an `operation`, as `argocd app sync` has the API
    /// server write it).
    pub fn patch_app(&self, name: &str, patch: &Json) {
        run(
            self.cp.kubectl().args([
                "-n",
                NAMESPACE,
                "patch",
                "applications.argoproj.io",
                name,
                "--type",
                "merge",
                "-p",
                &patch.to_string(),
            ]),
            "patch the Application",
        );
    }

    /// Application `name` as JSON, if it exists.
    pub fn app(&self, name: &str) -> Option<Json> {
        let out = self
            .cp
            .kubectl()
            .args(["-n", NAMESPACE, "get", "applications.argoproj.io", name, "-o", "json"])
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("kubectl get application {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// How many periodic refreshes (comparison expired after `timeout.reconciliation`) of Application
    /// `name` the controller has completed so far, from its log: Argo CD 2.14 writes
    /// status.reconciledAt only when the comparison result changed, so the status cannot count them.
    pub fn refreshes(&self, name: &str) -> usize {
        let log = std::fs::read_to_string(self.logs.join("application-controller.log")).unwrap_or_default();
        // Text (2.x's default format) or JSON (3.x's).
        let (text, json) = (format!(" application={name} "), format!(r#""application":"{name}""#));
        log.lines()
            .filter(|l| {
                l.contains("Refreshing app status (comparison expired") && (l.contains(&text) || l.contains(&json))
            })
            .count()
    }

    /// Polls Application `name` every 250 ms until `f` returns Some, or panics with its last status.
    pub async fn wait_app<T>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Json) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let app = self.app(name);
            if let Some(v) = app.as_ref().and_then(&mut f) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for Application {name}: {what}; its status:\n{}\n(Argo CD logs in {})",
                    serde_json::to_string_pretty(&app.map(|a| a["status"].clone())).unwrap(),
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
